#!/usr/bin/env bash
# `make image-test`: build every image in the Dockerfile with podman and run them for
# real, on a machine that cannot pull from Docker Hub:
#   1. set-up: podman, runc, mmdebstrap (apt-get, when root) and podman-compose (PyPI,
#      into a venv of its own), with a containers.conf of our own (CONTAINERS_CONF);
#   2. stand-in base images made from Debian packages (mmdebstrap + podman import):
#      Python 3.11 with a venv on PATH, and MariaDB 10.11 with our own first-start
#      entrypoint (docker/standin/), kept in podman's storage between runs;
#   3. the Dockerfile's targets built with those bases passed as build args;
#   4. the image run as SageMaker runs it: `IMAGE train` on a mounted /opt/ml tree,
#      a failing `train`, `IMAGE serve` (/ping, /invocations, healthcheck, SIGTERM);
#   5. the compose stack up with podman-compose, the README's SQL through the MariaDB
#      container against the server container, then everything torn down.
# Prints figures (build times, sizes, start-up times) and "N passed, N failed".
#
#   scripts/image-test.sh [all|setup|bases|build|sagemaker|compose|clean]
#
# Environment: RECSQL_IMAGE_TEST_HOME (tools and config; default ~/.cache/recsql-image-test),
# RECSQL_IMAGE_TEST_KEEP=1 keeps the built images and containers for a look afterwards.
set -euo pipefail

cd "$(dirname "$0")/.."
home=${RECSQL_IMAGE_TEST_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/recsql-image-test}
mkdir -p "$home"
export CONTAINERS_CONF="$home/containers.conf"

