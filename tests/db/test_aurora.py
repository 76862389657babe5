"""Aurora MySQL: exact DDL/GRANT text, and the cluster set-up against moto."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from db.aurora import (
    aurora_function_ddl,
    aurora_grants,
    aurora_install_script,
    cluster_family,
    setup_aurora_cluster,
)
from db.functions import SIMILAR_SCORE, WILL_PURCHASE, Argument, SqlFunction
from model.errors import BadRequest, DataError


def test_ddl_matches_the_contract_exactly() -> None:
    fn = SqlFunction(
        "will_purchase",
        (Argument("user_id", "BIGINT"), Argument("product_id", "BIGINT")),
        "FLOAT",
        endpoint="recsql-endpoint",
    )
    assert aurora_function_ddl(fn) == (
        "CREATE FUNCTION will_purchase (user_id BIGINT, product_id BIGINT)\n"
        "  RETURNS FLOAT\n"
        "  ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT\n"
        "  ENDPOINT NAME 'recsql-endpoint'\n"
        "  MAX_BATCH_SIZE 10000;"
    )


def test_ddl_varchar_return_and_endpoint_override() -> None:
    fn = SqlFunction("label", (Argument("txt", "varchar(200)"),), "VARCHAR(16)", max_batch_size=500)
    assert aurora_function_ddl(fn, "prod-ep") == (
        "CREATE FUNCTION label (txt VARCHAR(200))\n"
        "  RETURNS VARCHAR(16) CHARSET utf8mb4\n"
        "  ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT\n"
        "  ENDPOINT NAME 'prod-ep'\n"
        "  MAX_BATCH_SIZE 500;"
    )
    with pytest.raises(DataError, match="VARCHAR"):
        aurora_function_ddl(SqlFunction("t", (Argument("a", "INT"),), "TEXT"))
    with pytest.raises(BadRequest, match="endpoint name"):
        aurora_function_ddl(WILL_PURCHASE, "x'; DROP TABLE users; --")


def test_grants_for_aurora_3_and_2() -> None:
    assert aurora_grants("app", "shop") == [
        "GRANT AWS_SAGEMAKER_ACCESS TO 'app'@'%';",
        "SET DEFAULT ROLE AWS_SAGEMAKER_ACCESS TO 'app'@'%';",
        "GRANT EXECUTE ON FUNCTION `shop`.`will_purchase` TO 'app'@'%';",
    ]
    assert aurora_grants("app", "shop", aurora_version=2, host="10.0.%") == [
        "GRANT INVOKE SAGEMAKER ON *.* TO 'app'@'10.0.%';",
        "GRANT EXECUTE ON FUNCTION `shop`.`will_purchase` TO 'app'@'10.0.%';",
    ]
    for bad in ("ap'p", "a b", ""):
        with pytest.raises(BadRequest):
            aurora_grants(bad, "shop")
    with pytest.raises(BadRequest):
        aurora_grants("app", "sh`op")


def test_install_script() -> None:
    script = aurora_install_script("shop", user="app")
    assert script.startswith(
        "USE `shop`;\n\nDROP FUNCTION IF EXISTS will_purchase;\nCREATE FUNCTION"
    )
    assert "ENDPOINT NAME 'recsql'" in script and script.endswith("TO 'app'@'%';\n")


def test_similar_score_has_no_aurora_form() -> None:
    """Aurora sends no X-Amzn-SageMaker-Custom-Attributes, so it cannot ask for score=similar:
    the DDL is refused with the reason, and the default script says so and grants nothing."""
    with pytest.raises(DataError, match="similar_score: not available on Aurora"):
        aurora_function_ddl(SIMILAR_SCORE)
    script = aurora_install_script("shop", user="app")
    assert "-- similar_score: not available on Aurora" in script
    assert "CREATE FUNCTION similar_score" not in script and "`similar_score`" not in script
    assert script.count("CREATE FUNCTION") == 1


def test_cluster_family() -> None:
    assert cluster_family("aurora-mysql", "8.0.mysql_aurora.3.05.2") == ("aurora-mysql8.0", 3)
    assert cluster_family("aurora-mysql", "5.7.mysql_aurora.2.11.2") == ("aurora-mysql5.7", 2)
    with pytest.raises(BadRequest, match="aurora-mysql"):
        cluster_family("aurora-postgresql", "15.4")


@pytest.fixture
def aws() -> boto3.Session:
    with mock_aws():
        yield boto3.Session(
            region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )


def _cluster(session: boto3.Session, version: str = "8.0.mysql_aurora.3.05.2", **kw: str) -> None:
    session.client("rds").create_db_cluster(
        DBClusterIdentifier="shop",
        Engine="aurora-mysql",
        EngineVersion=version,
        MasterUsername="admin",
        MasterUserPassword="password123",
        **kw,
    )


def test_setup_creates_role_policy_group_and_attaches(aws: boto3.Session) -> None:
    _cluster(aws)
    report = setup_aurora_cluster(aws, "shop", ["recsql-endpoint", "Other-EP"])
    assert report.reboot_needed and report.aurora_version == 3
    iam, rds = aws.client("iam"), aws.client("rds")

    role = iam.get_role(RoleName="recsql-aurora-sagemaker")["Role"]
    assert role["Arn"] == report.role_arn
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "rds.amazonaws.com"}
    doc = iam.get_role_policy(
        RoleName="recsql-aurora-sagemaker", PolicyName="recsql-invoke-endpoint"
    )["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    assert doc["Statement"][0]["Action"] == "sagemaker:InvokeEndpoint"
    assert doc["Statement"][0]["Resource"] == [
        "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/other-ep",
        "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/recsql-endpoint",
    ]

    group = rds.describe_db_cluster_parameter_groups(DBClusterParameterGroupName="shop-recsql")
    assert group["DBClusterParameterGroups"][0]["DBParameterGroupFamily"] == "aurora-mysql8.0"
    params = rds.describe_db_cluster_parameters(DBClusterParameterGroupName="shop-recsql")
    values = {p["ParameterName"]: p["ParameterValue"] for p in params["Parameters"]}
    assert values["aws_default_sagemaker_role"] == report.role_arn

    cluster = rds.describe_db_clusters(DBClusterIdentifier="shop")["DBClusters"][0]
    assert cluster["DBClusterParameterGroup"] == "shop-recsql"
    assert [r["RoleArn"] for r in cluster["AssociatedRoles"]] == [report.role_arn]
    assert "reboot" in report.reboot_note("shop")


def test_setup_is_idempotent(aws: boto3.Session) -> None:
    _cluster(aws)
    first = setup_aurora_cluster(aws, "shop", ["recsql-endpoint"])
    again = setup_aurora_cluster(aws, "shop", ["recsql-endpoint"])
    assert again.role_arn == first.role_arn and not again.reboot_needed
    cluster = aws.client("rds").describe_db_clusters(DBClusterIdentifier="shop")["DBClusters"][0]
    assert len(cluster["AssociatedRoles"]) == 1


def test_setup_reuses_a_custom_parameter_group_on_aurora_2(aws: boto3.Session) -> None:
    rds = aws.client("rds")
    rds.create_db_cluster_parameter_group(
        DBClusterParameterGroupName="mine",
        DBParameterGroupFamily="aurora-mysql5.7",
        Description="existing",
    )
    _cluster(aws, "5.7.mysql_aurora.2.11.2", DBClusterParameterGroupName="mine")
    report = setup_aurora_cluster(aws, "shop", ["recsql"])
    assert report.parameter_group == "mine" and report.aurora_version == 2
    params = rds.describe_db_cluster_parameters(DBClusterParameterGroupName="mine")["Parameters"]
    assert {p["ParameterName"]: p["ParameterValue"] for p in params}[
        "aws_default_sagemaker_role"
    ] == report.role_arn


def test_setup_refuses_unknown_cluster_and_bad_names(aws: boto3.Session) -> None:
    with pytest.raises(BadRequest, match="no DB cluster 'nope'"):
        setup_aurora_cluster(aws, "nope", ["recsql"])
    with pytest.raises(BadRequest, match="endpoint name"):
        setup_aurora_cluster(aws, "shop", ["bad name"])
