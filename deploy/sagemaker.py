"""`recsql deploy`: ship models to SageMaker through boto3, and take them down again.

    package    model dir -> model.tar.gz (checked by loading it first), optional S3 upload
    endpoint   upload, create models + endpoint config + endpoint (single or multi-model, or
               several weighted variants, a shadow, data capture, autoscaling), wait
    update     new models + config for a live endpoint, switch it over, drop the old ones
    weights    shift traffic between the variants of a live endpoint
    delete     endpoint, its configs, models, autoscaling target (and S3 data with --purge-s3)
    autoscale  target-tracking policy on InvocationsPerInstance for an endpoint variant
    transform  Batch Transform of a CSV in S3 (text/csv, SplitType Line, MultiRecord, Line)
    ecr-commands  the shell commands that build and push the image (Docker is never called)
    pipeline   a SageMaker Pipelines definition (prepare -> train -> model -> deploy) as JSON
    aurora     let an Aurora MySQL cluster call the endpoint (db/aurora.py)

Names: the model and endpoint config of endpoint E are `E-<UTC stamp>` (with variants, each
variant V has its own model `E-V-<stamp>`), and model data goes to
s3://BUCKET/PREFIX/E/<stamp>/[V/]model.tar.gz, so an update never overwrites data a
running instance may still download (autoscaling fetches ModelDataUrl again).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.errors import BadRequest, RecsqlError
from model.variants import SAGEMAKER_NAME

log = logging.getLogger(__name__)

_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/?(.*)$")
_STAMP_LEN = 16  # "-20250101-120000"
VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
FAILED_STATES = {"Failed", "OutOfService", "RollingBack", "UpdateRollbackFailed"}


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class AwsConfig:
    """Where things go. Flags win over RECSQL_* / AWS_* environment variables."""

    region: str
    role_arn: str | None = None
    bucket: str | None = None
    prefix: str = "recsql"
    image_uri: str | None = None

    def need(self, what: str) -> str:
        value = getattr(self, what)
        if not value:
            flag, env = _SETTINGS[what]
            raise BadRequest(f"no {what.replace('_', ' ')}: give {flag} or set {env}")
        return value


_SETTINGS = {
    "region": ("--region", "AWS_REGION"),
    "role_arn": ("--role", "RECSQL_ROLE_ARN"),
    "bucket": ("--bucket", "RECSQL_S3_BUCKET"),
    "image_uri": ("--image", "RECSQL_IMAGE_URI"),
}


def aws_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> AwsConfig:
    env = os.environ if env is None else env
    region = getattr(args, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region:
        raise BadRequest("no AWS region: give --region or set AWS_REGION")
    return AwsConfig(
        region=region,
        role_arn=getattr(args, "role", None) or env.get("RECSQL_ROLE_ARN"),
        bucket=getattr(args, "bucket", None) or env.get("RECSQL_S3_BUCKET"),
        prefix=(getattr(args, "prefix", None) or env.get("RECSQL_S3_PREFIX") or "recsql").strip(
            "/"
        ),
        image_uri=getattr(args, "image", None) or env.get("RECSQL_IMAGE_URI"),
    )


def check_name(name: str, what: str = "endpoint") -> str:
    if not SAGEMAKER_NAME.match(name or ""):
        raise BadRequest(f"bad {what} name {name!r}: 1-63 letters, digits and hyphens")
    return name


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = _S3_URI.match(uri or "")
    if not match:
        raise BadRequest(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return match.group(1), match.group(2)


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def stamped(name: str, now: datetime | None = None) -> str:
    """`name-YYYYmmdd-HHMMSS`, cut to SageMaker's 63 characters."""
    return f"{name[: 63 - _STAMP_LEN].rstrip('-')}-{utc_stamp(now)}"


def model_data_prefix(cfg: AwsConfig, endpoint: str, now: datetime | None = None) -> str:
    """s3://BUCKET/PREFIX/<endpoint>/<stamp>: one folder per upload, never overwritten."""
    return f"s3://{cfg.need('bucket')}/{cfg.prefix}/{endpoint}/{utc_stamp(now)}"


# ----------------------------------------------------------------------- packaging


def package(model_dir: Path, out: Path) -> Path:
    """Tar a model directory as model.tar.gz after checking that it loads."""
    from model.artifact import load_model, pack

    model_dir = Path(model_dir)
    load_model(model_dir)  # a broken artifact fails here, not on the endpoint 10 minutes later
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return pack(model_dir, out)


