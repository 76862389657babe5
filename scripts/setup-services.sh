#!/usr/bin/env bash
# What `make test` (and `make demo` on MySQL) needs outside the venv, set up when missing:
#   - libcurl's headers, which the MariaDB/MySQL loadable function (db/udf) builds against;
#   - MariaDB on 127.0.0.1:3306 (root, empty password) with the database `test`;
#   - Redis on 127.0.0.1:6379 (package redis-server), for the fresh-event store's tests.
# Installs with apt-get when root; otherwise says which package or command is missing.
set -euo pipefail

say() { printf 'setup-services: %s\n' "$*" >&2; }

have_curl_headers() {
    pkg-config --exists libcurl 2>/dev/null ||
        [ -f /usr/include/curl/curl.h ] || [ -f "/usr/include/$(gcc -dumpmachine 2>/dev/null)/curl/curl.h" ]
}

if ! have_curl_headers; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing libcurl4-openssl-dev (headers for db/udf)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcurl4-openssl-dev) >/dev/null ||
            { say "apt-get install libcurl4-openssl-dev failed"; exit 1; }
    else
        say "libcurl's headers are missing: install libcurl4-openssl-dev (Debian/Ubuntu) or libcurl-devel"
        exit 1
    fi
fi

redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

if [ -z "${RECSQL_TEST_REDIS_URL:-}" ] || [ "${RECSQL_TEST_REDIS_URL}" = "redis://127.0.0.1:6379/0" ]; then
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing redis-server"
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null ||
                { say "apt-get install redis-server failed"; exit 1; }
        else
            say "no Redis here: install redis-server, or set RECSQL_TEST_REDIS_URL to a server"
            exit 1
        fi
    fi
    if ! redis_ping; then
        # Tests only: nothing saved to disk; each test uses a key prefix of its own.
        say "starting Redis"
        redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null
        for _ in $(seq 1 30); do redis_ping && break; sleep 0.2; done
        redis_ping || { say "Redis did not answer on 127.0.0.1:6379"; exit 1; }
    fi
fi  # otherwise the caller chose another server: theirs to run

mysql_ping() { mariadb-admin -uroot --protocol=tcp -h127.0.0.1 ping >/dev/null 2>&1; }

if [ -n "${RECSQL_TEST_MYSQL_URL:-}" ] && [ "${RECSQL_TEST_MYSQL_URL}" != "mysql://root@127.0.0.1:3306/test" ]; then
    exit 0  # the caller chose another server: theirs to run
fi
if ! command -v mariadb-admin >/dev/null; then
    say "no MariaDB client here: install mariadb-server, or set RECSQL_TEST_MYSQL_URL to a server"
    exit 1
fi
if ! mysql_ping; then
    if [ ! -x /usr/sbin/mariadbd ]; then
        say "MariaDB is not running and /usr/sbin/mariadbd is not installed (apt-get install mariadb-server)"
        exit 1
    fi
    say "starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 1 60); do mysql_ping && break; sleep 1; done
    mysql_ping || { say "MariaDB did not answer on 127.0.0.1:3306 within 60 s"; exit 1; }
fi
mariadb -uroot --protocol=tcp -h127.0.0.1 -e 'CREATE DATABASE IF NOT EXISTS test'
