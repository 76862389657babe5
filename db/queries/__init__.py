"""Example queries users can copy, for DuckDB and MySQL/MariaDB/Aurora MySQL 3.

They read the tables `recsql load` writes (events, users, products), call
`will_purchase(user_id, product_id)`, and `scores_by_brand` reads the table
`recsql score` writes. Parameters: DuckDB `$name`, PyMySQL `%(name)s`; the SQL
is otherwise the same. (Window functions need MySQL 8 / Aurora MySQL 3 or
MariaDB 10.2+.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from model.errors import BadRequest


@dataclass(frozen=True)
class ExampleQuery:
    name: str
    title: str
    sql: str  # with {p:name} placeholders, rendered per engine
    defaults: dict[str, int]

    def render(self, engine: str) -> str:
        """The SQL with this engine's parameter markers."""
        marker = "${}" if engine == "duckdb" else "%({})s"
        return re.sub(r"\{p:(\w+)\}", lambda m: marker.format(m.group(1)), self.sql)

    def literal(self, params: dict[str, int] | None = None) -> str:
        """The SQL with the parameter values written in (integers only): for copying."""
        values = {**self.defaults, **(params or {})}
        return re.sub(r"\{p:(\w+)\}", lambda m: str(int(values[m.group(1)])), self.sql)


USER_CANDIDATES = ExampleQuery(
    "user_candidates",
    "Score a user's candidate products (viewed or carted, not bought) and order them",
    """\
SELECT c.product_id, p.category_code, p.brand, p.price,
       will_purchase(c.user_id, c.product_id) AS score
FROM (SELECT DISTINCT user_id, product_id FROM events
      WHERE user_id = {p:user_id} AND event_type IN ('view', 'cart')) AS c
JOIN products AS p ON p.product_id = c.product_id
WHERE c.product_id NOT IN (SELECT product_id FROM events
                           WHERE user_id = {p:user_id} AND event_type = 'purchase')
ORDER BY score DESC, c.product_id
LIMIT 10""",
    {"user_id": 0},
)

SEGMENT_TOP_PRODUCTS = ExampleQuery(
    "segment_top_products",
    "Top 3 of the most-bought products for each user of a segment (carted, never bought)",
    """\
WITH segment AS (
    SELECT user_id FROM users WHERE n_carts > 0 AND n_purchases = 0
    ORDER BY n_events DESC, user_id LIMIT {p:users}
), popular AS (
    SELECT product_id FROM products ORDER BY n_purchases DESC, n_events DESC, product_id
    LIMIT {p:candidates}
), scored AS (
    SELECT s.user_id, p.product_id, will_purchase(s.user_id, p.product_id) AS score
    FROM segment AS s CROSS JOIN popular AS p
), ranked AS (
    SELECT user_id, product_id, score,
           ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY score DESC, product_id) AS rnk
    FROM scored WHERE score IS NOT NULL
)
SELECT user_id, product_id, score, rnk FROM ranked WHERE rnk <= 3
ORDER BY user_id, rnk""",
    {"users": 20, "candidates": 50},
)

USER_BRAND_AFFINITY = ExampleQuery(
    "user_brand_affinity",
    "A user's predicted affinity per category and brand (popular products only)",
    """\
SELECT p.category_code, p.brand, COUNT(*) AS products,
       AVG(will_purchase({p:user_id}, p.product_id)) AS avg_score
FROM (SELECT product_id, category_code, brand FROM products
      WHERE brand IS NOT NULL ORDER BY n_events DESC, product_id LIMIT {p:candidates}) AS p
GROUP BY p.category_code, p.brand
ORDER BY avg_score DESC, p.brand
LIMIT 10""",
    {"user_id": 0, "candidates": 500},
)

SCORES_BY_BRAND = ExampleQuery(
    "scores_by_brand",
    "Join the scores table (from `recsql score`) with product category and brand",
    """\
SELECT p.category_code, p.brand, COUNT(*) AS pairs,
       AVG(s.score) AS avg_score, MAX(s.score) AS best
FROM scores AS s JOIN products AS p ON p.product_id = s.product_id
WHERE s.score IS NOT NULL
GROUP BY p.category_code, p.brand
HAVING COUNT(*) >= {p:min_pairs}
ORDER BY avg_score DESC, p.brand
LIMIT 10""",
    {"min_pairs": 1},
)

EXAMPLES: dict[str, ExampleQuery] = {
    q.name: q for q in (USER_CANDIDATES, SEGMENT_TOP_PRODUCTS, USER_BRAND_AFFINITY, SCORES_BY_BRAND)
}


def run_example_query(
    engine: str, connection: Any, name: str, params: dict[str, int] | None = None
) -> tuple[list[str], list[tuple]]:
    """Run one example on a DuckDB connection (functions installed) or a PyMySQL connection.

    Returns (column names, rows).
    """
    query = EXAMPLES.get(name)
    if query is None:
        raise BadRequest(f"no example query {name!r}; known: {', '.join(EXAMPLES)}")
    values = {k: int(v) for k, v in {**query.defaults, **(params or {})}.items()}
    sql = query.render(engine)
    used = {k: v for k, v in values.items() if f"{{p:{k}}}" in query.sql}
    if engine == "duckdb":
        cur = connection.execute(sql, used)
        columns = [d[0] for d in cur.description]
        return columns, cur.fetchall()
    if engine == "mysql":
        with connection.cursor() as cur:
            cur.execute(sql, used)
            return [d[0] for d in cur.description], list(cur.fetchall())
    raise BadRequest(f"engine must be duckdb or mysql, not {engine!r}")


def run_example_queries(
    engine: str, connection: Any, params: dict[str, int] | None = None
) -> dict[str, tuple[list[str], list[tuple]]]:
    """Run every example (scores_by_brand only when a scores table exists)."""
    results = {}
    for name in EXAMPLES:
        if name == "scores_by_brand" and not _has_table(engine, connection, "scores"):
            continue
        results[name] = run_example_query(engine, connection, name, params)
    return results


def _has_table(engine: str, connection: Any, table: str) -> bool:
    if engine == "duckdb":
        sql = "SELECT count(*) FROM information_schema.tables WHERE table_name = ?"
        return bool(connection.execute(sql, [table]).fetchall()[0][0])
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
        return bool(cur.fetchall()[0][0])


def print_table(columns: list[str], rows: list[tuple]) -> None:
    """A query result as an aligned text table, NULLs shown as NULL."""

    def fmt(v: Any) -> str:
        if v is None:
            return "NULL"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


__all__ = ["EXAMPLES", "ExampleQuery", "print_table", "run_example_queries", "run_example_query"]