# Our images and containers carry this prefix, so clean-up touches nothing else.
prefix=recsql-it
py_base=localhost/recsql-standin-python:bookworm
db_base=localhost/recsql-standin-mariadb:bookworm
redis_base=localhost/recsql-standin-redis:bookworm
app_image=localhost/$prefix:sagemaker
local_image=localhost/$prefix:local
db_image=localhost/$prefix-mariadb:latest
debian_mirror=${RECSQL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
debian_security=${RECSQL_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
podman_compose_version=1.6.0

passed=0
failed=0
figures=()
say() { printf 'image-test: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
ok() { passed=$((passed + 1)); say "ok: $*"; }
fail() { failed=$((failed + 1)); say "FAILED: $*"; }
check() {  # check DESCRIPTION COMMAND...: one assertion
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
figure() { figures+=("$1: $2"); say "figure: $1: $2"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# ------------------------------------------------------------------------ 1. set-up
setup() {
    local missing=()
    # PATH only: `command -v` would find the podman() wrapper defined below
    type -P podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)  # for podman-compose's venv
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            die "missing ${missing[*]}: install them (Debian: apt-get install ${missing[*]}) or run this as root"
        fi
        say "installing ${missing[*]} with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null ||
            die "apt-get install ${missing[*]} failed: no package access?"
    fi
    [ "$(id -u)" = 0 ] || die "podman here runs rootful (mmdebstrap, podman import): run as root"

    # Ours, never the machine's /etc/containers. What this machine kind needs (found by
    # trying): no default ulimits, the cgroupfs manager (no systemd) and runc (crun
    # refuses this host's cgroups).
    cat >"$CONTAINERS_CONF" <<'EOF'
# Written by recsql scripts/image-test.sh; used through CONTAINERS_CONF only.
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    # Debian's podman-compose (1.0.3) cannot run this compose file; PyPI's can.
    local venv=$home/podman-compose
    if [ "$("$venv/bin/podman-compose" version 2>/dev/null | sed -n 's/^podman-compose version //p' | head -1)" != "$podman_compose_version" ]; then
        say "installing podman-compose $podman_compose_version into $venv"
        { python3 -m venv "$venv" &&
            "$venv/bin/pip" install -q "podman-compose==$podman_compose_version" >"$home/pip.log" 2>&1; } ||
            die "pip install podman-compose==$podman_compose_version failed: no access to PyPI?"
    fi
    podman_compose=$venv/bin/podman-compose
    podman info >/dev/null || die "podman does not run here (podman info failed)"
}

# ------------------------------------------------------------- 2. stand-in base images
# Each base is rebuilt only when what it is made from changes (a hash in a label).
standin_hash() {
    { declare -f "$1" debootstrap_to; [ "$1" = python_base ] || cat docker/standin/*; } | sha256sum | cut -c1-16
}
image_label() { podman image inspect --format "{{ index .Labels \"$2\" }}" "$1" 2>/dev/null || true; }

debootstrap_to() {  # debootstrap_to TARBALL PACKAGES HOOK...
    # As Debian-based official images do: no recommends, no docs, and apt keeps no .deb
    # files after installing (each apt-get in a RUN step would leave them in its layer).
    local out=$1 packages=$2
    shift 2
    # shellcheck disable=SC2016  # mmdebstrap passes the chroot's path as $1 to hooks
    mmdebstrap --variant=minbase --include="$packages" --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' "$@" \
        --customize-hook='echo "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/90no-deb-cache"' \
        bookworm "$out" \
        "deb $debian_mirror bookworm main" "deb $debian_mirror bookworm-updates main" \
        "deb $debian_security bookworm-security main"
}

python_base() {
    # The Python the Dockerfile expects of python:3.11-slim: `python` and `pip` on PATH
    # (a venv here, so pip never touches Debian's own packages) and Python's headers for
    # model/_native.c; the Dockerfile installs gcc itself.
    local tar=$home/python-base.tar
    # shellcheck disable=SC2016  # mmdebstrap passes the chroot's path as $1 to hooks
    debootstrap_to "$tar" python3,python3-venv,python3-dev,ca-certificates \
        --customize-hook='chroot "$1" python3 -m venv /opt/venv' || return 1
    podman import --quiet \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' \
        --change "LABEL recsql.standin=$(standin_hash python_base)" "$tar" "$py_base" >/dev/null || return 1
    rm -f "$tar"
}

mariadb_base() {
    # MariaDB 10.11 from Debian, with the entrypoint and health check in docker/standin/
    # (ours, with the official image's documented behaviour) and an empty data directory,
    # so that the first start runs /docker-entrypoint-initdb.d/.
    local tar=$home/mariadb-base.tar
    # shellcheck disable=SC2016  # mmdebstrap passes the chroot's path as $1 to hooks
    debootstrap_to "$tar" mariadb-server,mariadb-client \
        --customize-hook='rm -rf "$1"/var/lib/mysql && mkdir -p "$1"/var/lib/mysql "$1"/docker-entrypoint-initdb.d' \
        --customize-hook='chroot "$1" chown mysql:mysql /var/lib/mysql' \
        --customize-hook="copy-in docker/standin/docker-entrypoint.sh docker/standin/healthcheck.sh /usr/local/bin" \
        --customize-hook="copy-in docker/standin/99-container.cnf /etc/mysql/mariadb.conf.d" || return 1
    podman import --quiet \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["mariadbd"]' \
        --change 'EXPOSE 3306' --change 'STOPSIGNAL SIGTERM' \
        --change "LABEL recsql.standin=$(standin_hash mariadb_base)" "$tar" "$db_base" >/dev/null || return 1
    rm -f "$tar"
}

redis_base() {
    # Redis 7 from Debian, run as compose runs redis:7.2-alpine (its command line is in
    # docker-compose.yml)
    local tar=$home/redis-base.tar
    debootstrap_to "$tar" redis-server || return 1
    podman import --quiet --change 'CMD ["redis-server"]' --change 'EXPOSE 6379' \
        --change "LABEL recsql.standin=$(standin_hash redis_base)" "$tar" "$redis_base" >/dev/null || return 1
    rm -f "$tar"
}

bases() {
    local made name image
    for made in python_base:$py_base mariadb_base:$db_base redis_base:$redis_base; do
        name=${made%%:*} image=${made#*:}
        if [ "$(image_label "$image" recsql.standin)" = "$(standin_hash "$name")" ]; then
            say "stand-in $image is up to date"
            continue
        fi
        say "making stand-in $image with mmdebstrap"
        local t0
        t0=$(now)
        "$name" || die "could not make $image (mmdebstrap needs Debian's package mirror)"
        figure "stand-in $image made" "$(since "$t0")"
    done
}

# ------------------------------------------------------------------------- 3. build
# What RUN steps need to download packages here: pip's configuration as the host has
# it (files and PIP_* variables, merged into one file), the local folders it names and
# the host's CA bundle (a TLS proxy may sign PyPI's certificate). buildah leaves an
# empty file or folder in the image for every mount point it had to create, so all of
# them lie under /root, which exists in every base: a scratch folder mounted there
# holds pip's user configuration (/root/.config/pip/pip.conf, read by pip as root) and
# the read-only mounts below /root/.build. The image's own /root is hidden during RUN
# steps and left as it was.
build_mounts() {
    local scratch=$work/build-root inside=/root/.build
    rm -rf "$scratch"
    mkdir -p "$scratch/.config/pip"
    printf -- '--volume=%s:/root\n' "$scratch"
    { pip config list 2>/dev/null || python3 -m pip config list 2>/dev/null || true; } |
        python3 -c '
import configparser, os, re, sys
inside, out = sys.argv[1], sys.argv[2]
merged, env = {}, {}
for line in sys.stdin:
    m = re.fullmatch(r"(.+?)\.([\w-]+)=(.*)", line.strip())
    if not m:
        continue
    section, key, value = m.group(1), m.group(2), m.group(3).strip("\x27\"")
    if section == ":env:":
        env[key] = value
    else:
        merged.setdefault(section, {})[key] = value
merged.setdefault("global", {}).update(env)  # PIP_* variables win, as in pip
mounts = {}
for values in merged.values():
    for key in ("find-links", "extra-index-url", "index-url", "constraint", "cert"):
        items = []
        for item in values.get(key, "").split():
            url = item.startswith("file://")
            path = item.removeprefix("file://").rstrip("/")
            if not path.startswith("/") or not os.path.exists(path):
                items.append(item)
                continue
            # a local index (.../simple) links to files beside it: mount its parent
            top = os.path.dirname(path) if key.endswith("index-url") else path
            mounts[top] = inside + top
            items.append(("file://" if url else "") + inside + path)
        if key in values:
            values[key] = " ".join(items)
config = configparser.ConfigParser()
config.read_dict(merged)
with open(out, "w") as f:
    f.write("# pip configuration for image builds, by scripts/image-test.sh from the host\x27s\n")
    config.write(f)
for source, target in sorted(mounts.items()):
    print(f"--volume={source}:{target}:ro")
' "$inside" "$scratch/.config/pip/pip.conf"
}

podman_build() {  # podman_build TARGET TAG
    local target=$1 tag=$2
    local mounts
    mapfile -t mounts < <(build_mounts)
    # --skip-unused-stages=false: buildah 1.28 cannot resolve `FROM ${VARIANT}-base`
    # otherwise, so every base argument names a local image (the GPU one too).
    # --format docker: OCI images drop HEALTHCHECK.
    local log=$home/build-$target.log
    podman build --format docker --network host --skip-unused-stages=false \
        --build-arg PYTHON_IMAGE="$py_base" --build-arg GPU_IMAGE="$py_base" \
        --build-arg MARIADB_IMAGE="$db_base" \
        --build-arg TORCH_INDEX_URL="${RECSQL_TORCH_INDEX_URL:-https://pypi.org/simple}" \
        "${mounts[@]}" --target "$target" --tag "$tag" . >"$log" 2>&1 ||
        { tail -30 "$log" >&2; say "build log: $log"; return 1; }
}

build() {
    local target tag t0 ok_all=1
    for target in sagemaker:$app_image local:$local_image mariadb:$db_image; do
        tag=${target#*:} target=${target%%:*}
        t0=$(now)
        if podman_build "$target" "$tag"; then
            ok "build --target $target"
            figure "build --target $target" "$(since "$t0")"
        else
            fail "build --target $target"
            ok_all=0
        fi
    done
    [ "$ok_all" = 1 ] || die "a build failed: see the output above"
    figure "image size, recsql CPU ($app_image)" "$(image_size "$app_image")"
    figure "image size, MariaDB ($db_image)" "$(image_size "$db_image")"
}

# ------------------------------------------------------------- 4. as SageMaker runs it
# podman 4.3 schedules health checks with systemd timers and complains on every run and
# removal where there is no systemd (wait_healthy runs them instead): drop that line.
podman() { command podman "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }

wait_for_ping() {  # wait_for_ping URL SECONDS: until GET URL answers 200
    local deadline=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ "$(http_code "$1")" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

wait_healthy() {  # wait_healthy CONTAINER SECONDS: run the image's own HEALTHCHECK until it passes
    # (podman 4.3 runs health checks from systemd timers, absent here: run them ourselves)
    local deadline=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        podman healthcheck run "$1" >/dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}

unhealthy() { ! podman healthcheck run "$1" >/dev/null 2>&1; }

# An /opt/ml tree as SageMaker lays it out for a training job: the `train` channel and
# hyperparameters.json, every value a string.
training_tree() {  # training_tree DIR HYPERPARAMETERS_JSON
    mkdir -p "$1/input/data/train" "$1/input/config" "$1/model" "$1/output"
    printf '%s\n' "$2" >"$1/input/config/hyperparameters.json"
    printf '%s\n' '{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}}' \
        >"$1/input/config/inputdataconfig.json"
    printf '%s\n' '{"current_host": "algo-1", "hosts": ["algo-1"]}' >"$1/input/config/resourceconfig.json"
}

sagemaker() {
    # Events for the channel, made by the image itself (`IMAGE synth ...`).
    training_tree "$work/ok" '{"epochs": "2", "num_embeddings": "32", "batch_size": "1024", "min_events": "2"}'
    podman run --rm --network none -v "$work/ok/input/data/train:/data" "$app_image" \
        synth --rows 50000 --seed 0 --no-progress --out /data/events.csv >/dev/null
    check "synth wrote the train channel" test -s "$work/ok/input/data/train/events.csv"

    # `docker run IMAGE train`, no network (a training job may have none).
    local rc=0 t0
    t0=$(now)
    podman run --rm --network none --name "$prefix-train" -v "$work/ok:/opt/ml" "$app_image" train \
        >"$work/train.log" 2>&1 || rc=$?
    figure "train, 50k events, 2 epochs, in the container" "$(since "$t0")"
    check "train exits 0" test "$rc" = 0
    check "train writes the model into /opt/ml/model" \
        test -s "$work/ok/model/recsql.json" -a -s "$work/ok/model/weights.safetensors"
    check "train writes no failure file on success" test ! -e "$work/ok/output/failure"
    [ "$rc" = 0 ] || tail -20 "$work/train.log" >&2

    # A failing job: exit non-zero and the reason in /opt/ml/output/failure.
    training_tree "$work/bad" '{"epochs": "many"}'
    cp "$work/ok/input/data/train/events.csv" "$work/bad/input/data/train/"
    rc=0
    podman run --rm --network none -v "$work/bad:/opt/ml" "$app_image" train >/dev/null 2>&1 || rc=$?
    check "a failing train exits non-zero" test "$rc" != 0
    check "a failing train writes its reason to /opt/ml/output/failure" \
        grep -q "hyperparameter epochs" "$work/bad/output/failure"

    # model.tar.gz, extracted into a fresh /opt/ml/model as SageMaker does before `serve`.
    mkdir -p "$work/serve/model"
    tar -C "$work/ok/model" -czf "$work/model.tar.gz" .
    tar -C "$work/serve/model" -xzf "$work/model.tar.gz"

    # `docker run IMAGE serve`, three times: the last one stays up for the checks below.
    local port name=$prefix-serve run starts=()
    for run in 1 2 3; do
        port=$(free_port)
        [ "$run" = 1 ] || podman rm -f --time 30 "$name" >/dev/null
        t0=$(now)
        podman run -d --name "$name" -p "127.0.0.1:$port:8080" -v "$work/serve/model:/opt/ml/model:ro" \
            "$app_image" serve >/dev/null
        if ! wait_for_ping "http://127.0.0.1:$port/ping" 120; then
            fail "serve: /ping answers 200 within 120 s"
            podman logs --tail 20 "$name" >&2 || true
            return 1
        fi
        starts+=("$(since "$t0")")
    done
    ok "serve: /ping answers 200"
    figure "container start to /ping 200 (sagemaker image, 3 starts)" "${starts[*]}"
    check "serve: /ping answers with an empty body" \
        test -z "$(curl -s --max-time 2 "http://127.0.0.1:$port/ping")"

    # Three pairs from the events, an unknown user and a malformed line: one line each.
    awk -F, 'NR > 1 && NR <= 4 { print $8 "," $3 }' "$work/ok/input/data/train/events.csv" >"$work/body.csv"
    printf '1,1\nnot,a-pair\n' >>"$work/body.csv"
    curl -s --max-time 10 -H 'Content-Type: text/csv' --data-binary @"$work/body.csv" \
        -o "$work/reply.csv" "http://127.0.0.1:$port/invocations" || true
    check "serve: /invocations answers one CSV line per input line" \
        test "$(wc -l <"$work/reply.csv")" = "$(wc -l <"$work/body.csv")"
    check "serve: /invocations scores the known pairs" \
        test "$(head -3 "$work/reply.csv" | grep -cE '^[0-9.eE+-]+$')" = 3
    check "serve: /invocations gives empty lines to the unknown and malformed pairs" \
        test "$(tail -n +4 "$work/reply.csv" | tr -d '\n')" = ""
    check "serve: the image's HEALTHCHECK passes" podman healthcheck run "$name"

    # SageMaker stops a container with SIGTERM, then SIGKILL 30 s later.
    t0=$(now)
    podman stop --time 30 "$name" >/dev/null
    local took
    took=$(since "$t0")
    figure "podman stop (SIGTERM) to exit" "$took"
    check "serve: SIGTERM ends the server with exit code 0" \
        test "$(podman inspect --format '{{.State.ExitCode}}' "$name")" = 0
    check "serve: SIGTERM ends the server within the 30 s grace period" \
        awk -v t="${took% s}" 'BEGIN { exit !(t < 30) }'
    podman rm "$name" >/dev/null

    # The local image (uid 10001), started before its model exists (as a restarted compose
    # service can be): not healthy until the model arrives, then it loads the model,
    # trained as root, by itself.
    name=$prefix-serve-local
    port=$(free_port)
    mkdir -p "$work/late"
    podman run -d --name "$name" -p "127.0.0.1:$port:8080" -v "$work/late:/opt/ml/model:ro" \
        "$local_image" serve >/dev/null
    sleep 3
    check "local image: /ping is not 200 before the model exists" \
        test "$(http_code "http://127.0.0.1:$port/ping")" != 200
    check "local image: the HEALTHCHECK fails before the model exists" \
        unhealthy "$name"
    cp -r "$work/serve/model/." "$work/late/"
    check "local image (uid 10001) loads the root-trained model once it appears" \
        wait_for_ping "http://127.0.0.1:$port/ping" 60
    podman rm -f --time 30 "$name" >/dev/null
}

# ------------------------------------------------------------------------ 5. compose
compose() { "$podman_compose" -p "$prefix" -f docker-compose.yml "$@"; }
service_container() {
    podman ps -a --filter "label=com.docker.compose.project=$prefix" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}

# The README's docker-compose commands (section "3. docker compose"), with our ports.
readme_compose_command() {  # readme_compose_command curl|mariadb
    awk '/^## 3\. docker compose/ { s = 1 } s && /^```sh/ { b = 1; next } b && /^```/ { exit } b' README.md |
        grep "^$1 " | sed "s/127\.0\.0\.1:8080/127.0.0.1:$http_port/; s/-P3307/-P$db_port/" || true
}

# The names docker-compose.yml gives the images, taken back from ours only.
untag_compose_names() {
    podman untag "$local_image" localhost/recsql:local 2>/dev/null || true
    podman untag "$db_image" localhost/recsql-mariadb:local 2>/dev/null || true
}

compose_test() {
    # podman-compose honours neither service_completed_successfully nor service_healthy
    # (docker-compose.yml keeps both for Docker Compose), so the services start one by
    # one here, each after the condition it waits for holds.
    http_port=$(free_port) db_port=$(free_port)
    export RECSQL_HTTP_PORT=$http_port RECSQL_MARIADB_PORT=$db_port RECSQL_REDIS_IMAGE=$redis_base
    # The images compose names, built above.
    podman tag "$local_image" localhost/recsql:local
    podman tag "$db_image" localhost/recsql-mariadb:local
    compose down -v >/dev/null 2>&1 || true

    local t0 c rc service
    t0=$(now)
    for service in events trainer; do
        compose up -d --no-deps --no-build "$service" >/dev/null 2>&1
        c=$(service_container "$service")
        rc=$(podman wait "$c" 2>/dev/null || echo missing)
        check "compose: $service completes successfully" test "$rc" = 0
        [ "$rc" = 0 ] || { podman logs --tail 20 "$c" >&2 || true; return 1; }
        say "$service's last log line: $(podman logs --tail 1 "$c" 2>&1 | tail -1)"
    done
    figure "compose: events + trainer (200k events, 3 epochs)" "$(since "$t0")"
    compose up -d --no-deps --no-build redis >/dev/null 2>&1
    check "compose: redis becomes healthy" wait_healthy "$(service_container redis)" 60
    compose up -d --no-deps --no-build server >/dev/null 2>&1
    check "compose: server becomes healthy" wait_healthy "$(service_container server)" 180
    out=$(curl -s -H 'Content-Type: application/json' -d '{"events": [{"session_id": 7, "product_id": 1}]}' \
        "http://127.0.0.1:$http_port/invocations" 2>&1 || true)
    check "compose: the server keeps fresh events in the redis service ($out)" grep -q '"taken": *1' <<<"$out"
    compose up -d --no-deps --no-build mariadb >/dev/null 2>&1
    check "compose: mariadb becomes healthy (first start ran the init scripts)" \
        wait_healthy "$(service_container mariadb)" 180

    local curl_cmd sql_cmd out pair
    curl_cmd=$(readme_compose_command curl)
    sql_cmd=$(readme_compose_command mariadb)
    check "README: the compose section has a curl and a mariadb command" test -n "$curl_cmd" -a -n "$sql_cmd"
    out=$(bash -c "$curl_cmd" 2>&1 || true)
    check "compose: the README's curl gets a score from the server ($out)" \
        grep -qE '^[0-9.eE+-]+$' <<<"$out"
    # The README's SQL, with the host's mariadb client as the README has it...
    out=$(bash -c "$sql_cmd" 2>&1 || true)
    figure "compose: up to the first scored SQL row" "$(since "$t0")"
    check "compose: the README's SQL scores through MariaDB -> server ($(tail -1 <<<"$out"))" \
        grep -qE '^[0-9.eE+-]+$' <<<"$(tail -1 <<<"$out")"
    # ...and the same pair from inside the MariaDB container, beside an unknown one (NULL,
    # and no endpoint error: the server answered).
    pair=$(grep -o 'will_purchase([0-9]*, [0-9]*)' <<<"$sql_cmd" | head -1 || true)
    out=$(podman exec "$(service_container mariadb)" mariadb -urecsql -precsql recsql -N -B \
        -e "SELECT $pair, will_purchase(1, 1), recsql_last_error()" 2>&1 || true)
    check "compose: in the MariaDB container, $pair scores, an unknown pair is NULL ($out)" \
        grep -qE '^[0-9.eE+-]+[[:space:]]+NULL[[:space:]]+NULL$' <<<"$out"
    # Fresh events from SQL: the function an AFTER INSERT trigger calls, through the
    # allow-list name recsql.events, into the server's store (1: taken).
    out=$(podman exec "$(service_container mariadb)" mariadb -urecsql -precsql recsql -N -B \
        -e "SELECT record_session_event(8, 1, 'view', NULL), recsql_last_error()" 2>&1 || true)
    check "compose: MariaDB's record_session_event reaches the server's store ($out)" \
        grep -qE '^1[[:space:]]+NULL$' <<<"$out"

    compose down -v >/dev/null 2>&1
    check "compose: down -v leaves no container" \
        test -z "$(podman ps -a --filter "label=com.docker.compose.project=$prefix" --format '{{.Names}}')"
    check "compose: down -v leaves no volume" \
        test -z "$(podman volume ls --filter "label=com.docker.compose.project=$prefix" --format '{{.Name}}')"
    untag_compose_names
}

# ------------------------------------------------------------------------ clean-up
clean() {
    # Ours only: containers and images named with $prefix, the compose project's leftovers
    # and the build's intermediate layers. The stand-in bases stay (made again only when
    # docker/standin/ or this script's recipe changes).
    local c
    [ -n "${podman_compose:-}" ] && compose down -v >/dev/null 2>&1 || true
    for c in $(podman ps -a --format '{{.Names}}' | grep "^$prefix" || true); do podman rm -f "$c" >/dev/null; done
    # build containers an interrupted build left behind (buildah's, on our bases)
    for c in $(podman ps -a --external --format '{{.ID}} {{.Image}}' |
        awk -v a="$py_base" -v b="$db_base" '$2 == a || $2 == b { print $1 }'); do
        podman rm -f "$c" >/dev/null
    done
    untag_compose_names
    podman rmi -f "$app_image" "$local_image" "$db_image" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null
}

image_size() { podman image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }

summary() {
    local rc=$?
    [ -n "${work:-}" ] && rm -rf "$work"
    if [ "$step" = all ] && [ -z "${RECSQL_IMAGE_TEST_KEEP:-}" ]; then clean || true; fi
    if [ "${#figures[@]}" -gt 0 ]; then
        say "figures:"
        printf '  %s\n' "${figures[@]}" >&2
    fi
    [ "$rc" = 0 ] || [ "$failed" -gt 0 ] || failed=1  # stopped early: count it
    printf 'image-test: %d passed, %d failed\n' "$passed" "$failed"
    [ "$failed" = 0 ] && exit 0
    exit 1
}

main() {
    step=${1:-all}
    work=$(mktemp -d "${TMPDIR:-/tmp}/recsql-image-test.XXXXXX")
    trap summary EXIT
    case "$step" in
        # One after another, not joined with &&: set -e then also stops inside each step.
        setup) setup ;;
        bases) setup; bases ;;
        build) setup; bases; build ;;
        sagemaker) setup; sagemaker ;;
        compose) setup; compose_test ;;
        clean) setup; clean ;;
        all) setup; bases; build; sagemaker; compose_test ;;
        *) die "unknown step $step (all|setup|bases|build|sagemaker|compose|clean)" ;;
    esac
}

main "$@"
