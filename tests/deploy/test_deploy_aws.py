"""`recsql deploy` against moto's AWS (no network)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.awsrequest import AWSResponse
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends

from deploy import sagemaker as d
from model import load_model, safe_extract, save_mfblock
from model.errors import ArtifactError, BadRequest
from recsql_cli import main

REGION = "eu-west-1"
ROLE = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/recsql-sagemaker"
IMAGE = f"{DEFAULT_ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/recsql:latest"
BUCKET = "recsql-test-bucket"


def make_model(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = 3
    weights = {
        "user_embeddings.weight": rng.normal(size=(4, n)),
        "item_embeddings.weight": rng.normal(size=(5, n)),
        "dense_user.weight": rng.normal(size=(n, n)),
        "dense_user.bias": np.zeros(n),
        "dense_item.weight": rng.normal(size=(n, n)),
        "dense_item.bias": np.zeros(n),
    }
    return save_mfblock(path, weights, np.arange(10, 14), np.arange(100, 105))


def _update_endpoint_shim(request, **_kwargs):
    """moto 5.2 lacks UpdateEndpoint: do what SageMaker does once the update completes."""
    params = json.loads(request["body"])
    endpoint = sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].endpoints[params["EndpointName"]]
    endpoint.endpoint_config_name = params["EndpointConfigName"]
    response = AWSResponse(request["url_path"], 200, {}, None)
    return response, {"EndpointArn": endpoint.arn, "ResponseMetadata": {"HTTPStatusCode": 200}}


@pytest.fixture
def session(monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setattr(d.time, "sleep", lambda s: None)
    with mock_aws():
        sess = boto3.Session(region_name=REGION)
        sess.events.register(
            "before-call.sagemaker.UpdateEndpoint",
            lambda params, **kw: _update_endpoint_shim(params),
        )
        sess.client("s3").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        yield sess


def cfg() -> d.AwsConfig:
    return d.AwsConfig(REGION, ROLE, BUCKET, "recsql", IMAGE)


def spec(data: str, multi: bool = False) -> d.EndpointSpec:
    return d.EndpointSpec(
        "recsql-test",
        IMAGE,
        ROLE,
        data,
        multi_model=multi,
        environment={"SAGEMAKER_MODEL_SERVER_WORKERS": "2"},
    )


def test_package_round_trip(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path / "m")
    tar = d.package(model_dir, tmp_path / "out" / "model.tar.gz")
    with tarfile.open(tar) as archive:  # contents at the top level, as SageMaker extracts them
        assert sorted(archive.getnames()) == sorted(p.name for p in model_dir.iterdir())
    restored = load_model(safe_extract(tar, tmp_path / "restored"))
    users, products = np.array([10, 13, 11]), np.array([100, 104, 102])
    np.testing.assert_array_equal(
        restored.score(users, products), load_model(model_dir).score(users, products)
    )


def test_package_refuses_a_broken_model(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path / "m")
    (model_dir / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError):
        d.package(model_dir, tmp_path / "model.tar.gz")
    assert not (tmp_path / "model.tar.gz").exists()


def test_create_update_delete_and_clean_up(session, tmp_path: Path) -> None:
    (uri,) = d.package_to_s3(
        session,
        [make_model(tmp_path / "v1")],
        d.model_data_prefix(cfg(), "recsql-test"),
        progress=False,
    )
    assert uri.startswith(f"s3://{BUCKET}/recsql/recsql-test/") and uri.endswith("/model.tar.gz")
    config1 = d.deploy_endpoint(session, spec(uri), poll_s=0, progress=False)
    sm = session.client("sagemaker")
    model1 = sm.describe_model(ModelName=config1)
    assert model1["PrimaryContainer"]["ModelDataUrl"] == uri
    assert model1["PrimaryContainer"]["Image"] == IMAGE
    assert model1["PrimaryContainer"].get("Mode", "SingleModel") == "SingleModel"
    variant = sm.describe_endpoint_config(EndpointConfigName=config1)["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"]) == (config1, "ml.m5.large")
    assert sm.describe_endpoint(EndpointName="recsql-test")["EndpointStatus"] == "InService"
    with pytest.raises(BadRequest, match="exists"):
        d.deploy_endpoint(session, spec(uri), poll_s=0, progress=False)

    d.autoscale(session, "recsql-test", 1, 3, 500)
    # update: a new config and model, the old ones removed
    import deploy.sagemaker as module

    later = module.datetime(2099, 1, 1, tzinfo=module.UTC)
    config2 = d.stamped("recsql-test", later)
    orig = module.stamped
    module.stamped = lambda name, now=None: orig(name, later)
    try:
        assert d.update_endpoint(session, spec(uri), poll_s=0, progress=False) == config2
    finally:
        module.stamped = orig
    assert sm.describe_endpoint(EndpointName="recsql-test")["EndpointConfigName"] == config2
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [config2]
    configs = sm.list_endpoint_configs()["EndpointConfigs"]
    assert [c["EndpointConfigName"] for c in configs] == [config2]

    deleted = d.delete_endpoint(
        session, "recsql-test", purge_s3=f"s3://{BUCKET}/recsql/recsql-test/"
    )
    assert deleted[0] == "autoscaling target endpoint/recsql-test/variant/AllTraffic"
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert session.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    aas = session.client("application-autoscaling")
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_multi_model_endpoint(session, tmp_path: Path) -> None:
    dirs = [make_model(tmp_path / "alpha", 1), make_model(tmp_path / "beta", 2)]
    prefix = d.model_data_prefix(cfg(), "recsql-test") + "/models"
    uris = d.package_to_s3(session, dirs, prefix, progress=False)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["alpha.tar.gz", "beta.tar.gz"]
    config = d.deploy_endpoint(session, spec(prefix + "/", multi=True), poll_s=0, progress=False)
    container = session.client("sagemaker").describe_model(ModelName=config)["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == prefix + "/"


def test_autoscaling_policy(session, tmp_path: Path) -> None:
    d.deploy_endpoint(session, spec(f"s3://{BUCKET}/x/model.tar.gz"), poll_s=0, progress=False)
    policy = d.autoscale(session, "recsql-test", 2, 6, 750.0)
    aas = session.client("application-autoscaling")
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == "endpoint/recsql-test/variant/AllTraffic"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 6)
    (found,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    config = found["TargetTrackingScalingPolicyConfiguration"]
    assert found["PolicyName"] == policy and config["TargetValue"] == 750.0
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
        "SageMakerVariantInvocationsPerInstance"
    )
    with pytest.raises(BadRequest):
        d.autoscale(session, "recsql-test", 5, 2)
    with pytest.raises(BadRequest, match="no endpoint"):
        d.autoscale(session, "nope", 1, 2)


def test_batch_transform_job(session) -> None:
    d.deploy_endpoint(session, spec(f"s3://{BUCKET}/x/model.tar.gz"), poll_s=0, progress=False)
    sm = session.client("sagemaker")
    model = d.endpoint_model(sm, "recsql-test")
    job = d.batch_transform(session, model, f"s3://{BUCKET}/in/pairs.csv", f"s3://{BUCKET}/out/")
    info = sm.describe_transform_job(TransformJobName=job)
    assert info["ModelName"] == model and info["BatchStrategy"] == "MultiRecord"
    assert info["TransformInput"]["ContentType"] == "text/csv"
    assert info["TransformInput"]["SplitType"] == "Line"
    assert info["TransformOutput"]["AssembleWith"] == "Line"
    assert info["MaxPayloadInMB"] == 6
    assert d.wait_for_transform(sm, job)["TransformJobStatus"] == "Completed"
    with pytest.raises(BadRequest, match="S3 URI"):
        d.batch_transform(session, model, "/local/file.csv", f"s3://{BUCKET}/out/")


def test_cli_end_to_end(session, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(boto3, "Session", lambda region_name=None: session)
    model_dir = make_model(tmp_path / "m")
    base = ["--region", REGION, "--role", ROLE, "--bucket", BUCKET, "--image", IMAGE]
    assert (
        main(
            [
                "deploy",
                "endpoint",
                "recsql-cli",
                "--model-dir",
                str(model_dir),
                "--poll",
                "0",
                "--no-progress",
                *base,
            ]
        )
        == 0
    )
    assert "endpoint recsql-cli: InService" in capsys.readouterr().out
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("10,100\n11,101\n")
    assert (
        main(
            [
                "deploy",
                "transform",
                "--endpoint",
                "recsql-cli",
                "--input",
                str(pairs),
                "--region",
                REGION,
                "--bucket",
                BUCKET,
                "--no-progress",
                "--wait",
            ]
        )
        == 0
    )
    assert "Completed" in capsys.readouterr().out
    assert (
        main(
            ["deploy", "delete", "recsql-cli", "--purge-s3", "--region", REGION, "--bucket", BUCKET]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "deleted endpoint recsql-cli" in out and "objects under" in out
    keys = session.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert [k["Key"] for k in keys] == ["recsql/transform-input/pairs.csv"]


def test_cli_errors_are_one_line(session, monkeypatch, capsys, tmp_path: Path) -> None:
    for var in ("RECSQL_ROLE_ARN", "RECSQL_IMAGE_URI", "RECSQL_S3_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    model_dir = make_model(tmp_path / "m")
    assert main(["deploy", "endpoint", "e1", "--model-dir", str(model_dir)]) == 1
    assert "no role arn: give --role or set RECSQL_ROLE_ARN" in capsys.readouterr().err
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert main(["deploy", "delete", "e1"]) == 1
    assert "no AWS region" in capsys.readouterr().err
    assert main(["deploy", "delete", "bad_name", "--region", REGION]) == 1
    assert "bad endpoint name" in capsys.readouterr().err
    assert main(["deploy", "delete", "missing", "--region", REGION]) == 1
    assert "no endpoint 'missing'" in capsys.readouterr().err
    assert (
        main(
            [
                "deploy",
                "endpoint",
                "e1",
                "--model-data",
                "s3://nobucket-x/m.tar.gz",
                "--region",
                REGION,
                "--role",
                ROLE,
                "--image",
                IMAGE,
                "--env",
                "NOEQUALS",
            ]
        )
        == 1
    )
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_upload_to_a_missing_bucket_says_so(session, tmp_path: Path) -> None:
    f = tmp_path / "model.tar.gz"
    f.write_bytes(b"x")
    with pytest.raises(BadRequest, match="aws s3 mb"):
        d.upload(session.client("s3"), f, "s3://no-such-bucket-recsql/k/", progress=False)


def test_ecr_commands(capsys, monkeypatch) -> None:
    assert (
        main(
            [
                "deploy",
                "ecr-commands",
                "--account",
                "123456789012",
                "--region",
                REGION,
                "--variant",
                "gpu",
                "--tag",
                "v1",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    image = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/recsql:v1"
    assert any(ln.startswith("aws ecr get-login-password") and "docker login" in ln for ln in lines)
    assert f"docker build --platform linux/amd64 --build-arg VARIANT=gpu -t {image} ." in lines
    assert f"docker push {image}" in lines
    assert main(["deploy", "ecr-commands", "--account", "12", "--region", REGION]) == 1


def test_deploy_help_explains(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "package",
        "endpoint",
        "update",
        "delete",
        "transform",
        "ecr-commands",
        "autoscale",
        "weights",
        "--variant",
        "pipeline",
        "RECSQL_ROLE_ARN",
        "RECSQL_S3_BUCKET",
    ):
        assert word in out
