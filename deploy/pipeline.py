"""A SageMaker Pipelines definition for recsql: prepare -> train -> create model -> deploy.

Every step runs the one recsql image: `prepare` as a Processing job (raw REES46
files -> prepared arrays), `train` as a Training job (the image's `train`
mode reads the channel and writes /opt/ml/model), a Model step, and a Lambda
step (deploy/lambda_handler.py) that creates or updates the endpoint. The JSON
follows the pipeline definition schema version 2020-12-01; values that are only
known at run time are {"Get": ...} references to parameters and step properties.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = "2020-12-01"


def _param(name: str) -> dict[str, str]:
    return {"Get": f"Parameters.{name}"}


def pipeline_definition(
    image_uri: str,
    role_arn: str,
    bucket: str,
    prefix: str = "recsql",
    deploy_lambda_arn: str | None = None,
) -> dict[str, Any]:
    base = f"s3://{bucket}/{prefix}"
    parameters = [
        {"Name": "InputData", "Type": "String", "DefaultValue": f"{base}/events/"},
        {"Name": "EndpointName", "Type": "String", "DefaultValue": "recsql"},
        {"Name": "Epochs", "Type": "String", "DefaultValue": "3"},
        {"Name": "NumEmbeddings", "Type": "String", "DefaultValue": "64"},
        {"Name": "ProcessingInstanceType", "Type": "String", "DefaultValue": "ml.m5.2xlarge"},
        {"Name": "TrainingInstanceType", "Type": "String", "DefaultValue": "ml.m5.2xlarge"},
        {"Name": "EndpointInstanceType", "Type": "String", "DefaultValue": "ml.m5.large"},
    ]
    prepare = {
        "Name": "Prepare",
        "Type": "Processing",
        "Arguments": {
            "ProcessingResources": {
                "ClusterConfig": {
                    "InstanceType": _param("ProcessingInstanceType"),
                    "InstanceCount": 1,
                    "VolumeSizeInGB": 100,
                }
            },
            "AppSpecification": {
                "ImageUri": image_uri,
                "ContainerEntrypoint": [
                    "/usr/local/bin/recsql-entrypoint",
                    "prepare",
                    "/opt/ml/processing/input",
                    "--out",
                    "/opt/ml/processing/prepared",
                ],
            },
            "RoleArn": role_arn,
            "ProcessingInputs": [
                {
                    "InputName": "events",
                    "AppManaged": False,
                    "S3Input": {
                        "S3Uri": _param("InputData"),
                        "LocalPath": "/opt/ml/processing/input",
                        "S3DataType": "S3Prefix",
                        "S3InputMode": "File",
                        "S3DataDistributionType": "FullyReplicated",
                    },
                }
            ],
            "ProcessingOutputConfig": {
                "Outputs": [
                    {
                        "OutputName": "prepared",
                        "AppManaged": False,
                        "S3Output": {
                            "S3Uri": f"{base}/prepared/",
                            "LocalPath": "/opt/ml/processing/prepared",
                            "S3UploadMode": "EndOfJob",
                        },
                    }
                ]
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
        },
    }
    train = {
        "Name": "Train",
        "Type": "Training",
        "Arguments": {
            "AlgorithmSpecification": {"TrainingImage": image_uri, "TrainingInputMode": "File"},
            "RoleArn": role_arn,
            "OutputDataConfig": {"S3OutputPath": f"{base}/training/"},
            "ResourceConfig": {
                "InstanceType": _param("TrainingInstanceType"),
                "InstanceCount": 1,
                "VolumeSizeInGB": 50,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": 86400},
            # SageMaker passes every hyperparameter as a string.
            "HyperParameters": {
                "epochs": _param("Epochs"),
                "num_embeddings": _param("NumEmbeddings"),
            },
            "InputDataConfig": [
                {
                    "ChannelName": "train",
                    "DataSource": {
                        "S3DataSource": {
                            "S3DataType": "S3Prefix",
                            "S3DataDistributionType": "FullyReplicated",
                            "S3Uri": {
                                "Get": "Steps.Prepare.ProcessingOutputConfig.Outputs['prepared']"
                                ".S3Output.S3Uri"
                            },
                        }
                    },
                }
            ],
        },
    }
    model = {
        "Name": "CreateModel",
        "Type": "Model",
        "Arguments": {
            "ExecutionRoleArn": role_arn,
            "PrimaryContainer": {
                "Image": image_uri,
                "ModelDataUrl": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"},
                "Environment": {"SAGEMAKER_CONTAINER_LOG_LEVEL": "INFO"},
            },
        },
    }
    steps = [prepare, train, model]
    if deploy_lambda_arn:
        steps.append(
            {
                "Name": "Deploy",
                "Type": "Lambda",
                "FunctionArn": deploy_lambda_arn,
                "Arguments": {
                    "action": "deploy",
                    "model_name": {"Get": "Steps.CreateModel.ModelName"},
                    "endpoint_name": _param("EndpointName"),
                    "instance_type": _param("EndpointInstanceType"),
                },
                "OutputParameters": [{"OutputName": "endpoint_config", "OutputType": "String"}],
            }
        )
    return {"Version": SCHEMA_VERSION, "Metadata": {}, "Parameters": parameters, "Steps": steps}


def step_references(definition: dict[str, Any]) -> set[str]:
    """Every `Parameters.X` and `Steps.Y` name a definition refers to (for checks)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if set(node) == {"Get"}:
                kind, name = node["Get"].split(".")[:2]
                found.add(f"{kind}.{name}")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(definition["Steps"])
    return found


def upsert_pipeline(sm: Any, name: str, definition: dict[str, Any], role_arn: str | None) -> str:
    body = json.dumps(definition)
    from botocore.exceptions import ClientError

    try:
        sm.describe_pipeline(PipelineName=name)
    except ClientError:
        return sm.create_pipeline(PipelineName=name, PipelineDefinition=body, RoleArn=role_arn)[
            "PipelineArn"
        ]
    return sm.update_pipeline(PipelineName=name, PipelineDefinition=body, RoleArn=role_arn)[
        "PipelineArn"
    ]
