"""The `recsql deploy ...` argument parsers; the work is in deploy/sagemaker.py."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy import sagemaker as d
from model.errors import BadRequest
from model.variants import split_spec

_EPILOG = """\
settings (flags win over environment variables):
  --region   AWS_REGION / AWS_DEFAULT_REGION
  --role     RECSQL_ROLE_ARN     SageMaker execution role (S3 read, ECR pull, CloudWatch logs)
  --bucket   RECSQL_S3_BUCKET    bucket for model.tar.gz and batch data
  --prefix   RECSQL_S3_PREFIX    key prefix in that bucket (default recsql)
  --image    RECSQL_IMAGE_URI    the pushed recsql image (see `recsql deploy ecr-commands`)
credentials come from the usual AWS chain (AWS_PROFILE, ~/.aws, instance role).

typical session:
  recsql deploy ecr-commands --account 123456789012 --region eu-west-1 | sh
  recsql deploy endpoint recsql --model-dir model
  recsql deploy autoscale recsql --min 1 --max 4
  recsql deploy update recsql --model-dir model-v2
  recsql deploy delete recsql --purge-s3

A/B test, shadow, data capture:
  recsql deploy endpoint recsql --variant A=model:0.9 --variant B=model-v2:0.1 \
      --autoscale 1:4 --capture-s3 s3://BUCKET/capture --capture-percent 20
  recsql deploy weights recsql A=0.5 B=0.5
  recsql deploy endpoint recsql-shadow --variant live=model --shadow candidate=model-v2
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="deploy models to SageMaker endpoints, batch transform, ECR, pipelines",
        description="Package models as model.tar.gz, upload them to S3 and run them on "
        "SageMaker real-time endpoints (single- or multi-model) or Batch Transform, through "
        "boto3. Every command that creates something has a matching clean-up.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    _package(sub)
    _endpoint(sub, "endpoint", "create an endpoint (model + endpoint config + endpoint)")
    _endpoint(sub, "update", "switch a live endpoint to a new model, then drop the old one")
    _weights(sub)
    _delete(sub)
    _autoscale(sub)
    _transform(sub)
    _ecr(sub)
    _pipeline(sub)
    _aurora(sub)


def _aws(p: argparse.ArgumentParser, *need: str) -> None:
    p.add_argument("--region", help="AWS region (or AWS_REGION)")
    if "role" in need:
        p.add_argument("--role", help="SageMaker execution role ARN (or RECSQL_ROLE_ARN)")
    if "bucket" in need:
        p.add_argument("--bucket", help="S3 bucket (or RECSQL_S3_BUCKET)")
        p.add_argument("--prefix", help="S3 key prefix (or RECSQL_S3_PREFIX; default recsql)")
    if "image" in need:
        p.add_argument("--image", help="recsql image URI in ECR (or RECSQL_IMAGE_URI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _package(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "package",
        help="model dir -> model.tar.gz (and optionally to S3)",
        description="Check that a model directory loads, tar its contents as "
        "model.tar.gz, and upload it when --s3-uri is given.",
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("model.tar.gz"), help="(default model.tar.gz)")
    p.add_argument(
        "--s3-uri",
        help="upload to this s3://bucket/key (a key ending in / gets "
        "the file name; to add a model to a multi-model endpoint, use its prefix)",
    )
    _aws(p)
    p.set_defaults(func=_run_package)


def _run_package(args: argparse.Namespace) -> int:
    tar = d.package(args.model_dir, args.out)
    print(f"packaged {args.model_dir} -> {tar} ({tar.stat().st_size:,} bytes)")
    if args.s3_uri:
        return d.run_with_session(_upload_packaged)(args)
    return 0


