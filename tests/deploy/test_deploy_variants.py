"""`recsql deploy` with several variants, a shadow, data capture, autoscaling and weights.

Against moto. moto 5 stores production variants, their weights and DataCaptureConfig, and
implements UpdateEndpointWeightsAndCapacities and Application Auto Scaling; it drops
ShadowProductionVariants silently, so for shadows these tests check the request we send
(recorded with botocore's before-parameter-build event) and put the shadow back into
DescribeEndpointConfig the way SageMaker returns it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from deploy import cli
from deploy import sagemaker as d
from model.errors import BadRequest
from recsql_cli import main
from tests.deploy.test_deploy_aws import (
    BUCKET,
    IMAGE,
    REGION,
    ROLE,
    _update_endpoint_shim,
    make_model,
)

BASE = ["--region", REGION, "--role", ROLE, "--bucket", BUCKET, "--image", IMAGE]
CAPTURE = f"s3://{BUCKET}/capture"


class Aws:
    """A moto session plus every SageMaker request sent through it, by operation."""

    def __init__(self) -> None:
        self.session = boto3.Session(region_name=REGION)
        self.sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.order: list[str] = []  # operation names, SageMaker and Auto Scaling, as sent
        events = self.session.events
        events.register("before-parameter-build.sagemaker", self._record)
        events.register("before-parameter-build.application-auto-scaling", self._record)
        events.register("after-call.sagemaker.DescribeEndpointConfig", self._shadow_back)
        events.register(
            "before-call.sagemaker.UpdateEndpoint",
            lambda params, **kw: _update_endpoint_shim(params),
        )

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.sent[model.name].append(copy.deepcopy(params))
        self.order.append(model.name)

    def _shadow_back(self, parsed: dict[str, Any], **_: Any) -> None:
        """What SageMaker (not moto) answers: the shadow variants of the config."""
        for request in self.sent["CreateEndpointConfig"]:
            if request["EndpointConfigName"] == parsed.get("EndpointConfigName"):
                if "ShadowProductionVariants" in request:
                    parsed["ShadowProductionVariants"] = request["ShadowProductionVariants"]

    def last(self, operation: str) -> dict[str, Any]:
        return self.sent[operation][-1]

    @property
    def sm(self) -> Any:
        return self.session.client("sagemaker")


@pytest.fixture
def aws(monkeypatch) -> Any:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setattr(d.time, "sleep", lambda s: None)
    with mock_aws():
        world = Aws()
        world.session.client("s3").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        monkeypatch.setattr(boto3, "Session", lambda region_name=None: world.session)
        yield world


def ab_spec(*variants: d.Variant, **kw: Any) -> d.EndpointSpec:
    return d.EndpointSpec("recsql-ab", IMAGE, ROLE, variants=list(variants), **kw)


def data(name: str) -> str:
    return f"s3://{BUCKET}/models/{name}/model.tar.gz"


# ----------------------------------------------------------------- library


def test_variants_and_capture_request_and_stored_config(aws) -> None:
    spec = ab_spec(
        d.Variant("A", data("a"), 0.9),
        d.Variant("B", data("b"), 0.1),
        capture=d.DataCapture(CAPTURE, 20),
        instance_type="ml.c5.large",
        instance_count=2,
    )
    config = d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    sent = aws.last("CreateEndpointConfig")
    assert sent["EndpointConfigName"] == config
    models = {v["VariantName"]: v["ModelName"] for v in sent["ProductionVariants"]}
    assert len(set(models.values())) == 2  # each variant its own model
    assert sent["ProductionVariants"] == [
        {
            "VariantName": name,
            "ModelName": models[name],
            "InitialInstanceCount": 2,
            "InstanceType": "ml.c5.large",
            "InitialVariantWeight": weight,
        }
        for name, weight in (("A", 0.9), ("B", 0.1))
    ]
    assert "ShadowProductionVariants" not in sent
    expected_capture = {
        "EnableCapture": True,
        "InitialSamplingPercentage": 20,
        "DestinationS3Uri": CAPTURE,
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {
            "CsvContentTypes": ["text/csv"],
            "JsonContentTypes": ["application/json", "application/jsonlines"],
        },
    }
    assert sent["DataCaptureConfig"] == expected_capture
    # what moto stored: the config, the models behind it, the endpoint's weights
    stored = aws.sm.describe_endpoint_config(EndpointConfigName=config)
    assert [
        (v["VariantName"], v["InitialVariantWeight"]) for v in stored["ProductionVariants"]
    ] == [
        ("A", 0.9),
        ("B", 0.1),
    ]
    assert stored["DataCaptureConfig"] == expected_capture
    for name, model in models.items():
        container = aws.sm.describe_model(ModelName=model)["PrimaryContainer"]
        assert container["ModelDataUrl"] == data(name.lower()) and container["Image"] == IMAGE
        assert model.startswith(f"recsql-ab-{name}-")
    endpoint = aws.sm.describe_endpoint(EndpointName="recsql-ab")
    assert {v["VariantName"]: v["CurrentWeight"] for v in endpoint["ProductionVariants"]} == {
        "A": 0.9,
        "B": 0.1,
    }
    assert d.describe_variants(endpoint) == [
        "  A: weight 0.9 (90.0% of traffic), 2 instance(s)",
        "  B: weight 0.1 (10.0% of traffic), 2 instance(s)",
    ]


def test_shadow_request_and_clean_up(aws) -> None:
    spec = d.EndpointSpec(
        "recsql-ab",
        IMAGE,
        ROLE,
        data("live"),  # the plain single model keeps its AllTraffic name
        shadow=d.Variant("candidate", data("candidate"), 0.5),
    )
    config = d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    sent = aws.last("CreateEndpointConfig")
    (production,) = sent["ProductionVariants"]
    (shadow,) = sent["ShadowProductionVariants"]
    assert production["VariantName"] == "AllTraffic" and production["InitialVariantWeight"] == 1.0
    assert shadow["VariantName"] == "candidate" and shadow["InitialVariantWeight"] == 0.5
    assert shadow["InstanceType"] == production["InstanceType"] == "ml.m5.large"
    assert production["ModelName"] != shadow["ModelName"]
    shadow_model = aws.sm.describe_model(ModelName=shadow["ModelName"])
    assert shadow_model["PrimaryContainer"]["ModelDataUrl"] == data("candidate")
    # delete removes the shadow's model too (read from DescribeEndpointConfig)
    deleted = d.delete_endpoint(aws.session, "recsql-ab")
    assert f"endpoint config {config}" in deleted
    assert f"model {shadow['ModelName']}" in deleted
    assert aws.sm.list_models()["Models"] == []


def test_update_from_one_model_to_variants(aws) -> None:
    single = d.EndpointSpec("recsql-ab", IMAGE, ROLE, data("v1"))
    old = d.deploy_endpoint(aws.session, single, poll_s=0, progress=False)
    import deploy.sagemaker as module

    later = module.datetime(2099, 1, 1, tzinfo=module.UTC)
    orig = module.stamped
    module.stamped = lambda name, now=None: orig(name, later)
    try:
        spec = ab_spec(d.Variant("A", data("v1"), 4), d.Variant("B", data("v2"), 1))
        new = d.update_endpoint(aws.session, spec, poll_s=0, progress=False)
    finally:
        module.stamped = orig
    assert new != old
    assert aws.sm.describe_endpoint(EndpointName="recsql-ab")["EndpointConfigName"] == new
    names = sorted(m["ModelName"] for m in aws.sm.list_models()["Models"])
    assert names == [f"recsql-ab-A-{d.utc_stamp(later)}", f"recsql-ab-B-{d.utc_stamp(later)}"]


def test_update_releases_autoscaling_of_removed_variants(aws) -> None:
    """SageMaker refuses an update that drops an autoscaled variant: deregister it first."""
    spec = ab_spec(d.Variant("A", data("a")), d.Variant("B", data("b")))
    d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    for variant in ("A", "B"):
        d.autoscale(aws.session, "recsql-ab", 1, 2, variant=variant)
    aas = aws.session.client("application-autoscaling")
    with pytest.MonkeyPatch.context() as patch:
        later = d.datetime(2099, 1, 1, tzinfo=d.UTC)
        patch.setattr(d, "utc_stamp", lambda now=None: later.strftime("%Y%m%d-%H%M%S"))
        d.update_endpoint(
            aws.session,
            ab_spec(d.Variant("A", data("a2")), d.Variant("C", data("c"))),
            poll_s=0,
            progress=False,
        )
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [t["ResourceId"] for t in targets] == ["endpoint/recsql-ab/variant/A"]
    # B's target went before the update call, which would have failed with it
    (deregistered,) = aws.sent["DeregisterScalableTarget"]
    assert deregistered["ResourceId"] == "endpoint/recsql-ab/variant/B"
    assert aws.order.index("DeregisterScalableTarget") < aws.order.index("UpdateEndpoint")


def test_spec_errors_before_any_aws_call(aws) -> None:
    cases = [
        (ab_spec(d.Variant("A", data("a")), d.Variant("A", data("b"))), "A given twice"),
        (ab_spec(d.Variant("a_b", data("a"))), "bad variant name 'a_b'"),
        (ab_spec(d.Variant("-a", data("a"))), "bad variant name"),
        (ab_spec(d.Variant("A", data("a"), -1)), "weight -1 must be a number >= 0"),
        (ab_spec(d.Variant("A", data("a"), float("nan"))), "must be a number"),
        (ab_spec(d.Variant("A", data("a"), 0), d.Variant("B", data("b"), 0)), "every"),
        (
            ab_spec(
                d.Variant("A", data("a")),
                d.Variant("B", data("b")),
                shadow=d.Variant("S", data("s")),
            ),
            "exactly one production variant",
        ),
        (ab_spec(d.Variant("A", data("a")), shadow=d.Variant("S", data("s"), 0)), "> 0"),
        (ab_spec(d.Variant("A", data("a")), shadow=d.Variant("A", data("s"))), "twice"),
        (ab_spec(d.Variant("A", data("a")), multi_model=True), "multi-model"),
        (ab_spec(d.Variant("A", data("a")), capture=d.DataCapture(CAPTURE, 101)), "0..100"),
        (ab_spec(d.Variant("A", data("a")), capture=d.DataCapture("/tmp/x")), "S3 URI"),
        (ab_spec(d.Variant("x" * 40, data("a")), d.Variant("x" * 41, data("b"))), "too long"),
    ]
    for spec, message in cases:
        with pytest.raises(BadRequest, match=message):
            d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    assert "CreateModel" not in aws.sent and "CreateEndpointConfig" not in aws.sent


def test_set_weights(aws) -> None:
    spec = ab_spec(d.Variant("A", data("a"), 0.9), d.Variant("B", data("b"), 0.1))
    d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    info = d.set_weights(aws.session, "recsql-ab", {"A": 0.5, "B": 0.5}, poll_s=0)
    assert aws.last("UpdateEndpointWeightsAndCapacities") == {
        "EndpointName": "recsql-ab",
        "DesiredWeightsAndCapacities": [
            {"VariantName": "A", "DesiredWeight": 0.5},
            {"VariantName": "B", "DesiredWeight": 0.5},
        ],
    }
    assert info["EndpointStatus"] == "InService"
    assert {v["VariantName"]: v["CurrentWeight"] for v in info["ProductionVariants"]} == {
        "A": 0.5,
        "B": 0.5,
    }
    # one variant only: the other keeps its weight; 0 drains a variant
    d.set_weights(aws.session, "recsql-ab", {"B": 0.0}, poll_s=0)
    weights = {
        v["VariantName"]: v["CurrentWeight"]
        for v in aws.sm.describe_endpoint(EndpointName="recsql-ab")["ProductionVariants"]
    }
    assert weights == {"A": 0.5, "B": 0.0}
    calls = len(aws.sent["UpdateEndpointWeightsAndCapacities"])
    for weights_in, message in (
        ({"C": 1.0}, "has no variant C .it has A, B."),
        ({"A": 0.0}, "every production variant weight is 0"),  # B is at 0 already
        ({"A": -0.5}, "must be a number >= 0"),
        ({}, "at least one"),
    ):
        with pytest.raises(BadRequest, match=message):
            d.set_weights(aws.session, "recsql-ab", weights_in, poll_s=0)
    with pytest.raises(BadRequest, match="no endpoint 'nope'"):
        d.set_weights(aws.session, "nope", {"A": 1.0}, poll_s=0)
    assert len(aws.sent["UpdateEndpointWeightsAndCapacities"]) == calls  # nothing sent


def test_autoscale_checks_the_variant(aws) -> None:
    d.deploy_endpoint(aws.session, ab_spec(d.Variant("A", data("a"))), poll_s=0, progress=False)
    with pytest.raises(BadRequest, match="no variant AllTraffic .it has A."):
        d.autoscale(aws.session, "recsql-ab", 1, 2)


# --------------------------------------------------------------------- CLI


def test_parse_variant(tmp_path: Path) -> None:
    assert cli._parse_variant("A=s3://b/k/model.tar.gz", "--variant") == d.Variant(
        "A", "s3://b/k/model.tar.gz", 1.0
    )
    assert cli._parse_variant("A=s3://b/k/model.tar.gz:0.25", "--variant") == d.Variant(
        "A", "s3://b/k/model.tar.gz", 0.25
    )
    (tmp_path / "v2").mkdir()
    assert cli._parse_variant(f"B-2={tmp_path}/v2:3", "--shadow") == d.Variant(
        "B-2", f"{tmp_path}/v2", 3.0
    )
    for bad, message in (
        ("A=model:abc", "weight 'abc' is not a number"),
        ("A", "expected NAME=MODEL_DIR_OR_S3_URI"),
        ("=model", "expected NAME="),
        ("A=:1", "no model directory"),
        ("a.b=model", "bad variant name"),
        ("A=no-such-dir:2", "no-such-dir is not a model directory"),
    ):
        with pytest.raises(BadRequest, match=message):
            cli._parse_variant(bad, "--variant")


def test_cli_variants_autoscale_capture_then_weights(aws, tmp_path: Path, capsys) -> None:
    model_dir = make_model(tmp_path / "m")
    b_data = data("b")
    argv = ["deploy", "endpoint", "recsql-ab", "--variant", f"A={model_dir}:3"]
    argv += ["--variant", f"B={b_data}", "--autoscale", "1:3:400", "--capture-s3", CAPTURE]
    argv += ["--capture-percent", "20", "--poll", "0", "--no-progress", *BASE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "endpoint recsql-ab: InService" in out and "2 variant(s)" in out
    assert "  A: weight 3 (75.0% of traffic), 1 instance(s)" in out
    assert "  B: weight 1 (25.0% of traffic), 1 instance(s)" in out
    sent = aws.last("CreateEndpointConfig")
    assert sent["DataCaptureConfig"]["InitialSamplingPercentage"] == 20
    # A's directory was packaged and uploaded under its own folder; B's S3 URI kept as given
    urls = {
        v["VariantName"]: aws.sm.describe_model(ModelName=v["ModelName"])["PrimaryContainer"][
            "ModelDataUrl"
        ]
        for v in sent["ProductionVariants"]
    }
    assert urls["B"] == b_data
    assert urls["A"].startswith(f"s3://{BUCKET}/recsql/recsql-ab/")
    assert urls["A"].endswith("/A/model.tar.gz")
    key = urls["A"].removeprefix(f"s3://{BUCKET}/")
    assert aws.session.client("s3").head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0
    # autoscaling: one target and one policy per variant
    aas = aws.session.client("application-autoscaling")
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert sorted((t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets) == [
        ("endpoint/recsql-ab/variant/A", 1, 3),
        ("endpoint/recsql-ab/variant/B", 1, 3),
    ]
    policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert sorted(p["ResourceId"] for p in policies) == [
        "endpoint/recsql-ab/variant/A",
        "endpoint/recsql-ab/variant/B",
    ]
    for policy in policies:
        config = policy["TargetTrackingScalingPolicyConfiguration"]
        assert config["TargetValue"] == 400.0
        assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
            "SageMakerVariantInvocationsPerInstance"
        )
        assert policy["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"

    assert main(["deploy", "weights", "recsql-ab", "A=1", "B=3", "--poll", "0"]) == 0
    out = capsys.readouterr().out
    assert "endpoint recsql-ab: InService" in out
    assert "  A: weight 1 (25.0% of traffic)" in out and "  B: weight 3 (75.0% of traffic)" in out
    endpoint = aws.sm.describe_endpoint(EndpointName="recsql-ab")
    assert [(v["VariantName"], v["CurrentWeight"]) for v in endpoint["ProductionVariants"]] == [
        ("A", 1.0),
        ("B", 3.0),
    ]

    # delete takes down both targets, both models, the config and the uploads
    assert (
        main(
            ["deploy", "delete", "recsql-ab", "--purge-s3", "--region", REGION, "--bucket", BUCKET]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "deleted autoscaling target endpoint/recsql-ab/variant/A" in out
    assert "deleted autoscaling target endpoint/recsql-ab/variant/B" in out
    assert aws.sm.list_models()["Models"] == []
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_cli_autoscale_every_variant(aws, capsys) -> None:
    spec = ab_spec(d.Variant("A", data("a")), d.Variant("B", data("b")))
    d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    assert main(["deploy", "autoscale", "recsql-ab", "--min", "2", "--max", "5"]) == 0
    out = capsys.readouterr().out
    assert "autoscaling recsql-ab/A: 2-5" in out and "autoscaling recsql-ab/B: 2-5" in out
    assert main(["deploy", "autoscale", "recsql-ab", "--variant", "AllTraffic"]) == 1
    assert "no variant AllTraffic (it has A, B)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variant", "A={model}", "--variant", "B=/no/such/dir"], "not a model directory"),
        (["--variant", "A=s3://b/m.tar.gz", "--variant", "A=s3://b/n.tar.gz"], "A given twice"),
        (["--variant", "A=s3://b/m.tar.gz:-1"], "weight -1.0 must be a number >= 0"),
        (["--variant", "A=s3://b/m.tar.gz:0", "--variant", "B=s3://b/n.tar.gz:0"], "every"),
        (["--variant", "A_1=s3://b/m.tar.gz"], "bad variant name 'A_1'"),
        (["--variant", "A=/no/such/dir"], "not a model directory"),
        (
            ["--variant", "A=s3://b/m.tar.gz", "--shadow", "S=s3://b/s", "--shadow", "T=s3://b/t"],
            "one --shadow at most",
        ),
        (["--model-data", "s3://b/m.tar.gz", "--autoscale", "1:3", "--no-wait"], "--no-wait"),
        (["--model-data", "s3://b/m.tar.gz", "--autoscale", "3:1"], "1 <= MIN <= MAX"),
        (["--model-data", "s3://b/m.tar.gz", "--autoscale", "x"], "expected MIN:MAX"),
        (
            [
                "--model-data",
                "s3://b/m.tar.gz",
                "--capture-s3",
                CAPTURE,
                "--capture-percent",
                "101",
            ],
            "0..100",
        ),
        (
            ["--model-data", "s3://b/m.tar.gz", "--capture-s3", "s3://no-such-bucket-recsql/c"],
            "aws s3 mb",
        ),
        (["--variant", "A=s3://b/m.tar.gz", "--multi-model"], "not variants"),
    ],
)
def test_cli_endpoint_errors(aws, capsys, tmp_path, extra: list[str], message: str) -> None:
    """Each is refused before anything is uploaded or created."""
    model = make_model(tmp_path / "m")
    extra = [arg.format(model=model) for arg in extra]
    assert main(["deploy", "endpoint", "recsql-ab", *extra, "--no-progress", *BASE]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "CreateModel" not in aws.sent
    assert aws.session.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["A=1", "A=2"], "variant A given twice"),
        (["A=x"], "expected NAME=WEIGHT"),
        (["A"], "expected NAME=WEIGHT"),
        (["A_1=1"], "bad variant name"),
        (["C=1"], "has no variant C"),
        (["A=0", "B=0"], "every production variant weight is 0"),
        (["A=-1"], "must be a number >= 0"),
    ],
)
def test_cli_weights_errors(aws, capsys, items: list[str], message: str) -> None:
    spec = ab_spec(d.Variant("A", data("a")), d.Variant("B", data("b")))
    d.deploy_endpoint(aws.session, spec, poll_s=0, progress=False)
    assert main(["deploy", "weights", "recsql-ab", *items]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "UpdateEndpointWeightsAndCapacities" not in aws.sent