def upload(s3: Any, path: Path, uri: str, progress: bool = True) -> str:
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        key += Path(path).name
    _check_bucket(s3, bucket)
    size = Path(path).stat().st_size
    from model.progress import progress_bar

    with progress_bar(
        total=size,
        unit="B",
        unit_scale=True,
        desc=f"upload {Path(path).name}",
        disable=not progress,
    ) as bar:
        s3.upload_file(str(path), bucket, key, Callback=bar.update)
    return f"s3://{bucket}/{key}"


def check_capture_bucket(s3: Any, capture: DataCapture) -> None:
    """SageMaker only finds a missing capture bucket once requests fail to be copied."""
    _check_bucket(s3, split_s3_uri(capture.destination)[0])


def _check_bucket(s3: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        raise BadRequest(
            f"S3 bucket {bucket!r} not reachable ({exc.response['Error'].get('Code')}): "
            f"create it with `aws s3 mb s3://{bucket}` in this region"
        ) from exc


# ------------------------------------------------------------------------ endpoints


@dataclass(frozen=True)
class Variant:
    """One model behind an endpoint; its share of traffic is weight / sum of the weights."""

    name: str
    model_data: str  # s3://.../model.tar.gz
    weight: float = 1.0


@dataclass(frozen=True)
class DataCapture:
    """Requests and replies SageMaker copies to S3 as JSON lines (CONTRACTS.md section 9)."""

    destination: str  # s3://bucket/prefix: files land under <prefix>/<endpoint>/<variant>/...
    sampling_percent: int = 100

    def request(self) -> dict[str, Any]:
        return {
            "EnableCapture": True,
            "InitialSamplingPercentage": self.sampling_percent,
            "DestinationS3Uri": self.destination,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            # these are stored as text; anything else (x-npy) arrives base64-encoded
            "CaptureContentTypeHeader": {
                "CsvContentTypes": ["text/csv"],
                "JsonContentTypes": ["application/json", "application/jsonlines"],
            },
        }


@dataclass
class EndpointSpec:
    name: str
    image_uri: str
    role_arn: str
    model_data: str = ""  # s3://.../model.tar.gz, or the S3 prefix of a multi-model endpoint
    multi_model: bool = False
    instance_type: str = "ml.m5.large"  # every variant, the shadow included, runs on these
    instance_count: int = 1
    environment: dict[str, str] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)  # empty: model_data as AllTraffic
    shadow: Variant | None = None
    capture: DataCapture | None = None

    def production(self) -> list[Variant]:
        return self.variants or [Variant(VARIANT, self.model_data)]

    def every_variant(self) -> list[Variant]:
        return self.production() + ([self.shadow] if self.shadow else [])


def check_variants(spec: EndpointSpec) -> None:
    """Refuse what SageMaker would refuse later (or silently route nowhere), in one line."""
    production = spec.production()
    every = spec.every_variant()
    names = [v.name for v in every]
    for variant in every:
        check_name(variant.name, "variant")
        if not variant.model_data:
            raise BadRequest(f"variant {variant.name}: no model data")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadRequest(f"variant names must differ: {', '.join(duplicates)} given twice")
    check_weights({v.name: v.weight for v in production})
    if spec.shadow:
        if len(production) != 1:
            raise BadRequest("a shadow variant needs exactly one production variant (SageMaker)")
        if not spec.shadow.weight > 0:
            raise BadRequest(f"shadow variant {spec.shadow.name}: weight must be > 0")
    if spec.multi_model and (spec.variants or spec.shadow):
        raise BadRequest("a multi-model endpoint takes one model prefix, not variants")
    if spec.capture:
        split_s3_uri(spec.capture.destination)
        if not 0 <= spec.capture.sampling_percent <= 100:
            raise BadRequest(f"--capture-percent {spec.capture.sampling_percent}: expected 0..100")


def check_weights(weights: Mapping[str, float], one_positive: bool = True) -> None:
    """Weights are >= 0 and finite, and (the production variants' weights, all together)
    at least one is > 0: else no variant gets traffic."""
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise BadRequest(f"variant {name}: weight {weight} must be a number >= 0")
    if one_positive and weights and not any(w > 0 for w in weights.values()):
        raise BadRequest("every production variant weight is 0: no variant would get traffic")


