"""Small REES46-shaped event files written by the tests themselves (deterministic)."""

from __future__ import annotations

import gzip
from pathlib import Path

HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
BRANDS = ["apple", "samsung", "", 'acme, "the best"', "xiaomi"]
CATEGORIES = ["electronics.smartphone", "", "appliances.kitchen.kettle", "apparel.shoes"]
TYPES = ["view"] * 6 + ["cart", "purchase"]


def event_lines(n: int, *, users: int = 40, products: int = 30, start: int = 0) -> list[str]:
    lines = []
    for i in range(start, start + n):
        user = 500_000_000 + (i * 7) % users
        product = 1_000_000 + (i * 13 + i // users) % products
        brand = BRANDS[product % len(BRANDS)]
        brand = f'"{brand.replace(chr(34), chr(34) * 2)}"' if "," in brand else brand
        day, hour, minute, second = 1 + (i // 5000) % 28, (i // 3600) % 24, (i // 60) % 60, i % 60
        lines.append(
            f"2019-10-{day:02d} {hour:02d}:{minute:02d}:{second:02d} UTC,"
            f"{TYPES[i % len(TYPES)]},{product},{2_000_000 + product % 4},"
            f"{CATEGORIES[product % len(CATEGORIES)]},{brand},{(product % 100) + 0.99:.2f},"
            f"{user},sess-{user}-{i // 50}"
        )
    return lines


def write_events(path: Path, lines: list[str]) -> Path:
    text = HEADER + "\n" + "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path
