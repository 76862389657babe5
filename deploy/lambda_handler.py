"""AWS Lambda handler: S3 upload -> training job, and the pipeline's deploy step.

Self-contained (standard library + boto3, which Lambda provides) so it deploys
as this one file: `zip -j recsql-lambda.zip deploy/lambda_handler.py`, handler
`lambda_handler.handler`.

1. S3 trigger (ObjectCreated on s3://BUCKET/PREFIX/events/...): starts a
   SageMaker training job with the recsql image on the folder the file landed
   in. Settings from the function's environment: RECSQL_IMAGE_URI,
   RECSQL_ROLE_ARN, RECSQL_OUTPUT_S3 (model.tar.gz goes below it), and optional
   RECSQL_TRAINING_INSTANCE (default ml.m5.2xlarge), RECSQL_HYPERPARAMETERS (a
   JSON object; values become strings, as SageMaker wants).
2. Pipeline deploy step ({"action": "deploy", "model_name", "endpoint_name",
   "instance_type"}): creates an endpoint config for the model and creates the
   endpoint, or updates it when it exists. It does not wait (Lambda runs at
   most 15 minutes; an endpoint may take longer).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
from typing import Any

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

_NAME = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,62}$")


def handler(event: dict[str, Any], context: Any = None, session: Any = None) -> dict[str, Any]:
    import boto3

    session = session or boto3.Session()
    if event.get("action") == "deploy":
        return deploy(session.client("sagemaker"), event)
    records = [r for r in event.get("Records", []) if r.get("eventSource") == "aws:s3"]
    if not records:
        raise ValueError("expected an S3 event or {'action': 'deploy', ...}")
    return {
        "training_jobs": [
            start_training(session.client("sagemaker"), r, os.environ) for r in records
        ]
    }


def _job_name(prefix: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{prefix[:40].rstrip('-')}-{stamp}"


def start_training(sm: Any, record: dict[str, Any], env: dict[str, str] | Any) -> str:
    bucket = record["s3"]["bucket"]["name"]
    key = urllib.parse.unquote_plus(record["s3"]["object"]["key"])
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    missing = [
        n for n in ("RECSQL_IMAGE_URI", "RECSQL_ROLE_ARN", "RECSQL_OUTPUT_S3") if not env.get(n)
    ]
    if missing:
        raise ValueError(f"set {', '.join(missing)} in the function's environment")
    hyperparameters = json.loads(env.get("RECSQL_HYPERPARAMETERS") or "{}")
    job = _job_name(env.get("RECSQL_JOB_PREFIX") or "recsql-train")
    sm.create_training_job(
        TrainingJobName=job,
        AlgorithmSpecification={
            "TrainingImage": env["RECSQL_IMAGE_URI"],
            "TrainingInputMode": "File",
        },
        RoleArn=env["RECSQL_ROLE_ARN"],
        HyperParameters={k: str(v) for k, v in hyperparameters.items()},
        InputDataConfig=[
            {
                "ChannelName": "train",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": f"s3://{bucket}/{folder}",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        OutputDataConfig={"S3OutputPath": env["RECSQL_OUTPUT_S3"]},
        ResourceConfig={
            "InstanceType": env.get("RECSQL_TRAINING_INSTANCE") or "ml.m5.2xlarge",
            "InstanceCount": 1,
            "VolumeSizeInGB": 50,
        },
        StoppingCondition={"MaxRuntimeInSeconds": 86400},
    )
    log.info("s3://%s/%s -> training job %s", bucket, key, job)
    return job


def deploy(sm: Any, event: dict[str, Any]) -> dict[str, Any]:
    model, endpoint = event.get("model_name", ""), event.get("endpoint_name", "")
    for value, what in ((model, "model_name"), (endpoint, "endpoint_name")):
        if not _NAME.match(value):
            raise ValueError(f"bad {what} {value!r}")
    config = _job_name(endpoint)
    sm.create_endpoint_config(
        EndpointConfigName=config,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": model,
                "InitialInstanceCount": int(event.get("instance_count", 1)),
                "InstanceType": event.get("instance_type") or "ml.m5.large",
                "InitialVariantWeight": 1.0,
            }
        ],
    )
    try:
        sm.describe_endpoint(EndpointName=endpoint)
    except sm.exceptions.ClientError:
        sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=config)
        action = "created"
    else:
        sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=config)
        action = "updated"
    log.info("endpoint %s %s with config %s", endpoint, action, config)
    return {"endpoint_config": config, "endpoint": endpoint, "action": action}