def _model_names(spec: EndpointSpec, resource: str) -> dict[str, str]:
    """Variant -> model name: `E-<stamp>` for the plain single model (as before variants
    existed, so `update` keeps its names), else `E-<variant>-<stamp>`."""
    variants = spec.every_variant()
    if not spec.variants and not spec.shadow:
        return {VARIANT: resource}
    stamp = resource[-(_STAMP_LEN - 1) :]
    names = {
        v.name: f"{f'{spec.name}-{v.name}'[: 63 - _STAMP_LEN].rstrip('-')}-{stamp}"
        for v in variants
    }
    if len(set(names.values())) != len(names):
        raise BadRequest(
            f"endpoint and variant names too long to give each variant its own model name "
            f"(63 characters): shorten them ({', '.join(names)})"
        )
    return names


def create_model(
    sm: Any, model_name: str, spec: EndpointSpec, model_data: str | None = None
) -> str:
    container: dict[str, Any] = {
        "Image": spec.image_uri,
        "ModelDataUrl": model_data or spec.model_data,
        "Environment": dict(spec.environment),
    }
    if spec.multi_model:
        container["Mode"] = "MultiModel"  # SageMaker then sets SAGEMAKER_MULTI_MODEL=true
    sm.create_model(
        ModelName=model_name,
        ExecutionRoleArn=spec.role_arn,
        PrimaryContainer=container,
        Tags=[{"Key": "recsql:endpoint", "Value": spec.name}],
    )
    return model_name


def create_endpoint_config(
    sm: Any, config_name: str, models: Mapping[str, str], spec: EndpointSpec
) -> str:
    """One config: the production variants, the shadow if any, data capture if asked."""

    def variant(v: Variant) -> dict[str, Any]:
        return {
            "VariantName": v.name,
            "ModelName": models[v.name],
            "InitialInstanceCount": spec.instance_count,
            "InstanceType": spec.instance_type,
            "InitialVariantWeight": float(v.weight),
        }

    request: dict[str, Any] = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [variant(v) for v in spec.production()],
        "Tags": [{"Key": "recsql:endpoint", "Value": spec.name}],
    }
    if spec.shadow:
        request["ShadowProductionVariants"] = [variant(spec.shadow)]
    if spec.capture:
        request["DataCaptureConfig"] = spec.capture.request()
    sm.create_endpoint_config(**request)
    return config_name


def _create_models_and_config(sm: Any, spec: EndpointSpec, resource: str) -> str:
    check_variants(spec)
    models = _model_names(spec, resource)
    for v in spec.every_variant():
        create_model(sm, models[v.name], spec, v.model_data)
    return create_endpoint_config(sm, resource, models, spec)


def deploy_endpoint(session: Any, spec: EndpointSpec, wait: bool = True, **wait_args: Any) -> str:
    """Create the models, the endpoint config and the endpoint; returns the config name."""
    sm = session.client("sagemaker")
    check_name(spec.name)
    check_variants(spec)
    if _endpoint_status(sm, spec.name) is not None:
        raise BadRequest(f"endpoint {spec.name} exists: use `recsql deploy update`")
    resource = _create_models_and_config(sm, spec, stamped(spec.name))
    sm.create_endpoint(
        EndpointName=spec.name,
        EndpointConfigName=resource,
        Tags=[{"Key": "recsql:endpoint", "Value": spec.name}],
    )
    log.info("creating endpoint %s (config %s)", spec.name, resource)
    if wait:
        wait_for_endpoint(sm, spec.name, **wait_args)
    return resource


def update_endpoint(
    session: Any, spec: EndpointSpec, wait: bool = True, keep_old: bool = False, **wait_args: Any
) -> str:
    """Point a live endpoint at new models; drop the old config and models once it is live."""
    sm = session.client("sagemaker")
    check_variants(spec)
    old = _describe_endpoint(sm, spec.name)
    resource = stamped(spec.name)
    if resource == old["EndpointConfigName"]:
        raise BadRequest(f"endpoint {spec.name} was updated less than a second ago; retry")
    _create_models_and_config(sm, spec, resource)
    for line in _release_autoscaling(session, spec, old["EndpointConfigName"]):
        log.warning("updating endpoint %s: deregistered %s", spec.name, line)
    sm.update_endpoint(EndpointName=spec.name, EndpointConfigName=resource)
    log.info("updating endpoint %s: %s -> %s", spec.name, old["EndpointConfigName"], resource)
    if wait:
        wait_for_endpoint(sm, spec.name, **wait_args)
        if not keep_old:
            _delete_config_and_models(sm, old["EndpointConfigName"])
    return resource


