"""Synthetic A/B experiments for the ab-report tests: capture files in SageMaker's
data-capture layout and REES46 event files, with a planted difference between variants."""

from __future__ import annotations

import base64
import csv
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

START = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)
HEADER = [
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
]


def capture_record(
    request: str | bytes,
    reply: str | bytes,
    when: datetime,
    content_type: str = "application/json",
    encoding: str = "JSON",
) -> dict:
    """One data-capture line as SageMaker writes it."""

    def part(body: str | bytes, mode: str) -> dict:
        raw = body.encode() if isinstance(body, str) else body
        data = base64.b64encode(raw).decode() if encoding == "BASE64" else raw.decode()
        return {
            "observedContentType": content_type,
            "mode": mode,
            "data": data,
            "encoding": encoding,
        }

    return {
        "captureData": {
            "endpointInput": part(request, "INPUT"),
            "endpointOutput": part(reply, "OUTPUT"),
        },
        "eventMetadata": {
            "eventId": str(uuid.uuid4()),
            "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "eventVersion": "0",
    }


def topk_record(users: list[int | None], lists: list[list[int]], when: datetime) -> dict:
    """A JSON top-K request for `users` and the server's reply."""
    request = json.dumps({"user_id": users, "top_k": len(lists[0])})
    reply = json.dumps(
        {
            "predictions": [
                {"user_id": u, "product_ids": ids, "scores": [0.1] * len(ids), "ranked_by": "user"}
                for u, ids in zip(users, lists, strict=True)
            ]
        }
    )
    return capture_record(request, reply, when)


def write_capture(
    root: Path, variant: str, records: list[dict], endpoint: str = "recsql-ep", torn: bool = False
) -> None:
    """Files by inference hour: root/endpoint/variant/YYYY/MM/DD/HH/<uuid>.jsonl; `torn`
    ends each file with half a line, as a writer killed mid-write leaves it."""
    by_hour: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        when = datetime.strptime(record["eventMetadata"]["inferenceTime"], "%Y-%m-%dT%H:%M:%SZ")
        by_hour[when.strftime("%Y/%m/%d/%H")].append(record)
    for hour, items in by_hour.items():
        folder = root / endpoint / variant / hour
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in items)
        if torn:
            text += json.dumps(items[0])[:40]
        (folder / f"{uuid.uuid4()}.jsonl").write_text(text)


def write_events(path: Path, events: list[tuple[datetime, str, int, int, float | None]]) -> None:
    """(time, type, product, user, price) rows as a REES46 CSV, sorted by time."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for when, kind, product, user, price in sorted(events):
            writer.writerow(
                [
                    when.strftime("%Y-%m-%d %H:%M:%S UTC"),
                    kind,
                    product,
                    2053013555631882655,
                    "electronics.smartphone",
                    "acme",
                    "" if price is None else f"{price:.2f}",
                    user,
                    "s",
                ]
            )


@dataclass
class Experiment:
    capture: Path
    events: Path


def make_experiment(
    root: Path,
    lift: dict[str, float],
    users_per_variant: int = 400,
    buy: float = 0.05,
    items: int = 5,
    seed: int = 0,
) -> Experiment:
    """Each variant's users get 1-3 top-K lists over two days; each item shown is viewed
    (20%), carted (6%) and bought (`buy` * (1 + lift[variant])) within 20 hours, and also
    bought again 30-40 hours later (outside a 24h window) and before it was shown, at the
    same rate for every variant, with unrelated purchases beside: only the planted lift
    separates the variants inside the window."""
    rng = np.random.default_rng(seed)
    capture, events = root / "capture", []
    prices = rng.uniform(5, 200, 1000).round(2)
    for v, (variant, planted) in enumerate(sorted(lift.items())):
        records = []
        for user in range(v * 100_000 + 1, v * 100_000 + users_per_variant + 1):
            for _ in range(rng.integers(1, 4)):
                when = START + timedelta(minutes=int(rng.integers(0, 2 * 24 * 60)))
                shown = [int(p) for p in rng.choice(1000, items, replace=False) + 1_000_000]
                records.append(topk_record([user], [shown], when))
                for product in shown:
                    price = float(prices[product - 1_000_000])

                    def at(lo: float, hi: float, when: datetime = when) -> datetime:
                        return when + timedelta(minutes=float(rng.uniform(lo, hi)) * 60)

                    if rng.random() < 0.20:
                        events.append((at(0.1, 20), "view", product, user, price))
                    if rng.random() < 0.06:
                        events.append((at(0.1, 20), "cart", product, user, price))
                    if rng.random() < buy * (1 + planted):
                        events.append((at(0.1, 20), "purchase", product, user, price))
                    if rng.random() < 0.1:
                        events.append((at(30, 40), "purchase", product, user, price))
                    if rng.random() < 0.1:
                        events.append((at(-5, -0.1), "purchase", product, user, price))
            if rng.random() < 0.3:
                events.append((START, "purchase", 999, user, 10.0))
        write_capture(capture, variant, records)
    path = root / "events.csv"
    write_events(path, events)
    return Experiment(capture, path)
