"""`recsql ab-report`: exact attribution on a hand-made capture, a planted lift found, the
A/A error rate, the CLI end to end, the SQL sources and bad inputs."""

from __future__ import annotations

import base64
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest
from scipy.stats import binom

import recsql_cli
from abtest import analyse, build_report
from abtest.cli import parse_window
from abtest.recommendations import read_recommendations
from tests.abtest.synthetic import (
    START,
    capture_record,
    make_experiment,
    topk_record,
    write_capture,
    write_events,
)

H = timedelta(hours=1)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    """Two variants, every kind of captured request once, events inside and outside
    the window (the expected counts are in test_attribution_counts_exactly)."""
    capture = tmp_path / "capture"
    csv_topk = capture_record(  # CSV top-K (top_k in the custom attributes), base64
        b"2\n", b"10 13\n", START, content_type="text/csv", encoding="BASE64"
    )
    write_capture(
        capture,
        "A",
        [
            topk_record([1], [[10, 11, 12]], START),
            csv_topk,
            capture_record(b"1,10\n1,11\n", b"0.25\n0.5\n", START, "text/csv", "CSV"),
        ],
        torn=True,
    )
    visitor = json.dumps({"predictions": [{"user_id": None, "product_ids": [20], "scores": [1]}]})
    write_capture(
        capture,
        "B",
        [
            topk_record([3], [[20, 21]], START),
            capture_record(json.dumps({"history": [20], "top_k": 1}), visitor, START),
            capture_record(
                json.dumps({"user_id": [3], "product_id": [20]}), '{"predictions":[0.1]}', START
            ),
        ],
    )
    events = tmp_path / "events.csv"
    write_events(
        events,
        [
            (START + 1 * H, "view", 10, 1, 5.5),
            (START + 2 * H, "cart", 10, 1, 5.5),
            (START + 3 * H, "purchase", 10, 1, 5.5),
            (START + 25 * H, "purchase", 11, 1, 7.0),  # after a 24h window
            (START - 1 * H, "view", 12, 1, 1.0),  # before the recommendation
            (START + 1 * H, "purchase", 99, 2, 3.0),  # not recommended
            (START + 1 * H, "view", 13, 2, None),
            (START + 1 * H, "purchase", 20, 3, 2.0),
            (START + 2 * H, "purchase", 20, 3, 2.0),  # bought twice: 2 purchases, 1 item
        ],
    )
    return capture, events


def by_name(report) -> dict:
    return {v.name: v for v in report.variants}


def test_attribution_counts_exactly(small: tuple[Path, Path]) -> None:
    capture, events = small
    report = build_report(capture, [events])
    a, b = by_name(report)["A"], by_name(report)["B"]
    assert (a.users, a.requests, a.items, a.purchases, a.revenue) == (2, 2, 5, 1, 5.5)
    assert a.metrics["viewed_share"].value == pytest.approx(2 / 5)  # 10 (user 1), 13 (user 2)
    assert a.metrics["carted_share"].value == pytest.approx(1 / 5)
    assert a.metrics["purchased_share"].value == pytest.approx(1 / 5)
    assert a.metrics["purchases_per_user"].value == pytest.approx(1 / 2)
    assert (b.users, b.items, b.purchases, b.revenue) == (1, 2, 2, 4.0)
    assert b.metrics["purchased_share"].value == pytest.approx(1 / 2)
    assert report.skipped == {"no_user": 1, "pair_scoring": 2}
    assert report.control == "A" and report.shared_users == 0
    # a longer window reaches the purchase 25 hours later
    wide = by_name(build_report(capture, [events], window_s=26 * 3600))["A"]
    assert (wide.purchases, wide.revenue) == (2, 12.5)


def test_a_planted_lift_is_found(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path, {"A": 0.0, "B": 0.6}, seed=3)
    report = build_report(exp.capture, [exp.events])
    (c,) = report.comparisons
    assert c.variant == "B" and c.significant and c.p_value < 0.05
    assert c.ci_low < 0.6 < c.ci_high
    assert report.verdict.startswith("variant B sold more than A: +")
    # the same data on the items-bought share, and with B as the control: A sold less
    share = build_report(exp.capture, [exp.events], metric="purchased_share", control="B")
    assert share.verdict.startswith("variant A sold less than B: -")


def test_equal_variants_are_not_called_different(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path, {"A": 0.0, "B": 0.0, "C": 0.0}, users_per_variant=150, seed=2)
    report = build_report(exp.capture, [exp.events])
    assert not any(c.significant for c in report.comparisons)
    assert report.verdict.startswith("no difference detected: ")
    assert "cannot be told apart" in report.verdict
    assert all(c.confidence == pytest.approx(1 - 0.05 / 2) for c in report.comparisons)