def set_weights(
    session: Any,
    endpoint: str,
    weights: Mapping[str, float],
    wait: bool = True,
    poll_s: float = 30.0,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Shift traffic with UpdateEndpointWeightsAndCapacities; returns DescribeEndpoint after.

    Checked first against DescribeEndpoint, so a typo in a variant name is a clear error
    rather than a half-applied change; variants not named keep their weight.
    """
    sm = session.client("sagemaker")
    if not weights:
        raise BadRequest("give at least one NAME=WEIGHT")
    info = _describe_endpoint(sm, check_name(endpoint))
    production = {v["VariantName"]: v for v in info.get("ProductionVariants", [])}
    shadows = {v["VariantName"] for v in info.get("ShadowProductionVariants", [])}
    unknown = [n for n in weights if n not in production and n not in shadows]
    if unknown:
        raise BadRequest(
            f"endpoint {endpoint} has no variant {', '.join(unknown)} "
            f"(it has {', '.join([*production, *sorted(shadows)])})"
        )
    after = {n: float(v.get("CurrentWeight", 0.0)) for n, v in production.items()}
    after.update({n: w for n, w in weights.items() if n in production})
    check_weights({n: float(w) for n, w in weights.items()}, one_positive=False)
    check_weights(after)
    sm.update_endpoint_weights_and_capacities(
        EndpointName=endpoint,
        DesiredWeightsAndCapacities=[
            {"VariantName": n, "DesiredWeight": float(w)} for n, w in weights.items()
        ],
    )
    log.info("endpoint %s: weights %s", endpoint, dict(weights))
    if not wait:
        return _describe_endpoint(sm, endpoint)
    deadline = time.monotonic() + timeout_s
    while True:  # InService alone may still be the state from before the call
        wait_for_endpoint(sm, endpoint, poll_s, max(deadline - time.monotonic(), 0), False)
        info = _describe_endpoint(sm, endpoint)
        current = {
            v["VariantName"]: v.get("CurrentWeight", 0.0)
            for v in info.get("ProductionVariants", []) + info.get("ShadowProductionVariants", [])
        }
        if all(math.isclose(current.get(n, -1.0), w) for n, w in weights.items()):
            return info
        if time.monotonic() > deadline:
            raise RecsqlError(f"endpoint {endpoint}: weights still {current} after {timeout_s} s")
        time.sleep(poll_s)


def describe_variants(info: Mapping[str, Any]) -> list[str]:
    """DescribeEndpoint as lines: each variant's weight, share of traffic and instances."""
    production = info.get("ProductionVariants", [])
    total = sum(v.get("CurrentWeight", 0.0) for v in production)

    def instances(v: Mapping[str, Any]) -> str:
        count = v.get("CurrentInstanceCount")
        return "" if count is None else f", {count} instance(s)"

    lines = []
    for v in production:
        weight = v.get("CurrentWeight", 0.0)
        share = f"{100 * weight / total:.1f}%" if total else "-"
        lines.append(f"  {v['VariantName']}: weight {weight:g} ({share} of traffic){instances(v)}")
    for v in info.get("ShadowProductionVariants", []):
        weight = v.get("CurrentWeight", 0.0)
        lines.append(f"  {v['VariantName']} (shadow): weight {weight:g}{instances(v)}")
    return lines


def wait_for_endpoint(
    sm: Any, name: str, poll_s: float = 30.0, timeout_s: float = 3600.0, progress: bool = True
) -> str:
    """Poll until InService; a failed endpoint raises with SageMaker's FailureReason."""
    from model.progress import progress_bar

    deadline = time.monotonic() + timeout_s
    with progress_bar(
        desc=f"endpoint {name}", bar_format="{desc}: {postfix} [{elapsed}]", disable=not progress
    ) as bar:
        while True:
            info = _describe_endpoint(sm, name)
            status = info["EndpointStatus"]
            bar.set_postfix_str(status)
            if status == "InService":
                return status
            if status in FAILED_STATES:
                reason = info.get("FailureReason") or "no reason given"
                raise RecsqlError(f"endpoint {name} is {status}: {reason}")
            if time.monotonic() > deadline:
                raise RecsqlError(f"endpoint {name} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)


def delete_endpoint(session: Any, name: str, purge_s3: str | None = None) -> list[str]:
    """Delete the endpoint and everything recsql made for it. Returns what was deleted."""
    sm, done = session.client("sagemaker"), []
    info = _describe_endpoint(sm, name)
    aas = session.client("application-autoscaling")
    for variant in info.get("ProductionVariants", []):
        done += _deregister(aas, name, variant["VariantName"])
    sm.delete_endpoint(EndpointName=name)
    done.append(f"endpoint {name}")
    done += _delete_config_and_models(sm, info["EndpointConfigName"])
    if purge_s3:
        done += _purge_s3(session.client("s3"), purge_s3)
    return done


def _deregister(aas: Any, endpoint: str, variant: str) -> list[str]:
    """Drop a variant's autoscaling target (and with it its policies), if it has one."""
    resource_id = f"endpoint/{endpoint}/variant/{variant}"
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource_id])
    if not targets["ScalableTargets"]:
        return []
    aas.deregister_scalable_target(
        ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION
    )
    return [f"autoscaling target {resource_id}"]


