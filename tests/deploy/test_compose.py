"""docker-compose.yml: valid against the Compose schema, wired as the README says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from recsql_cli import build_parser
from tests.deploy.dockerfile import ROOT, parse

SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
RAW = (ROOT / "docker-compose.yml").read_text()


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} / ${VAR:-default} substitution (the forms this file uses)."""

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)


COMPOSE = yaml.safe_load(interpolate(RAW, {}))
SERVICES = COMPOSE["services"]
RECSQL = ("events", "trainer", "server")


def volumes(service: str) -> dict[str, tuple[str, str]]:
    """target -> (volume name, mode)."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        name, target, *mode = spec.split(":")
        out[target] = (name, mode[0] if mode else "rw")
    return out


def test_valid_against_the_compose_schema() -> None:
    jsonschema.validate(COMPOSE, SCHEMA, cls=jsonschema.Draft7Validator)


def test_schema_rejects_a_broken_file() -> None:
    broken = yaml.safe_load(interpolate(RAW, {}))
    broken["services"]["server"]["depends_on"]["trainer"]["condition"] = "service_finished"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft7Validator)


def test_start_order() -> None:
    def after(service: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in SERVICES[service]["depends_on"].items()}

    assert set(SERVICES) == {"events", "trainer", "redis", "server", "mariadb"}
    assert after("trainer") == {"events": "service_completed_successfully"}
    assert after("server") == {
        "trainer": "service_completed_successfully",
        "redis": "service_healthy",
    }
    assert after("mariadb") == {"server": "service_healthy"}
    for one_shot in ("events", "trainer"):
        assert SERVICES[one_shot]["restart"] == "no"


def test_health_checks() -> None:
    server = SERVICES["server"]["healthcheck"]
    assert server["test"] == ["CMD", "/usr/local/bin/recsql-entrypoint", "healthcheck"]
    assert "healthcheck.sh" in SERVICES["mariadb"]["healthcheck"]["test"]
    for service in ("redis", "server", "mariadb"):
        check = SERVICES[service]["healthcheck"]
        assert check["retries"] >= 3 and check["start_period"]


def test_server_keeps_fresh_events_in_the_redis_service() -> None:
    url = urlsplit(SERVICES["server"]["environment"]["RECSQL_EVENTS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    redis = SERVICES["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # reached by the server on the compose network only
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-ttl"
    assert command[command.index("--save") + 1] == ""


def test_model_flows_from_trainer_to_server() -> None:
    assert volumes("events")["/opt/ml/output/data"] == ("events", "rw")
    assert volumes("trainer")["/opt/ml/input/data/train"] == ("events", "ro")
    assert volumes("trainer")["/opt/ml/model"] == ("model", "rw")
    assert volumes("server")["/opt/ml/model"] == ("model", "ro")
    assert volumes("mariadb")["/var/lib/mysql"] == ("mariadb-data", "rw")
    assert set(COMPOSE["volumes"]) == {"events", "model", "train-output", "mariadb-data"}
    out = SERVICES["events"]["command"]
    assert "--out=/opt/ml/output/data/events.csv" in out


def test_writable_volumes_start_owned_by_the_container_user() -> None:
    # Docker gives a new named volume the owner of the image folder it is mounted on;
    # a path the image lacks would be root's, and uid 10001 could not write to it.
    _, stages = parse()
    app = next(s for s in stages if s.name == "app")
    run = " ".join(i.value for i in app.all("RUN"))
    mkdir = re.search(r"mkdir -p ([^&]+)", run).group(1).split()
    made = {str(p) for d in mkdir for p in [Path(d), *Path(d).parents]}
    for service in RECSQL:
        assert SERVICES[service]["user"] == "10001:10001"
        for target, (_, mode) in volumes(service).items():
            if mode == "rw":
                assert target in made, f"{service}: {target} does not exist in the image"


def test_images_come_from_the_dockerfile_stages() -> None:
    _, stages = parse()
    names = {s.name for s in stages}
    for service in RECSQL:
        assert SERVICES[service]["build"]["target"] == "local" and "local" in names
        assert SERVICES[service]["image"] == "recsql:local"
    assert SERVICES["mariadb"]["build"]["target"] == "mariadb" and "mariadb" in names


def test_commands_parse_with_the_real_cli() -> None:
    parser = build_parser()
    synth = parser.parse_args(SERVICES["events"]["command"])
    assert synth.command == "synth" and synth.rows == 200000 and synth.seed == 0
    # the entrypoint turns `train` into `recsql train --no-progress` (SageMaker mode)
    assert SERVICES["trainer"]["command"] == ["train"]
    train = parser.parse_args(["train", "--no-progress"])
    assert train.inputs == []
    assert SERVICES["server"]["command"] == ["serve"]
    serve = parser.parse_args(["serve", "--container", "--port", "8080"])
    assert serve.container is True


def test_hyperparameters_are_sagemaker_strings() -> None:
    hps = json.loads(SERVICES["trainer"]["environment"]["SM_HPS"])
    assert hps == {"epochs": "3", "num_embeddings": "64"}
    custom = yaml.safe_load(interpolate(RAW, {"RECSQL_DEMO_EPOCHS": "7"}))
    assert json.loads(custom["services"]["trainer"]["environment"]["SM_HPS"])["epochs"] == "7"


def test_host_ports_bind_loopback_only() -> None:
    for service in SERVICES.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert SERVICES["server"]["ports"] == ["127.0.0.1:8080:8080"]


def test_allow_list_and_init_sql_match_the_compose_network() -> None:
    conf = (ROOT / "docker/mariadb/recsql-endpoints.conf").read_text()
    entries = [ln.split() for ln in conf.splitlines() if ln.strip() and not ln.startswith("#")]
    names = {e[0]: e[1] for e in entries}
    assert names["recsql"] == "http://server:8080/invocations"  # service name, container port
    sql = (ROOT / "docker/mariadb/initdb/10-recsql-functions.sql").read_text()
    assert "SONAME 'recsql_udf.so'" in sql
    for endpoint in re.findall(r"recsql_invoke\('([^']+)'", sql):
        assert endpoint in names


def test_init_sql_is_generated_from_db() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker/mariadb/make_initdb.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    committed = (ROOT / "docker/mariadb/initdb/10-recsql-functions.sql").read_text()
    assert committed == out.stdout, "regenerate: python docker/mariadb/make_initdb.py > ..."


@pytest.mark.mysql
def test_init_sql_runs_in_the_mariadb_client() -> None:
    """Feed the init script to the `mariadb` client, as the image's entrypoint does, in a
    scratch database; then call the function with NULLs (NULL back, no request made)."""
    client = shutil.which("mariadb") or shutil.which("mysql")
    url = urlsplit(os.environ.get("RECSQL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"))
    base = [
        client or "mariadb",
        f"--host={url.hostname}",
        f"--port={url.port or 3306}",
        f"--user={url.username or 'root'}",
        "--batch",
        "--skip-column-names",
    ]
    env = {**os.environ, "MYSQL_PWD": url.password or ""}

    def sql(statement: str, database: str | None = None, stdin: str | None = None) -> str:
        args = (
            base
            + ([f"--database={database}"] if database else [])
            + (["-e", statement] if statement else [])
        )
        out = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        registered = sql("SELECT name FROM mysql.func WHERE dl = 'recsql_udf.so'").split()
    except (AssertionError, FileNotFoundError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no MariaDB client/server here: {exc}")
    script = (ROOT / "docker/mariadb/initdb/10-recsql-functions.sql").read_text()
    if "recsql_invoke" not in registered:  # plugin not installed on this server: DDL only
        script = "\n".join(ln for ln in script.splitlines() if "SONAME" not in ln)
    db = f"recsql_deploy_{uuid.uuid4().hex[:8]}"
    sql(f"CREATE DATABASE {db}")
    try:
        sql("", db, stdin=script)
        names = sql(f"SELECT name FROM mysql.proc WHERE db = '{db}' ORDER BY name").split()
        assert names == [
            "record_event",
            "record_session_event",
            "similar_score",
            "similar_score_strict",
            "will_purchase",
            "will_purchase_strict",
        ]
        if "recsql_invoke" in registered:
            assert sql("SELECT will_purchase(NULL, NULL)", db).strip() == "NULL"
            assert sql("SELECT record_event(NULL, 1, NULL, NULL)", db).strip() == "NULL"
    finally:
        sql(f"DROP DATABASE {db}")
