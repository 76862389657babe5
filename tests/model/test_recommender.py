"""IdIndex and Recommender: id lookups, pair scores, top-K, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from model.recommender import IdIndex, Recommender, best_k, relu_tower

# --- IdIndex ----------------------------------------------------------------------------------


def test_id_index_maps_known_ids_and_marks_unknown() -> None:
    index = IdIndex(np.array([900, -5, 2**62, 17]))
    rows = index.rows(np.array([17, 900, 18, -5, 2**62, 0, -(2**63), 2**63 - 1]))
    np.testing.assert_array_equal(rows, [3, 0, -1, 1, 2, -1, -1, -1])
    assert len(index) == 4


def test_id_index_with_arbitrary_row_order() -> None:
    ids = np.array([40, 10, 30, 20])
    rows = np.array([1, 3, 0, 2])
    index = IdIndex(ids, rows)
    np.testing.assert_array_equal(index.rows(np.array([10, 20, 30, 40, 50])), [3, 2, 0, 1, -1])
    np.testing.assert_array_equal(index.ids_by_row, [30, 40, 20, 10])


def test_id_index_keeps_the_query_shape() -> None:
    index = IdIndex(np.array([5, 6]))
    np.testing.assert_array_equal(index.rows(np.array([[5, 7], [6, 5]])), [[0, -1], [1, 0]])


def test_id_index_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        IdIndex(np.array([3, 1, 3]))


def test_empty_id_index_knows_nothing() -> None:
    index = IdIndex(np.array([], dtype=np.int64))
    np.testing.assert_array_equal(index.rows(np.array([0, 1])), [-1, -1])


def test_id_index_may_name_only_some_rows() -> None:
    """An index naming rows 0 and 4 of a bigger table (rows beyond len(ids))."""
    index = IdIndex(np.array([70, 80]), np.array([4, 0]))
    np.testing.assert_array_equal(index.rows(np.array([70, 80, 90])), [4, 0, -1])


# --- Recommender ------------------------------------------------------------------------------

USER_IDS = np.array([101, 102, 103])
ITEM_IDS = np.array([7, 8, 9, 10, 11])


def make_recommender(**kwargs) -> Recommender:
    rng = np.random.default_rng(0)
    e = 3
    weights = {
        "user_embeddings.weight": rng.normal(size=(3, e)),
        "item_embeddings.weight": rng.normal(size=(5, e)),
        "dense_user.weight": rng.normal(size=(e, e)),
        "dense_user.bias": np.full(e, 0.5),
        "dense_item.weight": rng.normal(size=(e, e)),
        "dense_item.bias": np.full(e, 0.5),
    }
    return Recommender.from_weights(weights, USER_IDS, ITEM_IDS, **kwargs)


def brute_force_scores(rec: Recommender, user_id: int) -> dict[int, float]:
    u = int(np.flatnonzero(USER_IDS == user_id)[0])
    return {
        int(i): float(rec.user_vectors[u] @ rec.item_vectors[r]) for r, i in enumerate(ITEM_IDS)
    }


def test_relu_tower_matches_definition() -> None:
    e = np.array([[1.0, -2.0], [0.5, 0.5]])
    w = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([0.0, 0.25])
    np.testing.assert_allclose(relu_tower(e, w, b), [[1.0, 0.0], [0.5, 1.25]])


def test_score_pairs_and_unknowns() -> None:
    rec = make_recommender()
    users = np.array([101, 103, 999, 102, 101])
    items = np.array([9, 7, 7, 12345, 11])
    got = rec.score(users, items)
    assert got.dtype == np.float32
    assert got[0] == pytest.approx(brute_force_scores(rec, 101)[9], rel=1e-6)
    assert got[1] == pytest.approx(brute_force_scores(rec, 103)[7], rel=1e-6)
    assert np.isnan(got[2]) and np.isnan(got[3])
    assert got[4] == pytest.approx(brute_force_scores(rec, 101)[11], rel=1e-6)


def test_score_empty_batch() -> None:
    assert make_recommender().score(np.array([], np.int64), np.array([], np.int64)).shape == (0,)


def test_top_k_is_the_best_k_in_order() -> None:
    rec = make_recommender()
    for user in USER_IDS:
        truth = brute_force_scores(rec, int(user))
        ids, scores = rec.top_k(int(user), k=3)
        # ties (dead ReLU units score 0) may come in any order: compare scores, then ids' scores
        np.testing.assert_allclose(scores, sorted(truth.values(), reverse=True)[:3], rtol=1e-6)
        np.testing.assert_allclose(scores, [truth[i] for i in ids.tolist()], rtol=1e-6)
        assert len(set(ids.tolist())) == 3


@pytest.mark.parametrize("n", [1, 7, 100, 5_000, 200_003])
@pytest.mark.parametrize("k", [1, 10, 333])
def test_best_k_matches_a_full_sort(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    scores = rng.normal(size=n).astype(np.float32)
    scores[rng.random(n) < 0.3] = -np.inf  # excluded items
    finite = np.flatnonzero(np.isfinite(scores))
    want = finite[np.argsort(-scores[finite], kind="stable")][:k]
    got = best_k(scores, k)
    np.testing.assert_array_equal(scores[got], scores[want])  # same scores, best first
    assert len(set(got.tolist())) == len(got) and np.isfinite(scores[got]).all()


def test_best_k_when_almost_everything_is_excluded() -> None:
    scores = np.full(100_000, -np.inf, np.float32)
    scores[[5, 70_000, 99_999]] = [1.0, 3.0, 2.0]
    np.testing.assert_array_equal(best_k(scores, 10), [70_000, 99_999, 5])
    assert len(best_k(np.full(10, -np.inf, np.float32), 3)) == 0
    assert len(best_k(np.ones(10, np.float32), 0)) == 0


def test_best_k_with_many_ties_returns_k_distinct_positions() -> None:
    scores = np.zeros(50_000, np.float32)
    scores[::1000] = 1.0
    got = best_k(scores, 60)
    assert len(set(got.tolist())) == 60
    assert (scores[got[:50]] == 1.0).all() and (scores[got[50:]] == 0.0).all()


def test_top_k_larger_than_catalogue_returns_everything() -> None:
    rec = make_recommender()
    ids, scores = rec.top_k(102, k=1000)
    assert sorted(ids.tolist()) == ITEM_IDS.tolist()
    assert np.all(np.diff(scores) <= 0)


def test_top_k_with_candidates_and_exclude() -> None:
    rec = make_recommender()
    all_scores = brute_force_scores(rec, 101)
    ids, scores = rec.top_k(101, k=10, candidates=np.array([11, 7, 7, 424242, 9]))
    assert ids.tolist() == sorted([11, 7, 9], key=lambda i: -all_scores[i])
    ids, _ = rec.top_k(101, k=10, candidates=np.array([11, 7, 9]), exclude=np.array([7, 5555]))
    assert sorted(ids.tolist()) == [9, 11]
    ids, _ = rec.top_k(101, k=10, exclude=np.array([8, 10]))
    assert sorted(ids.tolist()) == [7, 9, 11]


def test_top_k_edge_cases_return_empty() -> None:
    rec = make_recommender()
    for ids, scores in (
        rec.top_k(999, k=3),  # unknown user
        rec.top_k(101, k=0),
        rec.top_k(101, k=3, candidates=np.array([424242])),
        rec.top_k(101, k=3, exclude=ITEM_IDS),
    ):
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        assert len(ids) == len(scores) == 0


def test_top_k_never_returns_rows_without_an_id() -> None:
    """A product index naming only some table rows: the others must not be recommended."""
    rng = np.random.default_rng(1)
    weights = {
        "user_embeddings.weight": rng.normal(size=(1, 2)),
        "item_embeddings.weight": rng.normal(size=(6, 2)),
        "dense_user.weight": np.eye(2),
        "dense_user.bias": np.ones(2),
        "dense_item.weight": np.eye(2),
        "dense_item.bias": np.ones(2),
    }
    rec = Recommender.from_weights(
        weights, np.array([1]), np.array([50, 60]), np.array([0]), np.array([5, 2])
    )
    ids, scores = rec.top_k(1, k=10)
    assert sorted(ids.tolist()) == [50, 60]
    np.testing.assert_allclose(scores, sorted(rec.score(np.array([1, 1]), ids), reverse=True))


def test_fallback_policies() -> None:
    popularity = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    rec = make_recommender(global_mean=2.5, item_popularity=popularity)
    products = np.array([9, 4242, 7])
    assert np.isnan(rec.fallback_scores(products, "null")).all()
    np.testing.assert_array_equal(rec.fallback_scores(products, "mean"), [2.5, 2.5, 2.5])
    np.testing.assert_allclose(rec.fallback_scores(products, "popularity"), [0.3, 2.5, 0.1])
    without = make_recommender(global_mean=1.5)
    np.testing.assert_array_equal(without.fallback_scores(products, "popularity"), [1.5] * 3)


def test_describe() -> None:
    rec = make_recommender(info={"source": "test", "secret": "x"})
    d = rec.describe()
    assert (d["num_users"], d["num_items"], d["num_emb"]) == (3, 5, 3)
    assert d["source"] == "test" and "secret" not in d


# --- similar products -------------------------------------------------------------------------


def similar_recommender(seed: int = 3) -> Recommender:
    """40 products with ReLU-like item vectors, one of them all zero."""
    rng = np.random.default_rng(seed)
    items = np.maximum(rng.normal(size=(40, 6)), 0).astype(np.float32)
    items[5] = 0.0
    return Recommender(
        user_vectors=np.ones((1, 6), np.float32),
        item_vectors=items,
        users=IdIndex(np.array([1])),
        items=IdIndex(np.arange(40) * 10 + 1000),
    )


def loop_cosine(rec: Recommender, a: int, b: int) -> float:
    """The cosine of two products' item vectors, one float at a time."""
    x, y = (rec.item_vectors[(p - 1000) // 10].tolist() for p in (a, b))
    dot = sum(u * v for u, v in zip(x, y, strict=True))
    norms = sum(u * u for u in x) ** 0.5 * sum(v * v for v in y) ** 0.5
    return dot / norms if norms else 0.0


def test_similarity_is_the_cosine_of_item_vectors() -> None:
    rec = similar_recommender()
    ids = rec.items.sorted_ids
    a, b = np.repeat(ids, len(ids)), np.tile(ids, len(ids))
    got = rec.similarity(a, b)
    want = [loop_cosine(rec, x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got.min() >= 0.0 and got.max() <= 1.0  # ReLU outputs: no negative cosine
    assert rec.similarity(np.array([1050]), np.array([1050]))[0] == 0.0  # zero vector
    np.testing.assert_allclose(rec.similarity(ids[:1], ids[:1]), [1.0], rtol=1e-7)
    unknown = rec.similarity(np.array([1000, 7, 7]), np.array([8, 1010, 9]))
    assert np.isnan(unknown).all()


def test_top_similar_ranks_by_mean_cosine_without_the_query() -> None:
    rec = similar_recommender()
    ids = rec.items.sorted_ids.tolist()
    query = [1000, 1130, 1130, 999]  # a repeat and an unknown id: skipped
    mean = {p: np.mean([loop_cosine(rec, q, p) for q in (1000, 1130)]) for p in ids}
    best = sorted((p for p in ids if p not in (1000, 1130)), key=lambda p: -mean[p])
    got, scores = rec.top_similar(np.array(query), 5)
    assert got.tolist() == best[:5]
    np.testing.assert_allclose(scores, [mean[p] for p in best[:5]], rtol=1e-5)

    candidates = np.array([1000, 1200, 1210, 1220, 1230, 5])
    got, _ = rec.top_similar(np.array([1000]), 10, candidates, exclude=np.array([1210]))
    assert sorted(got.tolist()) == [1200, 1220, 1230]  # the query itself never comes back
    assert rec.top_similar(np.array([7, 8]), 5) is None