def _upload_packaged(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    print(f"uploaded {d.upload(session.client('s3'), args.out, args.s3_uri, not args.no_progress)}")
    return 0


def _endpoint(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text + ".")
    p.add_argument("endpoint", help="endpoint name (letters, digits, hyphens)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        help="model directory to package and upload (repeat with --multi-model)",
    )
    src.add_argument("--model-data", help="model.tar.gz already in S3 (or an MME prefix)")
    src.add_argument(
        "--variant",
        action="append",
        metavar="NAME=SOURCE[:WEIGHT]",
        help="a production variant (repeat): SOURCE is a model directory or an s3:// "
        "model.tar.gz, WEIGHT its share of traffic relative to the others (default 1)",
    )
    p.add_argument(
        "--shadow",
        action="append",
        metavar="NAME=SOURCE[:WEIGHT]",
        help="a shadow variant: gets a copy of the requests of the one production "
        "variant, its replies are dropped (SageMaker allows one)",
    )
    p.add_argument(
        "--multi-model",
        action="store_true",
        help="multi-model endpoint: models are <prefix>/<name>.tar.gz, picked per "
        "request with TargetModel",
    )
    p.add_argument(
        "--instance-type", default="ml.m5.large", help="every variant's (default ml.m5.large)"
    )
    p.add_argument("--instance-count", type=int, default=1, help="every variant's (default 1)")
    p.add_argument(
        "--autoscale",
        metavar="MIN:MAX[:TARGET]",
        help="once InService, target-tracking autoscaling of each production variant "
        "between MIN and MAX instances at TARGET requests per instance per minute "
        "(default 1000)",
    )
    p.add_argument(
        "--capture-s3",
        metavar="S3_URI",
        help="data capture: copy requests and replies to s3://bucket/prefix "
        "(the role must be able to write there)",
    )
    p.add_argument(
        "--capture-percent",
        type=int,
        default=100,
        help="percentage of requests captured (default 100)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="container environment, e.g. SAGEMAKER_MODEL_SERVER_WORKERS=2",
    )
    p.add_argument("--no-wait", action="store_true", help="return once SageMaker accepted it")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between status checks")
    if name == "update":
        p.add_argument("--keep-old", action="store_true", help="keep the old config and model")
    _aws(p, "role", "bucket", "image")
    p.set_defaults(func=d.run_with_session(_run_endpoint))


def _run_endpoint(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    d.check_name(args.endpoint)
    if args.model_dir and len(args.model_dir) > 1 and not args.multi_model:
        raise BadRequest("several --model-dir need --multi-model")
    if args.autoscale and args.no_wait:
        raise BadRequest("--autoscale needs the endpoint InService: drop --no-wait")
    if len(args.shadow or []) > 1:
        raise BadRequest("one --shadow at most (SageMaker allows one shadow variant)")
    env = _parse_env(args.env)
    role, image = cfg.need("role_arn"), cfg.need("image_uri")
    scaling = _parse_autoscale(args.autoscale) if args.autoscale else None
    capture = d.DataCapture(args.capture_s3, args.capture_percent) if args.capture_s3 else None
    spec = d.EndpointSpec(
        args.endpoint,
        image,
        role,
        args.model_data or (str(args.model_dir[0]) if args.model_dir else ""),
        args.multi_model,
        args.instance_type,
        args.instance_count,
        env,
        variants=[_parse_variant(text, "--variant") for text in args.variant or []],
        shadow=_parse_variant(args.shadow[0], "--shadow") if args.shadow else None,
        capture=capture,
    )
    d.check_variants(spec)  # names and weights, before packaging and uploading anything
    if capture:
        d.check_capture_bucket(session.client("s3"), capture)
    # sources -> S3: a model directory is checked, packed and uploaded; s3:// stays as it is
    progress = not args.no_progress
    prefix = d.model_data_prefix(cfg, args.endpoint)
    data = _upload_model_dirs(session, args, prefix) if args.model_dir else args.model_data
    spec = replace(
        spec,
        model_data=data or "",
        variants=[_variant_data(session, v, prefix, progress) for v in spec.variants],
        shadow=spec.shadow and _variant_data(session, spec.shadow, prefix, progress),
    )
    wait = {"poll_s": args.poll, "progress": progress}
    if args.deploy_command == "update":
        config = d.update_endpoint(session, spec, not args.no_wait, args.keep_old, **wait)
    else:
        config = d.deploy_endpoint(session, spec, not args.no_wait, **wait)
    state = "accepted" if args.no_wait else "InService"
    where = f"model data {data}" if data else f"{len(spec.production())} variant(s)"
    print(f"endpoint {args.endpoint}: {state} (config {config}, {where})")
    if args.multi_model:
        print(f"invoke a model with TargetModel=<name>.tar.gz; add models under {data}")
    if scaling:
        for variant in d.production_variants(session.client("sagemaker"), args.endpoint):
            policy = d.autoscale(session, args.endpoint, *scaling, variant=variant)
            print(
                f"autoscaling {args.endpoint}/{variant}: {scaling[0]}-{scaling[1]} "
                f"instances, policy {policy}"
            )
    if not args.no_wait:
        info = session.client("sagemaker").describe_endpoint(EndpointName=args.endpoint)
        print("\n".join(d.describe_variants(info)))
    return 0


def _upload_model_dirs(session: Any, args: argparse.Namespace, prefix: str) -> str:
    """--model-dir: one model.tar.gz, or (multi-model) <name>.tar.gz each under one prefix."""
    if args.multi_model:
        prefix += "/models"
    uris = d.package_to_s3(session, args.model_dir, prefix, not args.no_progress)
    if not args.multi_model:
        return uris[0]
    # several dirs named alike would overwrite each other in the prefix
    if len(set(uris)) != len(uris):
        raise BadRequest("--model-dir folders must have distinct names")
    return prefix + "/"


def _parse_variant(text: str, flag: str) -> d.Variant:
    """`NAME=SOURCE[:WEIGHT]` (read as model/variants.split_spec reads it) -> a Variant
    whose model_data is still the SOURCE."""
    try:
        name, source, tail = split_spec(text)
    except ValueError:
        raise BadRequest(f"{flag} {text!r}: expected NAME=MODEL_DIR_OR_S3_URI[:WEIGHT]") from None
    weight = 1.0
    if tail is not None:
        try:
            weight = float(tail)
        except ValueError:
            raise BadRequest(f"{flag} {text!r}: weight {tail!r} is not a number") from None
    if not source:
        raise BadRequest(f"{flag} {text!r}: no model directory or s3:// URI")
    d.check_name(name, "variant")
    if not source.startswith("s3://") and not Path(source).is_dir():
        raise BadRequest(f"{flag} {text!r}: {source} is not a model directory or an s3:// URI")
    return d.Variant(name, source, weight)


def _variant_data(session: Any, variant: d.Variant, prefix: str, progress: bool) -> d.Variant:
    """An s3:// source is used as it is; a directory is checked, packed and uploaded."""
    if variant.model_data.startswith("s3://"):
        d.split_s3_uri(variant.model_data)
        return variant
    source = Path(variant.model_data)
    (uri,) = d.package_to_s3(session, [source], f"{prefix}/{variant.name}", progress)
    return replace(variant, model_data=uri)


def _parse_autoscale(text: str) -> tuple[int, int, float]:
    """`MIN:MAX[:TARGET]` -> (min, max, target invocations per instance per minute)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        low, high = int(parts[0]), int(parts[1])
        target = float(parts[2]) if len(parts) == 3 else 1000.0
    except ValueError:
        raise BadRequest(f"--autoscale {text!r}: expected MIN:MAX[:TARGET], e.g. 1:4:500") from None
    if not 1 <= low <= high or not (math.isfinite(target) and target > 0):
        raise BadRequest(f"--autoscale {text!r}: need 1 <= MIN <= MAX and TARGET > 0")
    return low, high, target


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="shift traffic between the variants of a live endpoint",
        description="Set variant weights with UpdateEndpointWeightsAndCapacities (no "
        "redeploy), wait until SageMaker applied them, and print each variant's share. "
        "Variants not named keep their weight.",
    )
    p.add_argument("endpoint")
    p.add_argument("weights", nargs="+", metavar="NAME=WEIGHT")
    p.add_argument("--no-wait", action="store_true", help="return once SageMaker accepted it")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between status checks")
    _aws(p)
    p.set_defaults(func=d.run_with_session(_run_weights))


def _run_weights(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    weights: dict[str, float] = {}
    for item in args.weights:
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep and name else None
        except ValueError:
            weight = None
        if weight is None:
            raise BadRequest(f"{item!r}: expected NAME=WEIGHT, e.g. A=0.9")
        if name in weights:
            raise BadRequest(f"variant {name} given twice")
        weights[d.check_name(name, "variant")] = weight
    info = d.set_weights(session, args.endpoint, weights, not args.no_wait, args.poll)
    print(f"endpoint {args.endpoint}: {info['EndpointStatus']}")
    print("\n".join(d.describe_variants(info)))
    return 0


def _delete(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "delete",
        help="delete an endpoint and everything made for it",
        description="Delete the endpoint, its endpoint config and models, its "
        "autoscaling target, and with --purge-s3 the model data in S3.",
    )
    p.add_argument("endpoint")
    p.add_argument(
        "--purge-s3",
        nargs="?",
        const="",
        metavar="S3_URI",
        help="also delete S3 objects: under this URI, or (no value) under "
        "s3://BUCKET/PREFIX/<endpoint>/, where `endpoint` and `update` upload",
    )
    _aws(p, "bucket")
    p.set_defaults(func=d.run_with_session(_run_delete))


def _run_delete(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    purge = args.purge_s3
    if purge == "":  # every upload for this endpoint: PREFIX/<endpoint>/<stamp>/...
        purge = f"s3://{cfg.need('bucket')}/{cfg.prefix}/{args.endpoint}/"
    for line in d.delete_endpoint(session, d.check_name(args.endpoint), purge):
        print(f"deleted {line}")
    return 0


def _autoscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "autoscale",
        help="target-tracking autoscaling for an endpoint variant",
        description="Register the variant with Application Auto Scaling and "
        "track SageMakerVariantInvocationsPerInstance (requests per minute).",
    )
    p.add_argument("endpoint")
    p.add_argument("--variant", help="(default: every production variant)")
    p.add_argument("--min", dest="min_instances", type=int, default=1)
    p.add_argument("--max", dest="max_instances", type=int, default=4)
    p.add_argument(
        "--invocations-per-instance",
        type=float,
        default=1000.0,
        help="target requests per instance per minute (default 1000)",
    )
    _aws(p)
    p.set_defaults(func=d.run_with_session(_run_autoscale))


def _run_autoscale(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    endpoint = d.check_name(args.endpoint)
    variants = [args.variant] if args.variant else None
    for variant in variants or d.production_variants(session.client("sagemaker"), endpoint):
        policy = d.autoscale(
            session,
            endpoint,
            args.min_instances,
            args.max_instances,
            args.invocations_per_instance,
            variant,
        )
        print(
            f"autoscaling {endpoint}/{variant}: {args.min_instances}-"
            f"{args.max_instances} instances, policy {policy}"
        )
    return 0


def _transform(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transform",
        help="Batch Transform a CSV of user_id,product_id lines",
        description="Score a header-less CSV in S3 (or a local file, uploaded "
        "first) with Batch Transform: ContentType text/csv, SplitType Line, "
        "BatchStrategy MultiRecord, AssembleWith Line. Output: <input>.out.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="SageMaker model name")
    src.add_argument("--endpoint", help="use the model behind this endpoint")
    p.add_argument("--input", required=True, help="s3://... CSV file or prefix, or a local CSV")
    p.add_argument("--output", help="s3:// output prefix (default s3://BUCKET/PREFIX/transform/)")
    p.add_argument("--instance-type", default="ml.m5.large")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--max-payload-mb", type=int, default=6)
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    _aws(p, "bucket")
    p.set_defaults(func=d.run_with_session(_run_transform))


def _run_transform(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    model = args.model or d.endpoint_model(session.client("sagemaker"), args.endpoint)
    source = args.input
    if not source.startswith("s3://"):
        path = Path(source)
        if not path.is_file():
            raise BadRequest(f"{path}: no such file (give a local CSV or an s3:// URI)")
        dest = f"s3://{cfg.need('bucket')}/{cfg.prefix}/transform-input/{path.name}"
        source = d.upload(session.client("s3"), path, dest, not args.no_progress)
    output = args.output or f"s3://{cfg.need('bucket')}/{cfg.prefix}/transform-output/"
    job = d.batch_transform(
        session, model, source, output, args.instance_type, args.instance_count, args.max_payload_mb
    )
    print(f"transform job {job}: {source} -> {output}")
    if args.wait:
        d.wait_for_transform(session.client("sagemaker"), job)
        print(f"transform job {job}: Completed")
    return 0


def _ecr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ecr-commands",
        help="print the commands that build and push the image",
        description="Print shell commands that create the ECR repository, log "
        "Docker in, build the image and push it. Nothing is run.",
    )
    p.add_argument("--account", help="AWS account id (default: asked from STS)")
    p.add_argument("--repository", default="recsql")
    p.add_argument("--tag", default="latest")
    p.add_argument("--variant", choices=("cpu", "gpu"), default="cpu")
    _aws(p)
    p.set_defaults(func=d.run_with_session(_run_ecr))


def _run_ecr(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    account = args.account or session.client("sts").get_caller_identity()["Account"]
    if not (account.isdigit() and len(account) == 12):
        raise BadRequest(f"--account {account!r}: expected a 12-digit AWS account id")
    print("\n".join(d.ecr_commands(account, cfg.region, args.repository, args.tag, args.variant)))
    return 0


def _pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="SageMaker Pipelines definition: prepare -> train -> model -> deploy",
        description="Write the pipeline definition JSON; with "
        "--upsert also create or update the pipeline in SageMaker.",
    )
    p.add_argument("--name", default="recsql")
    p.add_argument(
        "--deploy-lambda-arn",
        help="Lambda (deploy/lambda_handler.py) for the deploy "
        "step; without it the pipeline stops after registering the model",
    )
    p.add_argument("--out", type=Path, help="write here (default: stdout)")
    p.add_argument("--upsert", action="store_true", help="create or update it in SageMaker")
    _aws(p, "role", "bucket", "image")
    p.set_defaults(func=d.run_with_session(_run_pipeline))


def _run_pipeline(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    from deploy.pipeline import pipeline_definition, upsert_pipeline

    definition = pipeline_definition(
        image_uri=cfg.need("image_uri"),
        role_arn=cfg.need("role_arn"),
        bucket=cfg.need("bucket"),
        prefix=cfg.prefix,
        deploy_lambda_arn=args.deploy_lambda_arn,
    )
    text = json.dumps(definition, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    elif not args.upsert:
        print(text)
    if args.upsert:
        arn = upsert_pipeline(session.client("sagemaker"), args.name, definition, cfg.role_arn)
        print(f"pipeline {args.name}: {arn}")
    return 0


def _aurora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aurora",
        help="let an Aurora MySQL cluster call the endpoint",
        description="IAM role + policy for sagemaker:InvokeEndpoint, the "
        "cluster parameter aws_default_sagemaker_role, add-role-to-db-cluster "
        "(db/aurora.py). Then reboot the writer and run the SQL it prints.",
    )
    p.add_argument("cluster", help="DB cluster identifier")
    p.add_argument("--endpoint", action="append", required=True, help="endpoint name (repeat)")
    p.add_argument("--role-name", default="recsql-aurora-sagemaker")
    p.add_argument("--database", default="recsql", help="database for the function DDL")
    _aws(p)
    p.set_defaults(func=d.run_with_session(_run_aurora))


def _run_aurora(session: Any, cfg: d.AwsConfig, args: argparse.Namespace) -> int:
    from db.aurora import aurora_install_script, setup_aurora_cluster

    report = setup_aurora_cluster(session, args.cluster, args.endpoint, role_name=args.role_name)
    for action in report.actions:
        print(action)
    print(report.reboot_note(args.cluster))
    print("-- then, in the mysql client:")
    print(
        aurora_install_script(
            args.database, aurora_version=report.aurora_version, endpoint_name=args.endpoint[0]
        ),
        end="",
    )
    return 0
