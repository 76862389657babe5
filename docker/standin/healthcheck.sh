#!/bin/sh
# Health check of the stand-in MariaDB base image (see docker-entrypoint.sh), with the
# two checks docker-compose.yml asks for, named as in the official image:
#   --connect              the server accepts a TCP connection and a login
#   --innodb_initialized   InnoDB has finished starting
# It logs in as the `healthcheck` user that the first start created.
set -eu
cnf=/var/lib/mysql/.my-healthcheck.cnf
[ -r "$cnf" ] || { echo "healthcheck: $cnf is missing (first start not done)" >&2; exit 1; }
[ "$#" -gt 0 ] || set -- --connect
for check in "$@"; do
    case "$check" in
        --connect)
            mariadb --defaults-extra-file="$cnf" --protocol=tcp -h127.0.0.1 -e 'SELECT 1' >/dev/null ;;
        --innodb_initialized)
            [ "$(mariadb --defaults-extra-file="$cnf" -N -B -e \
                "SELECT 1 FROM information_schema.ENGINES WHERE ENGINE = 'InnoDB' AND SUPPORT IN ('YES', 'DEFAULT')")" = 1 ] ;;
        *)
            echo "healthcheck: unknown check $check" >&2; exit 2 ;;
    esac
done
