"""Training a history model: each event's window of earlier events, user vectors from recent
events, and the repeat term's fit on the held-out events.

    Sequences      training events ordered by (user, time) on the device; `windows(rows)`
                   gives the events before each row, latest first (the user tower's input)
    user_vectors   the user tower over RecentEvents (model/history.py), in torch
    fit_repeat     RepeatTerm's few weights, by maximum likelihood of the held-out events
                   under the softmax, with the model's dot products fixed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from model.history import (
    EVENT_TYPES,
    GAP_BUCKETS,
    POSITION_BUCKETS,
    EventPairs,
    RecentEvents,
    RepeatTerm,
)

# event weight (training/events.py: purchase 4, cart 3, remove_from_cart 2, other 1) -> type
_TYPE_OF_WEIGHT = {1.0: "view", 3.0: "cart", 4.0: "purchase", 2.0: "remove_from_cart"}


def types_of(labels: np.ndarray) -> np.ndarray:
    """Event type codes (model/history.py EVENT_TYPES) from event weights; other weights: view."""
    out = np.zeros(len(labels), np.uint8)
    for weight, name in _TYPE_OF_WEIGHT.items():
        out[np.asarray(labels) == weight] = EVENT_TYPES.index(name)
    return out


def sort_by_user_and_time(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The order of events by (user, time), ties kept in row (file) order."""
    return np.lexsort((times, users))


def training_events(data: Any, keep: int | None = None) -> RecentEvents:
    """Each user's training events (the last `keep`; None: all), by time."""
    times, _ = data.times()
    order = sort_by_user_and_time(data.train_users, times)
    return RecentEvents.build(
        data.train_users[order],
        data.train_items[order],
        types_of(data.train_labels[order]),
        times[order],
        len(data.user_ids),
        keep,
    )


def every_event(data: Any, keep: int | None = None) -> RecentEvents:
    """Each user's training and held-out events (the last `keep`), by time: the artifact's."""
    train_times, test_times = data.times()
    users = np.concatenate([data.train_users, data.test_users])
    times = np.concatenate([train_times, test_times])
    order = sort_by_user_and_time(users, times)
    return RecentEvents.build(
        users[order],
        np.concatenate([data.train_items, data.test_items])[order],
        types_of(np.concatenate([data.train_labels, data.test_labels])[order]),
        times[order],
        len(data.user_ids),
        keep,
    )


def normalizers_with_bonus(
    plain: np.ndarray, user_vecs: Any, item_vecs: Any, bonus: Any
) -> np.ndarray:
    """log sum_j exp(u . i_j + bonus(u, j)) from the plain log normalisers: only the products a
    user touched change, Z = Z0 + sum_touched exp(u . i) (exp(bonus) - 1)."""
    import torch

    users = np.repeat(np.arange(len(plain)), np.diff(bonus.indptr))
    extra = np.zeros(len(plain), np.float64)
    for s in range(0, len(users), 1 << 20):
        u = torch.as_tensor(users[s : s + (1 << 20)], device=user_vecs.device)
        i = torch.as_tensor(bonus.items[s : s + (1 << 20)].astype(np.int64), device=u.device)
        logits = (user_vecs[u] * item_vecs[i]).sum(1).double().cpu().numpy()
        share = np.exp(logits - plain[users[s : s + (1 << 20)]]) * np.expm1(
            bonus.values[s : s + (1 << 20)].astype(np.float64)
        )
        extra += np.bincount(users[s : s + (1 << 20)], share, minlength=len(plain))
    return (plain + np.log1p(np.maximum(extra, -1 + 1e-12))).astype(np.float32)


@dataclass
class Sequences:
    """Training events by (user, time) on the device: `order` maps this order to the data's."""

    items: Any  # (n,) int64 product rows
    types: Any  # (n,) int64 type codes
    user_start: Any  # (n,) int64: the row where each row's user begins
    order: np.ndarray

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, labels: np.ndarray, times, device):
        import torch

        order = sort_by_user_and_time(users, times)
        users = np.asarray(users)[order]
        counts = np.bincount(users)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return cls(
            torch.as_tensor(np.asarray(items, np.int64)[order], device=device),
            torch.as_tensor(types_of(np.asarray(labels)[order]).astype(np.int64), device=device),
            torch.as_tensor(starts[users].astype(np.int64), device=device),
            order,
        )

    def first_touch(self) -> np.ndarray:
        """Per row: its user's first event with its product (the pair is new)."""
        items = self.items.cpu().numpy()
        starts = self.user_start.cpu().numpy()  # one value per user: a user key in row order
        _, first = np.unique(starts * (int(items.max()) + 1) + items, return_index=True)
        out = np.zeros(len(items), bool)
        out[first] = True
        return out

    def windows(self, rows: Any, length: int) -> tuple[Any, Any, Any]:
        """(items, types, mask), each (len(rows), length): the events before each row of the
        same user, latest first; mask False past the user's first event."""
        import torch

        back = torch.arange(1, length + 1, device=rows.device)
        idx = rows.unsqueeze(1) - back
        mask = idx >= self.user_start[rows].unsqueeze(1)
        idx = idx.clamp_min(0)
        return self.items[idx], self.types[idx], mask