def _release_autoscaling(session: Any, spec: EndpointSpec, old_config: str) -> list[str]:
    """UpdateEndpoint fails when it removes an autoscaled variant or changes its instance
    type (SageMaker's "Update endpoints that use auto scaling"): deregister those first."""
    sm, aas = session.client("sagemaker"), session.client("application-autoscaling")
    kept = {v.name for v in spec.production()}
    done = []
    for variant in sm.describe_endpoint_config(EndpointConfigName=old_config)["ProductionVariants"]:
        name = variant["VariantName"]
        if name not in kept or variant.get("InstanceType") != spec.instance_type:
            done += _deregister(aas, spec.name, name)
    return done


def _delete_config_and_models(sm: Any, config_name: str) -> list[str]:
    from botocore.exceptions import ClientError

    done = []
    try:
        config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    except ClientError:
        return done  # already gone
    sm.delete_endpoint_config(EndpointConfigName=config_name)
    done.append(f"endpoint config {config_name}")
    for variant in config["ProductionVariants"] + config.get("ShadowProductionVariants", []):
        try:
            sm.delete_model(ModelName=variant["ModelName"])
            done.append(f"model {variant['ModelName']}")
        except ClientError as exc:
            log.warning("model %s: %s", variant["ModelName"], exc)
    return done


def _purge_s3(s3: Any, uri: str) -> list[str]:
    bucket, prefix = split_s3_uri(uri)
    if not prefix.strip("/"):
        raise BadRequest(f"refusing to empty the whole bucket {bucket}: give a prefix")
    prefix = prefix.rstrip("/") + "/"
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
    return [f"{len(keys)} objects under s3://{bucket}/{prefix}"]


def _describe_endpoint(sm: Any, name: str) -> dict[str, Any]:
    info = _endpoint_status(sm, name, full=True)
    if info is None:
        raise BadRequest(f"no endpoint {name!r} in {sm.meta.region_name}")
    return info


def _endpoint_status(sm: Any, name: str, full: bool = False) -> Any:
    from botocore.exceptions import ClientError

    try:
        info = sm.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        if exc.response["Error"].get("Code") in ("ValidationException", "ResourceNotFound"):
            return None
        raise
    return info if full else info["EndpointStatus"]


def endpoint_model(sm: Any, endpoint: str) -> str:
    """The model behind an endpoint's first variant (for batch transform)."""
    config = _describe_endpoint(sm, endpoint)["EndpointConfigName"]
    variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    return variants[0]["ModelName"]


# ---------------------------------------------------------------- autoscaling, batch


def autoscale(
    session: Any,
    endpoint: str,
    min_instances: int = 1,
    max_instances: int = 4,
    invocations_per_instance: float = 1000.0,
    variant: str = VARIANT,
    scale_in_cooldown_s: int = 300,
    scale_out_cooldown_s: int = 60,
) -> str:
    """Target tracking on SageMakerVariantInvocationsPerInstance (requests per minute)."""
    if not 1 <= min_instances <= max_instances:
        raise BadRequest(f"need 1 <= min ({min_instances}) <= max ({max_instances}) instances")
    if invocations_per_instance <= 0:
        raise BadRequest("--invocations-per-instance must be > 0")
    names = production_variants(session.client("sagemaker"), endpoint)
    if variant not in names:
        raise BadRequest(
            f"endpoint {endpoint} has no variant {variant} (it has {', '.join(names)})"
        )
    aas = session.client("application-autoscaling")
    resource_id = f"endpoint/{endpoint}/variant/{variant}"
    aas.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=min_instances,
        MaxCapacity=max_instances,
    )
    policy = f"{endpoint}-invocations"
    aas.put_scaling_policy(
        PolicyName=policy,
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(invocations_per_instance),
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "ScaleInCooldown": scale_in_cooldown_s,
            "ScaleOutCooldown": scale_out_cooldown_s,
        },
    )
    return policy


