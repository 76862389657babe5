"""The insurance-fraud workflow's data: seeded claims + customers tables, and their join.

No real data for this workflow exists offline, so `generate` writes two tables
shaped like the auto-insurance example's (one row per policy in customers, one
claim per policy in claims, joined on `policy_id`) with a planted fraud
signal: fraud is more likely for new customers, many past claims, high claim
amounts relative to the premium, no police report, late-night incidents, and
for one incident type ("Theft"). A model that finds the signal gets AUC well
above 0.5; one that finds nothing gets 0.5.

`join_tables` is the reusable preprocessing step: claims LEFT JOIN customers on
policy_id, the id dropped, the label column last; the result feeds
`recsql train-tabular --target fraud` (which encodes and splits).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from model.errors import DataError

CUSTOMER_COLUMNS = (
    "policy_id",
    "customer_age",
    "months_as_customer",
    "num_claims_past_year",
    "num_insurers_past_5_years",
    "policy_state",
    "policy_deductable",
    "policy_annual_premium",
    "customer_gender",
    "customer_education",
    "auto_year",
)
CLAIM_COLUMNS = (
    "policy_id",
    "incident_type",
    "collision_type",
    "incident_severity",
    "authorities_contacted",
    "num_vehicles_involved",
    "num_injuries",
    "num_witnesses",
    "police_report_available",
    "incident_hour",
    "vehicle_claim",
    "injury_claim",
    "fraud",
)
_STATES = ("CA", "WA", "AZ", "OR", "NV", "ID")
_EDUCATION = ("High School", "Associate", "Bachelor", "Masters", "Doctorate")
_INCIDENTS = ("Collision", "Break-In", "Theft", "Vandalism")
_COLLISIONS = ("Front", "Rear", "Side", "na")
_SEVERITY = ("Minor", "Major", "Totaled")
_AUTHORITIES = ("Police", "Ambulance", "Fire", "None")


def generate(rows: int, seed: int = 0) -> tuple[dict[str, list], dict[str, list]]:
    """(customers, claims) as column dicts; same seed, same tables."""
    if rows < 1:
        raise DataError("--rows must be at least 1")
    rng = np.random.default_rng(seed)
    pick = lambda options, p=None: rng.choice(np.array(options), rows, p=p)  # noqa: E731
    ids = rng.permutation(np.arange(100_000, 100_000 + 4 * rows))[:rows]
    age = rng.integers(18, 80, rows)
    tenure = np.minimum(rng.exponential(60, rows).astype(int) + 1, (age - 17) * 12)
    past_claims = rng.poisson(0.4, rows)
    insurers = rng.integers(1, 6, rows)
    premium = np.round(rng.normal(2800, 500, rows).clip(800), 2)
    customers = {
        "policy_id": ids,
        "customer_age": age,
        "months_as_customer": tenure,
        "num_claims_past_year": past_claims,
        "num_insurers_past_5_years": insurers,
        "policy_state": pick(_STATES),
        "policy_deductable": pick((500, 750, 1000)),
        "policy_annual_premium": premium,
        "customer_gender": pick(("Male", "Female", "Other"), (0.49, 0.49, 0.02)),
        "customer_education": pick(_EDUCATION),
        "auto_year": rng.integers(2001, 2022, rows),
    }
    incident = pick(_INCIDENTS, (0.6, 0.15, 0.1, 0.15))
    severity = pick(_SEVERITY, (0.5, 0.35, 0.15))
    police = pick(("Yes", "No", ""), (0.5, 0.4, 0.1))  # "" = not recorded
    hour = rng.integers(0, 24, rows)
    vehicle = np.round(rng.gamma(2.0, 6000, rows) * np.where(severity == "Totaled", 2.5, 1.0))
    injury = np.round(np.where(rng.random(rows) < 0.3, rng.gamma(1.5, 4000, rows), 0.0))
    logit = (
        -4.0
        + 1.8 * (tenure < 12)
        + 0.9 * past_claims
        + 1.5 * ((vehicle + injury) / premium > 8)
        + 1.2 * (police == "No")
        + 1.4 * ((hour <= 4) | (hour >= 23))
        + 1.6 * (incident == "Theft")
        - 0.5 * (insurers <= 1)
    )
    fraud = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    order = rng.permutation(rows)  # claims arrive in another order than customers
    claims = {
        "policy_id": ids,
        "incident_type": incident,
        "collision_type": np.where(incident == "Collision", pick(_COLLISIONS[:3]), "na"),
        "incident_severity": severity,
        "authorities_contacted": pick(_AUTHORITIES, (0.4, 0.2, 0.1, 0.3)),
        "num_vehicles_involved": np.where(incident == "Collision", rng.integers(1, 5, rows), 1),
        "num_injuries": rng.poisson(0.3, rows),
        "num_witnesses": rng.integers(0, 4, rows),
        "police_report_available": police,
        "incident_hour": hour,
        "vehicle_claim": vehicle,
        "injury_claim": injury,
        "fraud": fraud,
    }
    claims = {k: np.asarray(v)[order] for k, v in claims.items()}
    return (
        {k: np.asarray(v).tolist() for k, v in customers.items()},
        {k: v.tolist() for k, v in claims.items()},
    )


def write_table(path: Path, table: dict[str, list]) -> None:
    names = list(table)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        writer.writerows(zip(*(table[n] for n in names), strict=True))


def read_table(path: Path) -> dict[str, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            records = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from exc
    if not records:
        raise DataError(f"{path}: empty file; expected a header row")
    header, body = records[0], records[1:]
    if any(len(r) != len(header) for r in body):
        raise DataError(f"{path}: rows with a different field count than the header")
    return {name: [r[j] for r in body] for j, name in enumerate(header)}


def join_tables(
    claims: dict[str, list],
    customers: dict[str, list],
    key: str = "policy_id",
    label: str = "fraud",
) -> dict[str, list]:
    """claims LEFT JOIN customers on `key`: customer fields empty when the policy is unknown;
    the key dropped, the label last."""
    for name, table in (("claims", claims), ("customers", customers)):
        if key not in table:
            raise DataError(f"{name} table has no {key!r} column")
    if label not in claims:
        raise DataError(f"claims table has no label column {label!r}")
    cust_keys = [str(k) for k in customers[key]]
    if len(set(cust_keys)) != len(cust_keys):
        raise DataError(f"customers table repeats a {key}; it must be unique")
    position = {k: i for i, k in enumerate(cust_keys)}
    rows = [position.get(str(k), -1) for k in claims[key]]
    joined: dict[str, list] = {}
    for name, values in claims.items():
        if name not in (key, label):
            joined[name] = list(values)
    for name, values in customers.items():
        if name != key:
            joined[f"customer.{name}" if name in joined else name] = [
                values[r] if r >= 0 else "" for r in rows
            ]
    joined[label] = list(claims[label])
    return joined


def run_synth_fraud_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    customers, claims = generate(args.rows, args.seed)
    write_table(out / "customers.csv", customers)
    write_table(out / "claims.csv", claims)
    joined = join_tables(read_table(out / "claims.csv"), read_table(out / "customers.csv"))
    write_table(out / "dataset.csv", joined)
    rate = np.mean([int(v) for v in claims["fraud"]])
    print(
        f"wrote {out}/customers.csv, claims.csv and dataset.csv (joined): {args.rows} claims, "
        f"fraud rate {rate:.3f}"
    )
    return 0
