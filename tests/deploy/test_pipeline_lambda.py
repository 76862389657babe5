"""The SageMaker Pipelines definition and the Lambda handler, against moto."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from deploy import lambda_handler
from deploy.pipeline import SCHEMA_VERSION, pipeline_definition, step_references
from recsql_cli import main
from tests.deploy.dockerfile import ROOT

REGION = "eu-west-1"
ROLE = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/recsql-sagemaker"
IMAGE = f"{DEFAULT_ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/recsql:latest"
LAMBDA = f"arn:aws:lambda:{REGION}:{DEFAULT_ACCOUNT_ID}:function:recsql-deploy"


@pytest.fixture
def session(monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    with mock_aws():
        yield boto3.Session(region_name=REGION)


def test_pipeline_steps_refer_to_what_exists() -> None:
    definition = pipeline_definition(IMAGE, ROLE, "bucket", deploy_lambda_arn=LAMBDA)
    assert definition["Version"] == SCHEMA_VERSION
    names = [s["Name"] for s in definition["Steps"]]
    assert names == ["Prepare", "Train", "CreateModel", "Deploy"]
    params = {p["Name"] for p in definition["Parameters"]}
    refs = step_references(definition)
    assert {r.split(".")[1] for r in refs if r.startswith("Parameters.")} <= params
    # a step only reads properties of steps before it: that is the run order
    for index, step in enumerate(definition["Steps"]):
        used = {
            r.split(".")[1] for r in step_references({"Steps": [step]}) if r.startswith("Steps.")
        }
        assert used <= set(names[:index]), step["Name"]
    train = definition["Steps"][1]["Arguments"]
    assert train["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert train["InputDataConfig"][0]["ChannelName"] == "train"
    prepare = definition["Steps"][0]["Arguments"]["AppSpecification"]["ContainerEntrypoint"]
    assert prepare[:2] == ["/usr/local/bin/recsql-entrypoint", "prepare"]
    # the prepare command line is one the real CLI accepts
    from recsql_cli import build_parser

    assert build_parser().parse_args(prepare[1:]).command == "prepare"


def test_pipeline_without_lambda_stops_at_the_model() -> None:
    definition = pipeline_definition(IMAGE, ROLE, "bucket")
    assert [s["Name"] for s in definition["Steps"]] == ["Prepare", "Train", "CreateModel"]


def test_pipeline_cli_upserts(session, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(boto3, "Session", lambda region_name=None: session)
    out = tmp_path / "pipeline.json"
    args = [
        "deploy",
        "pipeline",
        "--region",
        REGION,
        "--role",
        ROLE,
        "--bucket",
        "b",
        "--image",
        IMAGE,
        "--deploy-lambda-arn",
        LAMBDA,
        "--out",
        str(out),
        "--upsert",
    ]
    assert main(args) == 0
    assert main(args) == 0  # the second run updates
    stored = session.client("sagemaker").describe_pipeline(PipelineName="recsql")
    assert json.loads(stored["PipelineDefinition"]) == json.loads(out.read_text())
    assert "pipeline recsql: arn:aws:sagemaker" in capsys.readouterr().out


def _s3_event(bucket: str, key: str) -> dict:
    return {
        "Records": [
            {"eventSource": "aws:s3", "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}
        ]
    }


def test_lambda_starts_training_on_upload(session, monkeypatch) -> None:
    monkeypatch.setenv("RECSQL_IMAGE_URI", IMAGE)
    monkeypatch.setenv("RECSQL_ROLE_ARN", ROLE)
    monkeypatch.setenv("RECSQL_OUTPUT_S3", "s3://b/recsql/training/")
    monkeypatch.setenv("RECSQL_HYPERPARAMETERS", '{"epochs": 5, "opt": "sgd"}')
    result = lambda_handler.handler(
        _s3_event("b", "recsql/events/2019-Oct+part.csv"), None, session=session
    )
    (job,) = result["training_jobs"]
    info = session.client("sagemaker").describe_training_job(TrainingJobName=job)
    assert info["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert info["HyperParameters"] == {"epochs": "5", "opt": "sgd"}
    source = info["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    assert source == "s3://b/recsql/events/"


def test_lambda_refuses_without_settings(session, monkeypatch) -> None:
    for var in ("RECSQL_IMAGE_URI", "RECSQL_ROLE_ARN", "RECSQL_OUTPUT_S3"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="RECSQL_IMAGE_URI"):
        lambda_handler.handler(_s3_event("b", "k.csv"), None, session=session)
    with pytest.raises(ValueError, match="expected an S3 event"):
        lambda_handler.handler({"Records": []}, None, session=session)


def test_lambda_deploy_step_creates_the_endpoint(session) -> None:
    sm = session.client("sagemaker")
    sm.create_model(ModelName="m1", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": IMAGE})
    event = {"action": "deploy", "model_name": "m1", "endpoint_name": "recsql-pipe"}
    result = lambda_handler.handler(event, None, session=session)
    assert result["action"] == "created"
    endpoint = sm.describe_endpoint(EndpointName="recsql-pipe")
    assert endpoint["EndpointConfigName"] == result["endpoint_config"]
    with pytest.raises(ValueError, match="bad model_name"):
        lambda_handler.handler({**event, "model_name": "x;y"}, None, session=session)


def test_lambda_module_needs_only_the_standard_library_and_boto3(tmp_path: Path) -> None:
    # Lambda ships this one file: it must import without the rest of recsql.
    with zipfile.ZipFile(tmp_path / "fn.zip", "w") as archive:
        archive.write(ROOT / "deploy" / "lambda_handler.py", "lambda_handler.py")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import lambda_handler; print('ok')"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path / "fn.zip")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "ok", out.stderr
