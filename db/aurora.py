"""Aurora MySQL machine learning: function DDL, GRANTs, and the cluster set-up via boto3.

Aurora calls a SageMaker endpoint itself (`ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT`),
batching up to MAX_BATCH_SIZE rows per request as header-less text/csv: the
same contract the recsql server answers. Aurora sends no custom attributes, so a
"similar" function (`similar_score`, which asks with `score=similar`) has no Aurora
form: the install script notes it and leaves it out. The cluster needs an IAM role allowed
to call `sagemaker:InvokeEndpoint`, named in the cluster parameter
`aws_default_sagemaker_role` and attached with `add-role-to-db-cluster`, then a
reboot of the writer instance.

Fresh events: Aurora cannot call SageMaker from a trigger (its ML functions are not allowed
there), nor send JSON to it. The path is an AFTER INSERT trigger calling the native
`lambda_async(ARN, payload)` with `{"events": [row]}`; the Lambda (deploy/events_lambda.py)
POSTs it to the endpoint with InvokeEndpoint. `aurora_events_script` prints the trigger and
the GRANTs. lambda_async returns before the Lambda runs, so a server or store that is down
never fails the insert (the Lambda retries, then drops the event); an error starting the
Lambda (no role, no privilege) is an error in the trigger, which rolls back the insert.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from db.functions import DEFAULT_FUNCTIONS, SqlFunction
from model.errors import BadRequest, DataError

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,63}$")
_USER = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_HOST = re.compile(r"^[A-Za-z0-9_.%:\-]{1,255}$")
_AWS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9\-]{0,62}$")
_LAMBDA_ARN = re.compile(
    r"^arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9_$-]{1,128})?$"
)
LAMBDA_ROLE_PARAMETER = "aws_default_lambda_role"

SAGEMAKER_ROLE_PARAMETER = "aws_default_sagemaker_role"
RDS_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "rds.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


# ------------------------------------------------------------------------------- SQL


def aurora_return_type(fn: SqlFunction) -> str:
    base = fn.returns.split("(")[0].strip().upper()
    if base == "TEXT":
        raise DataError(f"{fn.name}: Aurora functions return VARCHAR(n), not TEXT")
    if base == "VARCHAR":
        return f"{fn.returns.strip().upper()} CHARSET utf8mb4"
    return fn.returns.strip().upper()


def aurora_unavailable(fn: SqlFunction) -> str | None:
    """Why Aurora cannot have `fn` (one line), or None when it can."""
    if fn.score == "events":
        return (
            f"{fn.name}: not an Aurora function; fresh events go through a trigger and"
            " lambda_async (--events-table, --events-lambda)"
        )
    if fn.custom_attributes is None:
        return None
    return (
        f"{fn.name}: not available on Aurora, which cannot send X-Amzn-SageMaker-Custom-"
        f"Attributes ({fn.custom_attributes}); use the endpoint's similar_to, DuckDB or MySQL"
    )


def aurora_function_ddl(fn: SqlFunction, endpoint_name: str | None = None) -> str:
    """CREATE FUNCTION ... ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT for one function.

    `endpoint_name` (the SageMaker endpoint) defaults to the function's endpoint name.
    """
    why = aurora_unavailable(fn)
    if why:
        raise DataError(why)
    endpoint = endpoint_name or fn.endpoint
    if not _AWS_NAME.match(endpoint):
        raise BadRequest(f"bad SageMaker endpoint name {endpoint!r}")
    args = ", ".join(f"{a.name} {a.sql_type.upper()}" for a in fn.args)
    return (
        f"CREATE FUNCTION {fn.name} ({args})\n"
        f"  RETURNS {aurora_return_type(fn)}\n"
        f"  ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT\n"
        f"  ENDPOINT NAME '{endpoint}'\n"
        f"  MAX_BATCH_SIZE {fn.max_batch_size};"
    )


def _account(user: str, host: str) -> str:
    if not _USER.match(user):
        raise BadRequest(f"bad MySQL user name {user!r}")
    if not _HOST.match(host):
        raise BadRequest(f"bad MySQL host pattern {host!r}")
    return f"'{user}'@'{host}'"


def _ident(name: str, what: str) -> str:
    if not _IDENT.match(name):
        raise BadRequest(f"bad {what} name {name!r}")
    return f"`{name}`"


def aurora_grants(
    user: str,
    database: str,
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    aurora_version: int = 3,
    host: str = "%",
) -> list[str]:
    """The statements that let `user` call the functions (Aurora MySQL 2 or 3); those Aurora
    cannot have (aurora_unavailable) are left out."""
    account = _account(user, host)
    db = _ident(database, "database")
    if aurora_version == 3:
        statements = [
            f"GRANT AWS_SAGEMAKER_ACCESS TO {account};",
            # Roles are inactive until set; a default role makes it active at every login
            # (alternative: SET ROLE AWS_SAGEMAKER_ACCESS per session, or the cluster
            # parameter activate_all_roles_on_login=1).
            f"SET DEFAULT ROLE AWS_SAGEMAKER_ACCESS TO {account};",
        ]
    elif aurora_version == 2:
        statements = [f"GRANT INVOKE SAGEMAKER ON *.* TO {account};"]
    else:
        raise BadRequest(
            f"aurora_version must be 2 (MySQL 5.7) or 3 (MySQL 8.0), not {aurora_version}"
        )
    statements += [
        f"GRANT EXECUTE ON FUNCTION {db}.{_ident(fn.name, 'function')} TO {account};"
        for fn in functions
        if not aurora_unavailable(fn)
    ]
    return statements


def aurora_install_script(
    database: str,
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    user: str | None = None,
    aurora_version: int = 3,
    endpoint_name: str | None = None,
) -> str:
    """A script to paste into the mysql client: DROP/CREATE each function, then GRANTs.
    A function Aurora cannot call (aurora_unavailable) is a comment saying why."""
    lines = [f"USE {_ident(database, 'database')};", ""]
    notes = [f"-- {aurora_unavailable(fn)}" for fn in functions if aurora_unavailable(fn)]
    functions = [fn for fn in functions if not aurora_unavailable(fn)]
    for fn in functions:
        lines += [f"DROP FUNCTION IF EXISTS {fn.name};", aurora_function_ddl(fn, endpoint_name), ""]
    lines += [*notes, ""] if notes else []
    if user:
        lines += aurora_grants(user, database, functions, aurora_version=aurora_version)
    return "\n".join(lines).rstrip() + "\n"


def aurora_events_trigger(table: str, lambda_arn: str, key: str = "user_id") -> str:
    """CREATE TRIGGER <table>_recsql_events AFTER INSERT: each row as {"events": [{...}]} to
    the Lambda with lambda_async. Columns: `key` (user_id or session_id), product_id,
    event_type, event_time (a DATETIME holding UTC; sent as 'YYYY-MM-DD HH:MM:SS')."""
    if not _LAMBDA_ARN.match(lambda_arn):
        raise BadRequest(f"bad Lambda function ARN {lambda_arn!r}")
    if key not in ("user_id", "session_id"):
        raise BadRequest(f"events are keyed by user_id or session_id, not {key!r}")
    trigger = _ident(f"{table}_recsql_events", "trigger")
    payload = (
        "JSON_OBJECT('events', JSON_ARRAY(JSON_OBJECT(\n"
        f"      '{key}', NEW.{key}, 'product_id', NEW.product_id,\n"
        "      'event_type', NEW.event_type,\n"
        "      'event_time', DATE_FORMAT(NEW.event_time, '%Y-%m-%d %H:%i:%s'))))"
    )
    return (
        f"DROP TRIGGER IF EXISTS {trigger};\n"
        "DELIMITER ;;\n"
        f"CREATE TRIGGER {trigger} AFTER INSERT ON {_ident(table, 'table')} FOR EACH ROW\n"
        "BEGIN\n"
        f"  SELECT lambda_async('{lambda_arn}',\n    {payload}\n  ) INTO @recsql_events_lambda;\n"
        "END;;\n"
        "DELIMITER ;"
    )


def aurora_events_script(
    table: str,
    lambda_arn: str,
    *,
    user: str | None = None,
    aurora_version: int = 3,
    key: str = "user_id",
) -> str:
    """The trigger, and the privilege its definer needs (the trigger runs as the user who
    creates it, not as the one who inserts): AWS_LAMBDA_ACCESS (3) or INVOKE LAMBDA (2)."""
    lines = [
        "-- Fresh events: each row inserted into the table goes to the recsql endpoint's",
        "-- fresh-event store through the Lambda (deploy/events_lambda.py). The cluster needs",
        f"-- an IAM role allowed lambda:InvokeFunction on it, set in {LAMBDA_ROLE_PARAMETER}",
        "-- and added with `aws rds add-role-to-db-cluster` (then reboot the writer).",
        aurora_events_trigger(table, lambda_arn, key),
    ]
    if user:
        account = _account(user, "%")
        lines.append("-- the trigger's definer (the user who runs the CREATE TRIGGER):")
        if aurora_version == 3:
            lines += [
                f"GRANT AWS_LAMBDA_ACCESS TO {account};",
                f"SET DEFAULT ROLE ALL TO {account};",
            ]
        elif aurora_version == 2:
            lines.append(f"GRANT INVOKE LAMBDA ON *.* TO {account};")
        else:
            raise BadRequest(f"aurora_version must be 2 or 3, not {aurora_version}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ boto3


@dataclass
class SetupReport:
    role_arn: str
    parameter_group: str
    aurora_version: int
    actions: list[str] = field(default_factory=list)
    reboot_needed: bool = False

    def reboot_note(self, cluster_id: str) -> str:
        if not self.reboot_needed:
            return f"{cluster_id}: already set up; no reboot needed."
        return (
            f"{cluster_id}: reboot the writer instance so {SAGEMAKER_ROLE_PARAMETER} takes "
            "effect: aws rds reboot-db-instance --db-instance-identifier <writer-instance>"
        )


def endpoint_arn(region: str, account_id: str, endpoint_name: str) -> str:
    # SageMaker stores endpoint names lower-case in ARNs.
    return f"arn:aws:sagemaker:{region}:{account_id}:endpoint/{endpoint_name.lower()}"


def cluster_family(engine: str, engine_version: str) -> tuple[str, int]:
    """('aurora-mysql8.0', 3) or ('aurora-mysql5.7', 2) from describe_db_clusters fields."""
    if engine != "aurora-mysql":
        raise BadRequest(f"cluster engine is {engine!r}; Aurora ML from SQL needs aurora-mysql")
    if engine_version.startswith("8.0"):
        return "aurora-mysql8.0", 3
    if engine_version.startswith("5.7"):
        return "aurora-mysql5.7", 2
    raise BadRequest(f"unsupported Aurora MySQL engine version {engine_version!r}")


def setup_aurora_cluster(
    session: Any,
    cluster_id: str,
    endpoint_names: Iterable[str],
    *,
    role_name: str = "recsql-aurora-sagemaker",
    parameter_group: str | None = None,
) -> SetupReport:
    """Let Aurora cluster `cluster_id` invoke the SageMaker endpoints. Safe to re-run.

    `session` is a boto3.Session. Creates or updates the IAM role (trust: RDS) and its
    inline policy, sets aws_default_sagemaker_role in the cluster parameter group (a
    new `<cluster>-recsql` group when the cluster uses a default group), attaches the
    group and the role to the cluster. A reboot of the writer is then needed.
    """
    for name, what in ((cluster_id, "cluster"), (role_name, "IAM role")):
        if not _AWS_NAME.match(name):
            raise BadRequest(f"bad {what} name {name!r}")
    endpoints = sorted(set(endpoint_names))
    for name in endpoints:
        if not _AWS_NAME.match(name):
            raise BadRequest(f"bad SageMaker endpoint name {name!r}")
    rds, iam, sts = session.client("rds"), session.client("iam"), session.client("sts")
    region = rds.meta.region_name
    cluster = _describe_cluster(rds, cluster_id)
    family, version = cluster_family(cluster["Engine"], cluster["EngineVersion"])
    account = sts.get_caller_identity()["Account"]
    actions: list[str] = []

    role_arn = _ensure_role(iam, role_name, actions)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sagemaker:InvokeEndpoint",
                "Resource": [endpoint_arn(region, account, e) for e in endpoints],
            }
        ],
    }
    iam.put_role_policy(
        RoleName=role_name, PolicyName="recsql-invoke-endpoint", PolicyDocument=json.dumps(policy)
    )
    actions.append(
        f"put inline policy recsql-invoke-endpoint on {role_name} ({len(endpoints)} endpoints)"
    )

    current_group = cluster.get("DBClusterParameterGroup", "")
    group = parameter_group or (
        current_group
        if current_group and not current_group.startswith("default.")
        else f"{cluster_id}-recsql"
    )
    changed = _ensure_parameter(rds, group, family, role_arn, actions)
    if current_group != group:
        rds.modify_db_cluster(
            DBClusterIdentifier=cluster_id, DBClusterParameterGroupName=group, ApplyImmediately=True
        )
        actions.append(f"cluster {cluster_id} now uses parameter group {group}")
        changed = True
    if role_arn not in {r.get("RoleArn") for r in cluster.get("AssociatedRoles", [])}:
        rds.add_role_to_db_cluster(DBClusterIdentifier=cluster_id, RoleArn=role_arn)
        actions.append(f"added role {role_name} to cluster {cluster_id}")
        changed = True
    report = SetupReport(role_arn, group, version, actions, reboot_needed=changed)
    log.info("%s", report.reboot_note(cluster_id))
    return report


def _describe_cluster(rds: Any, cluster_id: str) -> dict[str, Any]:
    try:
        return rds.describe_db_clusters(DBClusterIdentifier=cluster_id)["DBClusters"][0]
    except rds.exceptions.DBClusterNotFoundFault as exc:
        raise BadRequest(f"no DB cluster {cluster_id!r} in {rds.meta.region_name}") from exc


def _ensure_role(iam: Any, role_name: str, actions: list[str]) -> str:
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(
            RoleName=role_name,
            AssumeRolePolicyDocument=json.dumps(RDS_TRUST_POLICY),
            Description="Lets Aurora MySQL call recsql SageMaker endpoints",
        )["Role"]
        actions.append(f"created IAM role {role_name}")
        return role["Arn"]
    iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(RDS_TRUST_POLICY))
    return role["Arn"]


def _ensure_parameter(rds: Any, group: str, family: str, role_arn: str, actions: list[str]) -> bool:
    """Create the group if needed and set the role parameter. True when something changed."""
    try:
        rds.describe_db_cluster_parameter_groups(DBClusterParameterGroupName=group)
    except rds.exceptions.DBParameterGroupNotFoundFault:
        rds.create_db_cluster_parameter_group(
            DBClusterParameterGroupName=group,
            DBParameterGroupFamily=family,
            Description="recsql: Aurora machine learning (SageMaker role)",
        )
        actions.append(f"created cluster parameter group {group} ({family})")
    params = rds.describe_db_cluster_parameters(DBClusterParameterGroupName=group)["Parameters"]
    current = {p["ParameterName"]: p.get("ParameterValue") for p in params}
    if current.get(SAGEMAKER_ROLE_PARAMETER) == role_arn:
        return False
    rds.modify_db_cluster_parameter_group(
        DBClusterParameterGroupName=group,
        Parameters=[
            {
                "ParameterName": SAGEMAKER_ROLE_PARAMETER,
                "ParameterValue": role_arn,
                "ApplyMethod": "pending-reboot",
            }
        ],
    )
    actions.append(f"set {SAGEMAKER_ROLE_PARAMETER} in {group}")
    return True