def aa_dataset(rng: np.random.Generator, variants: int, users: int = 300) -> dict:
    """Per-user columns drawn from one population for every variant: heterogeneous users
    (beta-distributed buy rates), heavy-tailed prices."""
    data = {}
    for v in range(variants):
        items = 1 + rng.poisson(8, users)
        rate = rng.beta(1, 15, users)
        bought = rng.binomial(items, rate)
        purchases = bought + rng.poisson(0.05, users)
        revenue = np.array([rng.lognormal(3, 1, n).sum() for n in purchases])
        data[f"V{v}"] = {
            "items": items.astype(float),
            "requests": np.ones(users),
            "viewed": rng.binomial(items, 0.2).astype(float),
            "carted": rng.binomial(items, 0.06).astype(float),
            "bought": bought.astype(float),
            "purchases": purchases.astype(float),
            "revenue": revenue,
        }
    return data


@pytest.mark.parametrize("metric", ["purchases_per_user", "purchased_share", "revenue_per_user"])
def test_aa_false_positive_rate_is_alpha(metric: str) -> None:
    """300 A/A datasets: the share called different is alpha within the binomial bounds
    (99.8% two-sided: a correct test fails this 1 run in 500, a broken one almost always)."""
    rng, runs, alpha = np.random.default_rng(7), 300, 0.05
    calls = sum(
        analyse(aa_dataset(rng, 2), metric, alpha=alpha)[1][0].significant for _ in range(runs)
    )
    assert binom.ppf(0.001, runs, alpha) <= calls <= binom.ppf(0.999, runs, alpha)


def test_aaa_family_error_rate_stays_under_alpha() -> None:
    rng, runs, alpha = np.random.default_rng(11), 300, 0.05
    calls = sum(
        any(c.significant for c in analyse(aa_dataset(rng, 3), alpha=alpha)[1]) for _ in range(runs)
    )
    assert calls <= binom.ppf(0.999, runs, alpha)