def recent_windows(events: RecentEvents, users: np.ndarray, length: int, device: Any):
    """(items, types, mask) of each user's last `length` events in `events`, latest first."""
    import torch

    ends = events.indptr[np.asarray(users) + 1]
    idx = ends[:, None] - 1 - np.arange(length)[None, :]
    mask = idx >= events.indptr[np.asarray(users)][:, None]
    idx = np.where(mask, idx, 0)
    if len(events) == 0:
        idx[:] = 0
        mask[:] = False
    items = events.items[idx] if len(events) else np.zeros(idx.shape, np.int32)
    types = events.types[idx] if len(events) else np.zeros(idx.shape, np.uint8)
    mask &= items >= 0

    def t(a: np.ndarray, dtype: Any) -> Any:
        return torch.as_tensor(a, device=device).to(dtype)

    return t(items, torch.int64), t(types, torch.int64), t(mask, torch.bool)


def user_vectors(model: Any, events: RecentEvents, users: np.ndarray, device: Any) -> Any:
    """The user tower (eval mode) of `users` over their recent events, in chunks."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(users), 1 << 16):
            items, types, mask = recent_windows(
                events, users[s : s + (1 << 16)], model.history, device
            )
            out.append(model.history_tower(items, types, mask))
    return torch.cat(out) if out else torch.empty(0, model.num_emb, device=device)


def fit_repeat(
    user_vecs: Any,
    item_vecs: Any,
    targets: np.ndarray,
    events: RecentEvents,
    l2: float = 1e-3,
    start: RepeatTerm | None = None,
) -> RepeatTerm:
    """The repeat term that best explains the held-out `targets` (one product row per user of
    `events`, in order; -1: skip) on top of the logits user_vecs @ item_vecs.T.

    Only the user's touched products change their logits, so log Z needs the plain
    log-sum-exp once per user and the touched products' logits:
    Z = Z0 + sum_touched exp(s_i) (exp(bonus_i) - 1). `start`: the previous fit, to start
    from (between evaluations the weights move little).
    """
    import torch

    pairs = EventPairs.build(events)
    users, items = pairs.pair_users(), pairs.items().astype(np.int64)
    keep = targets >= 0
    n = len(targets)
    z0 = torch.empty(n, dtype=torch.float64)
    target_logit = torch.zeros(n, dtype=torch.float64)
    touched = torch.empty(len(users), dtype=torch.float64)
    dev = user_vecs.device
    with torch.no_grad():
        for s in range(0, n, 1024):
            logits = (user_vecs[s : s + 1024] @ item_vecs.T).double()
            z0[s : s + 1024] = torch.logsumexp(logits, 1).cpu()
            rows = torch.arange(s, min(s + 1024, n), device=dev)
            t = torch.as_tensor(np.maximum(targets[s : s + 1024], 0), device=dev)
            target_logit[s : s + 1024] = logits[rows - s, t].cpu()
            mine = np.flatnonzero((users >= s) & (users < s + 1024))
            touched[mine] = logits[
                torch.as_tensor(users[mine] - s, device=dev),
                torch.as_tensor(items[mine], device=dev),
            ].cpu()
    counts = torch.as_tensor(pairs.counts(), dtype=torch.float64)
    latest = torch.as_tensor(pairs.latest_bucket())
    position = torch.as_tensor(pairs.latest_position())
    pair_user = torch.as_tensor(users)
    # the pair that is each user's target, if the user touched it before
    target_pair = np.full(n, -1, np.int64)
    hit = targets[users] == items
    target_pair[users[hit]] = np.flatnonzero(hit)
    target_pair = torch.as_tensor(target_pair)
    weight = torch.as_tensor(keep, dtype=torch.float64) / max(int(keep.sum()), 1)

    if start is None:
        start = RepeatTerm(
            1.0,
            np.zeros((len(EVENT_TYPES), GAP_BUCKETS)),
            np.zeros(GAP_BUCKETS),
            np.zeros(POSITION_BUCKETS),
        )
    scale, log_w, bias, recent = params = [
        torch.tensor(np.ravel(v), dtype=torch.float64).requires_grad_()
        for v in (start.scale, start.weights, start.latest, start.recent)
    ]
    scale = scale.squeeze()
    opt = torch.optim.LBFGS(params, max_iter=100, line_search_fn="strong_wolfe")

    def loss_fn() -> Any:
        opt.zero_grad()
        bonus = scale * torch.log1p(counts @ torch.exp(log_w)) + bias[latest] + recent[position]
        share = torch.exp(touched - z0[pair_user]) * torch.expm1(bonus)
        extra = torch.zeros(n, dtype=torch.float64).index_add_(0, pair_user, share)
        log_z = z0 + torch.log1p(extra.clamp_min(-1 + 1e-12))
        own = torch.where(target_pair >= 0, bonus[target_pair.clamp_min(0)], 0.0)
        nll = -((target_logit + own - log_z) * weight).sum()
        loss = nll + l2 * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    if len(users) and keep.any():
        opt.step(loss_fn)
    return RepeatTerm(
        float(scale.detach()),
        log_w.detach().numpy().reshape(len(EVENT_TYPES), GAP_BUCKETS),
        bias.detach().numpy().copy(),
        recent.detach().numpy().copy(),
    )
