"""The insurance-fraud workflow: seeded claims + customers, their join, and a model that learns."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from model import load_model
from model.errors import DataError
from training import cli
from training.fraud import (
    CLAIM_COLUMNS,
    CUSTOMER_COLUMNS,
    generate,
    join_tables,
    read_table,
    write_table,
)
from training.tabular import TabularConfig, train_tabular


def test_generate_is_seeded_and_shaped():
    customers, claims = generate(300, seed=3)
    assert tuple(customers) == CUSTOMER_COLUMNS and tuple(claims) == CLAIM_COLUMNS
    assert generate(300, seed=3) == (customers, claims)
    assert generate(300, seed=4)[1]["fraud"] != claims["fraud"]
    assert sorted(customers["policy_id"]) == sorted(claims["policy_id"])
    assert customers["policy_id"] != claims["policy_id"]  # different row order: a real join
    assert 0.05 < sum(claims["fraud"]) / 300 < 0.5
    assert "" in claims["police_report_available"]  # missing values exist


def test_join_matches_each_claim_to_its_customer(tmp_path: Path):
    customers, claims = generate(200, seed=1)
    write_table(tmp_path / "customers.csv", customers)
    write_table(tmp_path / "claims.csv", claims)
    joined = join_tables(
        read_table(tmp_path / "claims.csv"), read_table(tmp_path / "customers.csv")
    )
    names = list(joined)
    assert names[-1] == "fraud" and "policy_id" not in names
    assert set(names) == (set(CLAIM_COLUMNS) | set(CUSTOMER_COLUMNS)) - {"policy_id"}
    by_id = {str(p): i for i, p in enumerate(customers["policy_id"])}
    for row in (0, 57, 199):
        source = by_id[str(claims["policy_id"][row])]
        assert joined["customer_age"][row] == str(customers["customer_age"][source])
        assert joined["policy_state"][row] == customers["policy_state"][source]
        assert joined["fraud"][row] == str(claims["fraud"][row])


def test_join_is_a_left_join_and_checks_keys():
    claims = {"policy_id": ["1", "2"], "amount": ["10", "20"], "fraud": ["0", "1"]}
    customers = {"policy_id": ["2"], "age": ["40"]}
    joined = join_tables(claims, customers)
    assert joined == {"amount": ["10", "20"], "age": ["", "40"], "fraud": ["0", "1"]}
    with pytest.raises(DataError, match="repeats a policy_id"):
        join_tables(claims, {"policy_id": ["2", "2"], "age": ["1", "2"]})
    with pytest.raises(DataError, match="no label column"):
        join_tables({"policy_id": ["1"]}, customers)


def test_cli_synth_then_train_finds_the_planted_signal(tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth-fraud", "--out", str(tmp_path), "--rows", "3000"])
    assert args.func(args) == 0
    assert "fraud rate" in capsys.readouterr().out
    assert {"customers.csv", "claims.csv", "dataset.csv"} <= {p.name for p in tmp_path.iterdir()}
    config = TabularConfig(target="fraud", progress=False, threads=1)
    summary = train_tabular(tmp_path / "dataset.csv", tmp_path / "model", config)
    assert summary["test_auc"] > 0.7  # the planted signal; noise alone gives ~0.5
    model = load_model(tmp_path / "model")
    assert "incident_type" in model.describe()["categorical"]
    assert model.classes == ["0", "1"]