def production_variants(sm: Any, endpoint: str) -> list[str]:
    """The endpoint's production variant names, as DescribeEndpoint lists them."""
    info = _describe_endpoint(sm, endpoint)
    return [v["VariantName"] for v in info.get("ProductionVariants", [])]


def batch_transform(
    session: Any,
    model_name: str,
    input_uri: str,
    output_uri: str,
    instance_type: str = "ml.m5.large",
    instance_count: int = 1,
    max_payload_mb: int = 6,
    job_name: str | None = None,
) -> str:
    """Score every line of the CSV(s) at input_uri; output lines match input lines, in order."""
    split_s3_uri(input_uri), split_s3_uri(output_uri)
    if not 1 <= max_payload_mb <= 100:
        raise BadRequest("--max-payload-mb must be 1..100")
    job = check_name(job_name or stamped(model_name), "transform job")
    session.client("sagemaker").create_transform_job(
        TransformJobName=job,
        ModelName=model_name,
        BatchStrategy="MultiRecord",
        MaxPayloadInMB=max_payload_mb,
        TransformInput={
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": "text/csv",
            "SplitType": "Line",
            "CompressionType": "None",
        },
        TransformOutput={"S3OutputPath": output_uri, "Accept": "text/csv", "AssembleWith": "Line"},
        TransformResources={"InstanceType": instance_type, "InstanceCount": instance_count},
    )
    return job


def wait_for_transform(sm: Any, job: str, poll_s: float = 30.0) -> dict[str, Any]:
    while True:
        info = sm.describe_transform_job(TransformJobName=job)
        status = info["TransformJobStatus"]
        if status == "Completed":
            return info
        if status in ("Failed", "Stopped"):
            raise RecsqlError(f"transform job {job} {status}: {info.get('FailureReason', '')}")
        time.sleep(poll_s)


def ecr_commands(
    account: str, region: str, repository: str = "recsql", tag: str = "latest", variant: str = "cpu"
) -> list[str]:
    """Shell commands that build and push the image; recsql never runs Docker itself."""
    registry = f"{account}.dkr.ecr.{region}.amazonaws.com"
    image = f"{registry}/{repository}:{tag}"
    return [
        f"aws ecr describe-repositories --region {region} --repository-names {repository} "
        f">/dev/null 2>&1 || aws ecr create-repository --region {region} "
        f"--repository-name {repository}",
        f"aws ecr get-login-password --region {region} | docker login --username AWS "
        f"--password-stdin {registry}",
        f"docker build --platform linux/amd64 --build-arg VARIANT={variant} -t {image} .",
        f"docker push {image}",
        f"export RECSQL_IMAGE_URI={image}",
    ]


# ----------------------------------------------------------------------------- CLI


def run_with_session(func: Callable[[Any, AwsConfig, argparse.Namespace], int]) -> Callable:
    """Wrap a command: settings from flags/env, one boto3 session, AWS errors as one line."""

    def run(args: argparse.Namespace) -> int:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        cfg = aws_config(args)
        try:
            return func(boto3.Session(region_name=cfg.region), cfg, args)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise RecsqlError(
                f"AWS {exc.operation_name}: {err.get('Code')}: {err.get('Message')}"
            ) from exc
        except BotoCoreError as exc:
            raise RecsqlError(f"AWS: {exc}") from exc

    return run


def package_to_s3(
    session: Any, model_dirs: Sequence[Path], uri_prefix: str, progress: bool = True
) -> list[str]:
    """Package and upload; one dir -> <prefix>/model.tar.gz, several -> <prefix>/<name>.tar.gz."""
    s3, uris = session.client("s3"), []
    with tempfile.TemporaryDirectory() as tmp:
        for model_dir in model_dirs:
            name = "model" if len(model_dirs) == 1 else Path(model_dir).resolve().name
            tar = package(Path(model_dir), Path(tmp) / f"{name}.tar.gz")
            uris.append(upload(s3, tar, f"{uri_prefix.rstrip('/')}/{tar.name}", progress))
    return uris