def test_cli_end_to_end(small: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    exp = make_experiment(tmp_path / "exp", {"A": 0.0, "B": 0.6}, users_per_variant=200)
    plot = tmp_path / "lift.png"
    argv = ["ab-report", "--capture", str(exp.capture), str(exp.events), "--plot", str(plot)]
    assert recsql_cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "purch/user" in table.splitlines()[2] and "\nverdict: variant B sold more" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert recsql_cli.main([*argv[:4], "--json", "--window", "6h", "--every", "day"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["window_s"] == 6 * 3600 and doc["metric"] == "purchases_per_user"
    assert [v["name"] for v in doc["variants"]] == ["A", "B"]
    assert doc["comparisons"][0]["variant"] == "B" and len(doc["series"]["A"]) == 3  # 3 days
    days = doc["series"]["A"]  # each day's estimate is over that day's users
    assert all(d["users"] > 30 for d in days) and sum(d["users"] for d in days) >= 200


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control", "Z"], "no variant 'Z' in the capture; variants: A, B"),
        (["--plot", "x.jpg"], "the picture is a PNG"),
        (["--events-table", "ev; drop", "--events-db", "x.duckdb"], "exactly one"),
    ],
)
def test_bad_options_are_one_line_errors(small, capsys, extra, message) -> None:
    capture, events = small
    assert recsql_cli.main(["ab-report", "--capture", str(capture), str(events), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_inputs_are_one_line_errors(small, tmp_path: Path, capsys) -> None:
    capture, events = small
    (tmp_path / "empty").mkdir()
    no_users = tmp_path / "no_users.csv"
    no_users.write_text("event_time,event_type,product_id,price\n")
    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("event_time,event_type,product_id,user_id\n2019-11-02 10:00,view,1,2\n")
    cases = [
        (["--capture", str(tmp_path / "empty"), str(events)], "no capture records"),
        (["--capture", str(tmp_path / "nowhere"), str(events)], "no such capture folder"),
        (["--capture", str(capture), str(no_users)], "missing column(s) user_id"),
        (["--capture", str(capture), str(bad_time)], "cannot read the events"),
        (["--capture", str(capture), str(tmp_path / "gone.csv")], "no such file or folder"),
        (["--capture", str(capture)], "give event files, or --events-db"),
        (["--capture", str(capture), "--events-db", str(events)], "cannot open as a DuckDB"),
    ]
    for argv, message in cases:
        assert recsql_cli.main(["ab-report", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit) as exit_:
        recsql_cli.main(["ab-report", "--capture", str(capture), str(events), "--window", "1w"])
    assert exit_.value.code == 2


def test_several_endpoints_need_one_named(small, capsys) -> None:
    capture, events = small
    write_capture(capture, "A", [topk_record([1], [[10]], START)], endpoint="other-ep")
    with pytest.raises(Exception, match="holds endpoints other-ep, recsql-ep; name one"):
        build_report(capture, [events])
    assert by_name(build_report(capture, [events], endpoint="recsql-ep"))["A"].items == 5


def test_window_parsing() -> None:
    assert [parse_window(t) for t in ("24h", "30m", "30min", "7d", "900s", "1.5h")] == [
        86400, 1800, 1800, 604800, 900, 5400
    ]  # fmt: skip


def test_events_from_a_duckdb_table(small, tmp_path: Path) -> None:
    capture, events = small
    db = tmp_path / "events.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(
            "CREATE TABLE events AS SELECT strptime(event_time, '%Y-%m-%d %H:%M:%S UTC')"
            " AS event_time, event_type, product_id, user_id, price"
            " FROM read_csv(?, all_varchar = true)",
            [str(events)],
        )
    from_db = build_report(capture, events_db=db)
    assert from_db.to_json() == build_report(capture, [events]).to_json()
    with pytest.raises(Exception, match="no table 'nope'"):
        build_report(capture, events_db=db, events_table="nope")
    with pytest.raises(Exception, match="is not a table name"):
        build_report(capture, events_db=db, events_table='events"; DROP TABLE events; --')
    with duckdb.connect(str(db)) as con:  # REES46 text times, as read_csv leaves them
        con.execute(
            "CREATE TABLE raw AS SELECT * FROM read_csv(?, all_varchar = true)", [str(events)]
        )
    as_text = build_report(capture, events_db=db, events_table="raw")
    assert as_text.to_json() == from_db.to_json()


@pytest.mark.mysql
def test_events_from_a_mysql_table(small) -> None:
    from db.load import mysql_connect

    url = os.environ.get("RECSQL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    try:
        conn = mysql_connect(url, connect_timeout=3)
    except Exception as exc:
        pytest.skip(f"no MariaDB/MySQL server at {url}: {exc}")
    capture, events = small
    table = f"ab_events_{uuid.uuid4().hex[:8]}"
    rows = [line.split(",") for line in events.read_text().splitlines()[1:]]
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE `{table}` (event_time DATETIME, event_type VARCHAR(16),"
                " product_id BIGINT, user_id BIGINT, price DECIMAL(12,2) NULL)"
            )
            cur.executemany(
                f"INSERT INTO `{table}` VALUES (%s, %s, %s, %s, %s)",
                [(r[0][:-4], r[1], r[2], r[7], r[6] or None) for r in rows],
            )
        from_db = build_report(capture, events_url=url, events_table=table)
        assert from_db.to_json() == build_report(capture, [events]).to_json()
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        conn.close()


def test_torn_lines_are_skipped_and_base64_is_read(small) -> None:
    capture, _ = small
    files = sorted(capture.rglob("*.jsonl"))
    assert any(not f.read_text().endswith("\n") for f in files)  # the torn line is there
    recs = read_recommendations(capture)
    assert recs.counts["records"] == 6 and recs.counts["lists"] == 3
    assert sorted(zip(recs.user_id, recs.product_id, strict=True))[:5] == [
        (1, 10), (1, 11), (1, 12), (2, 10), (2, 13)
    ]  # fmt: skip
    line = json.loads(files[0].read_text().splitlines()[1])
    assert line["captureData"]["endpointOutput"]["encoding"] == "BASE64"
    assert base64.b64decode(line["captureData"]["endpointOutput"]["data"]) == b"10 13\n"


def test_what_the_server_writes_is_read(tmp_path: Path) -> None:
    """The contract with serve/: the real capture writer and the real reply encoders."""
    from serve.capture import Capture
    from serve.codecs import encode_csv, encode_json, encode_jsonlines
    from serve.records import Rankings, Scores

    def ranks(users: list[int | None], lists: list[list[int]], **kw) -> Rankings:
        scores = [np.linspace(0.9, 0.1, len(ids)) for ids in lists]
        return Rankings([np.array(ids) for ids in lists], scores, users, **kw)

    both = ranks([1, 2], [[10, 11], [12]])
    visitor = ranks([None], [[10, 11]], ranked_by=["history"])
    json_type, csv_type = "application/json", "text/csv"
    capture = Capture(tmp_path / "cap", "ep")
    capture.record(
        "A", None, b'{"user_id": [1, 2], "top_k": 2}', json_type, encode_json(both), json_type
    )
    capture.record("A", None, b"1\n2\n", csv_type, encode_csv(both), csv_type)  # top_k attribute
    capture.record(
        "B", "i-1", b'{"history": [10], "top_k": 2}', json_type, encode_json(visitor), json_type
    )
    capture.record(
        "B", None, b"1,10\n2,11\n", csv_type, encode_csv(Scores(np.array([0.5, 1.0]))), csv_type
    )
    capture.record(
        "B",
        None,
        b'{"user_id": 3, "top_k": 1}',
        json_type,
        encode_jsonlines(ranks([3], [[7]])),
        "application/jsonlines",
    )
    capture.close()
    recs = read_recommendations(tmp_path / "cap")
    assert dict(recs.counts) == {"records": 5, "lists": 5, "no_user": 1, "pair_scoring": 1}
    assert sorted(zip(recs.variant, recs.user_id, recs.product_id, strict=True)) == [
        ("A", 1, 10), ("A", 1, 10), ("A", 1, 11), ("A", 1, 11), ("A", 2, 12), ("A", 2, 12),
        ("B", 3, 7),
    ]  # fmt: skip
