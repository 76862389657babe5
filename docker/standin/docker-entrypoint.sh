#!/bin/sh
# Entrypoint of the stand-in MariaDB base image that scripts/image-test.sh builds from
# Debian's mariadb-server, for machines that cannot pull mariadb:10.11. Written for
# recsql; it implements the part of the official image's documented behaviour that
# docker-compose.yml relies on:
#   - on first start (no /var/lib/mysql/mysql), create the system tables; set the root
#     password from MARIADB_ROOT_PASSWORD, or a random one (MARIADB_RANDOM_ROOT_PASSWORD),
#     or none (MARIADB_ALLOW_EMPTY_ROOT_PASSWORD); create MARIADB_DATABASE and
#     MARIADB_USER / MARIADB_PASSWORD with all privileges on it; create the
#     `healthcheck` user that healthcheck.sh logs in as;
#   - then run /docker-entrypoint-initdb.d/*.sql, *.sql.gz and *.sh, in name order,
#     in MARIADB_DATABASE, on a server that listens on no port;
#   - finally exec mariadbd, as PID 1, so `docker stop` (SIGTERM) shuts it down cleanly.
set -eu

say() { printf 'entrypoint: %s\n' "$*" >&2; }

datadir=/var/lib/mysql
socket=/run/mysqld/mysqld.sock

# Options after the image name go to mariadbd, as with the official image.
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- mariadbd "$@"
fi
case "$1" in
    mariadbd | mysqld) ;;
    *) exec "$@" ;;
esac

sql_quote() { printf '%s' "$1" | sed "s/\\\\/\\\\\\\\/g; s/'/\\\\'/g"; }
random_password() { tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32; }
as_root() { mariadb --protocol=socket --socket="$socket" -uroot "$@"; }

first_start() {
    root_password=""
    if [ -n "${MARIADB_ROOT_PASSWORD:-}" ]; then
        root_password=$MARIADB_ROOT_PASSWORD
    elif [ -n "${MARIADB_RANDOM_ROOT_PASSWORD:-}" ]; then
        root_password=$(random_password)
        say "GENERATED ROOT PASSWORD: $root_password"
    elif [ -z "${MARIADB_ALLOW_EMPTY_ROOT_PASSWORD:-}" ]; then
        say "set one of MARIADB_ROOT_PASSWORD, MARIADB_RANDOM_ROOT_PASSWORD or MARIADB_ALLOW_EMPTY_ROOT_PASSWORD"
        exit 1
    fi

    say "first start: creating the system tables in $datadir"
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
        --auth-root-authentication-method=normal >/dev/null

    # A server for the set-up only: no TCP port, so nothing connects before it is done.
    mariadbd --user=mysql --datadir="$datadir" --socket="$socket" --skip-networking &
    pid=$!
    i=0
    until mariadb-admin --protocol=socket --socket="$socket" -uroot ping >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 60 ] || ! kill -0 "$pid" 2>/dev/null; then
            say "the set-up server did not start"
            exit 1
        fi
        sleep 1
    done

    healthcheck_password=$(random_password)
    {
        echo "SET sql_log_bin = 0;"
        # mariadb-install-db also makes anonymous users and root@<hostname>: drop them.
        echo "DELETE FROM mysql.global_priv WHERE User = '' OR (User = 'root' AND Host <> 'localhost');"
        echo "FLUSH PRIVILEGES;"
        echo "CREATE USER 'healthcheck'@'127.0.0.1' IDENTIFIED BY '$healthcheck_password';"
        echo "CREATE USER 'healthcheck'@'::1' IDENTIFIED BY '$healthcheck_password';"
        echo "CREATE USER 'healthcheck'@'localhost' IDENTIFIED BY '$healthcheck_password';"
        if [ -n "${MARIADB_DATABASE:-}" ]; then
            echo "CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;"
        fi
        if [ -n "${MARIADB_USER:-}" ]; then
            echo "CREATE USER '$(sql_quote "$MARIADB_USER")'@'%' IDENTIFIED BY '$(sql_quote "${MARIADB_PASSWORD:-}")';"
            if [ -n "${MARIADB_DATABASE:-}" ]; then
                echo "GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$(sql_quote "$MARIADB_USER")'@'%';"
            fi
        fi
        echo "CREATE USER 'root'@'%' IDENTIFIED BY '$(sql_quote "$root_password")';"
        echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '$(sql_quote "$root_password")';"
    } | as_root
    umask 077
    printf '[mariadb-client]\nuser=healthcheck\npassword=%s\nsocket=%s\n' \
        "$healthcheck_password" "$socket" >"$datadir/.my-healthcheck.cnf"
    chown mysql:mysql "$datadir/.my-healthcheck.cnf"
    umask 022

    # root now has its password: the init scripts log in with it.
    export MYSQL_PWD="$root_password"
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        say "running $f"
        case "$f" in
            *.sql) as_root ${MARIADB_DATABASE:+"$MARIADB_DATABASE"} <"$f" ;;
            *.sql.gz) gzip -dc "$f" | as_root ${MARIADB_DATABASE:+"$MARIADB_DATABASE"} ;;
            *.sh) sh "$f" ;;
            *) say "ignoring $f" ;;
        esac
    done
    mariadb-admin --protocol=socket --socket="$socket" -uroot shutdown
    unset MYSQL_PWD
    wait "$pid" || true
    say "first start done"
}

mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$datadir"
if [ ! -d "$datadir/mysql" ]; then
    first_start
fi
exec "$@" --user=mysql
