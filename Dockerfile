# syntax=docker/dockerfile:1.7
#
# recsql images, one Dockerfile:
#
#   docker build -t recsql .                               SageMaker image, CPU (default)
#   docker build --build-arg VARIANT=gpu -t recsql:gpu .   the same on a CUDA PyTorch base
#   docker build --target local -t recsql:local .          same files, runs as user recsql
#   docker build --target mariadb -t recsql-mariadb .      MariaDB 10.11 + the recsql function
#
# The recsql image takes `train` or `serve` as its first argument, as SageMaker
# runs it (`docker run IMAGE train` / `docker run IMAGE serve`); any other
# argument is a recsql subcommand (`docker run IMAGE evaluate ...`).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
# The GPU base was not pulled where this file was written: check that the tag
# exists and ships torch 2.13.0 (any CUDA 12 runtime tag of that release works).
ARG GPU_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG MARIADB_IMAGE=mariadb:10.11

# ---------------------------------------------------------------- MariaDB image
# The loadable function is built on the same base as the server that loads it,
# so the C library and libcurl match at run time.
FROM ${MARIADB_IMAGE} AS udf-build
# Build tools only live in this stage; distro versions are pinned by the base tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc make libc6-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src/udf
COPY db/udf/ ./
RUN make && test -f recsql_udf.so

FROM ${MARIADB_IMAGE} AS mariadb
# libcurl is the function's one run-time dependency.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcurl4 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=udf-build --chmod=0644 /src/udf/recsql_udf.so /usr/lib/mysql/plugin/recsql_udf.so
# The endpoint allow-list: SQL passes an endpoint *name*, never a URL. The function
# refuses a list that group or others may write.
COPY --chmod=0644 docker/mariadb/recsql-endpoints.conf /etc/mysql/recsql-endpoints.conf
# Runs once, on first start with an empty data volume.
COPY --chmod=0644 docker/mariadb/initdb/ /docker-entrypoint-initdb.d/
LABEL org.opencontainers.image.title="recsql-mariadb" \
      org.opencontainers.image.description="MariaDB with the recsql_invoke loadable function"

# ------------------------------------------------------------------ recsql image
FROM ${PYTHON_IMAGE} AS cpu-base
ARG TORCH_VERSION=2.13.0
# The CPU wheel: the default PyPI wheel pulls several GB of CUDA libraries. A build
# that cannot reach this index passes another that holds the CPU wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

FROM ${GPU_IMAGE} AS gpu-base
# torch with CUDA comes with the base image.

# hadolint ignore=DL3006
FROM ${VARIANT}-base AS app
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/recsql

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md recsql_cli.py setup.py ./
COPY model/ model/
COPY training/ training/
COPY serve/ serve/
COPY db/ db/
COPY deploy/ deploy/
COPY abtest/ abtest/
# model/_native.c (tabular CSV decoding, tree walking, score formatting) is compiled
# here and the compiler leaves in the same layer. The sources go too, so that every
# import, from any directory, is of the installed package with its built kernels.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir --no-deps . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* build ./*.egg-info model training serve db deploy recsql_cli.py setup.py \
    && python -c "from model.native import library; library()" \
    && recsql --help > /dev/null

# A fixed uid/gid so volumes can be prepared for it (docker-compose.yml uses it).
# /opt/ml is SageMaker's tree; created here so the image also runs outside SageMaker.
RUN groupadd --system --gid 10001 recsql \
    && useradd --system --uid 10001 --gid recsql --home-dir /home/recsql --create-home recsql \
    && mkdir -p /opt/ml/model /opt/ml/models /opt/ml/input/data /opt/ml/input/config \
        /opt/ml/output/data \
    && chown -R recsql:recsql /opt/ml
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/recsql-entrypoint

# SageMaker capabilities: the server honours SAGEMAKER_BIND_TO_PORT (multi-container
# endpoints, inference pipelines) and implements the multi-model /models API.
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      com.amazonaws.sagemaker.capabilities.multi-models=true \
      org.opencontainers.image.title="recsql" \
      org.opencontainers.image.description="recsql model server and trainer (SageMaker-compatible)" \
      org.opencontainers.image.licenses="Apache-2.0"
EXPOSE 8080
# Healthy once /ping answers 200, i.e. after the model is loaded; a `train`
# container has no server and reports healthy. SageMaker ignores this and pings itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/recsql-entrypoint", "healthcheck"]
# Exec form: the entrypoint script `exec`s recsql, so SIGTERM reaches the server.
ENTRYPOINT ["/usr/local/bin/recsql-entrypoint"]
CMD ["serve"]

# Local use (docker-compose.yml): the same image as an unprivileged user.
FROM app AS local
USER 10001:10001

# The default target, for SageMaker. It stays root: SageMaker's documentation
# requires the inference container to run as root (it copies the model in and
# mounts /opt/ml as root), so a USER here breaks endpoints and training jobs.
FROM app AS sagemaker
