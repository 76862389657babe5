"""Training a history model: each event's window, the first touches, the repeat term's fit,
and the torch tower against the numpy one that serves."""

from __future__ import annotations

import numpy as np
import torch

from model.history import HistoryModel, HistoryTower, RecentEvents, RepeatTerm
from model.mfblock import MFBlock
from training.history import Sequences, fit_repeat, types_of, user_vectors


def test_windows_hold_the_users_earlier_events_latest_first():
    users = np.array([1, 0, 1, 0, 1])  # rows in file order
    items = np.array([10, 20, 11, 21, 12])
    times = np.array([0, 0, 1, 1, 2])
    seq = Sequences.build(users, items, np.array([1, 3, 4, 1, 1.0]), times, "cpu")
    assert seq.items.tolist() == [20, 21, 10, 11, 12]  # by (user, time)
    hist, kinds, mask = seq.windows(torch.tensor([1, 4, 2]), 3)
    assert (hist[0][mask[0]]).tolist() == [20]
    assert (hist[1][mask[1]]).tolist() == [11, 10]
    assert not mask[2].any()  # a user's first event has no window
    assert kinds[1][mask[1]].tolist() == [2, 0]  # purchase (weight 4), view
    assert seq.first_touch().tolist() == [True, True, True, True, True]
    again = Sequences.build(
        np.array([0, 0, 0]), np.array([5, 5, 6]), np.ones(3), np.arange(3), "cpu"
    )
    assert again.first_touch().tolist() == [True, False, True]


def test_types_of_event_weights():
    assert types_of(np.array([1, 3, 4, 2, 7.0])).tolist() == [0, 1, 2, 3, 0]


def test_repeat_fit_finds_the_planted_comeback():
    """Users come back to their latest product 60% of the time, else pick uniformly among
    50 products: with flat logits the fitted bonus makes the latest product about 0.6 likely
    and leaves older products near 1/50."""
    rng = np.random.default_rng(0)
    n_users, n_items = 2000, 50
    per_user = 4
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.integers(0, n_items, len(users))
    events = RecentEvents.build(users, items, np.zeros(len(users)), np.arange(len(users)), n_users)
    latest = items[per_user - 1 :: per_user]
    targets = np.where(rng.random(n_users) < 0.6, latest, rng.integers(0, n_items, n_users))
    flat = torch.zeros(n_users, 4, dtype=torch.float32)
    repeat = fit_repeat(flat, torch.zeros(n_items, 4), targets, events)
    bonus = repeat.bonus(events)
    rows = np.arange(n_users)
    top = bonus.lookup(rows, latest)
    z = np.log(n_items - 1 + np.exp(top))  # about: one touched product dominates
    assert abs(np.mean(np.exp(top - z)) - 0.6) < 0.08, np.mean(np.exp(top - z))
    older = bonus.lookup(rows, items[0::per_user])
    assert np.median(older[items[0::per_user] != latest]) < np.median(top) - 2


def test_the_torch_tower_is_the_serving_tower():
    torch.manual_seed(0)
    model = MFBlock(0, 30, 8, 0.0, history=5)
    model.init_weights()
    with torch.no_grad():
        model.history_position.copy_(torch.randn(5))
        model.history_type.copy_(torch.randn(4))
    rng = np.random.default_rng(1)
    users = np.sort(rng.integers(0, 40, 300))
    events = RecentEvents.build(users, rng.integers(0, 30, 300), rng.integers(0, 4, 300),
                                np.arange(300), 40)  # fmt: skip
    got = user_vectors(model, events, np.arange(40), "cpu").numpy()
    serving = HistoryModel(
        HistoryTower(model.history_position.detach().numpy(), model.history_type.detach().numpy()),
        model.item_embeddings.weight.detach().numpy(),
        model.dense_user.weight.detach().numpy(),
        model.dense_user.bias.detach().numpy(),
        1.0,
        RepeatTerm(0.0, np.zeros((4, 6)), np.zeros(6), np.zeros(5)),
    )
    np.testing.assert_allclose(got, serving.user_vectors(events), rtol=1e-5, atol=1e-6)
