#!/bin/sh
# The image's ENTRYPOINT (exec form). SageMaker starts the container as
# `docker run IMAGE serve` or `docker run IMAGE train`; anything else is a
# recsql subcommand (`docker run IMAGE evaluate ...`). Every branch `exec`s, so
# the server is PID 1 and receives SageMaker's SIGTERM itself (then SIGKILL 30 s
# later): gunicorn drains in-flight requests and exits.
set -eu

# Port the server answers on: SageMaker sets SAGEMAKER_BIND_TO_PORT in
# multi-container endpoints and inference pipelines; 8080 otherwise.
port="${SAGEMAKER_BIND_TO_PORT:-8080}"
marker="${RECSQL_PORT_FILE:-/tmp/recsql-serve.port}"

case "${1:-serve}" in
    serve)
        [ "$#" -gt 0 ] && shift
        # Leave the port for `healthcheck` (run later by Docker in the same container).
        printf '%s\n' "$port" > "$marker" 2>/dev/null || true
        # --container: bind 0.0.0.0, model from /opt/ml/model (or the /models API when
        # SageMaker sets SAGEMAKER_MULTI_MODEL=true); settings from SAGEMAKER_* variables.
        exec recsql serve --container --port "$port" "$@"
        ;;
    train)
        shift
        # With no further arguments, recsql train runs as a SageMaker training job:
        # /opt/ml/input/data/<channel> -> /opt/ml/model, reason in /opt/ml/output/failure.
        exec recsql train --no-progress "$@"
        ;;
    healthcheck)
        # Docker HEALTHCHECK: a serving container is healthy once GET /ping answers 200
        # (the server says so only after the model is loaded). Containers that are not
        # serving (train, one-shot commands) left no port file and count as healthy.
        [ -r "$marker" ] || exit 0
        exec python -c 'import sys, urllib.request
try:
    ok = urllib.request.urlopen(sys.argv[1], timeout=2).status == 200
except OSError:
    ok = False
sys.exit(0 if ok else 1)' "http://127.0.0.1:$(cat "$marker")/ping"
        ;;
    *)
        exec recsql "$@"
        ;;
esac
