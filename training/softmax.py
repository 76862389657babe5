"""The softmax objective: each event asks the user's vector to pick its product out of the
catalogue, weighted by the event's confidence (purchase 4, cart 3, view 1).

    loss = sum_e w_e * -log softmax_j(u . i_j / tau - log pi_j)[item_e] / sum_e w_e

Full softmax (every item is a candidate, pi = 1) while the catalogue has at most
`full_softmax_items` items; above that, sampled softmax: the candidates are the batch's
own products (in-batch negatives, drawn as often as products occur in the events) plus
`negatives` products drawn uniformly and shared by the whole batch, and each logit is
corrected by the log of its product's probability of being a candidate, pi_j =
1 - (1 - p_j)^B (1 - 1/N)^S (the sampling-bias correction; Yi et al. 2019, Yang et al. 2020).

Autograd on the seed's MFBlock (embeddings, Dense+ReLU towers, dropout on both towers, dot
product). Only the embedding rows a batch touched take part and move, by a lazy Adam
(RowAdam: torch.optim.SparseAdam's update, on the gathered rows) at `embedding_lr`; the
Dense layers use Adam with decoupled weight decay at `lr`. A user with 25 events gets 25
steps an epoch where the Dense layers get thousands: at `lr` the rows were the slowest part
to converge (synthetic 1M rows: best epoch 4 at 0.003, 3 at 0.01, same HR@10). The logit
correction rides in the matrix product (addmm) and a temperature of 1 costs nothing: the
batch x candidates logits are the step's largest array, and every extra pass over them (and
back) showed in the profile.
`wd` is an L2 term on the tower outputs of the batch's users and candidates: on the raw
embeddings it would not bound the logits (the Dense layers can scale them back up), and
unbounded logits overfit.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowAdam:
    """torch.optim.SparseAdam's lazy Adam for one embedding table, on rows gathered by the
    step instead of a sparse gradient: `gather` gives the batch's distinct rows as a leaf
    to compute with, `step` moves those rows (and only their moments). The same update as
    SparseAdam (tested), without its sparse tensors: its `sparse_mask` and `coalesce` over
    the whole table were a quarter of a batch's time."""

    def __init__(self, weight: Any, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.weight, self.lr, self.betas, self.eps = weight, lr, betas, eps
        self.exp_avg = torch.zeros_like(weight, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(weight, requires_grad=False)
        self.steps = 0

    def leaf(self, rows: Any) -> Any:
        """The vectors of these distinct rows, as a leaf that collects their gradient."""
        return self.weight.detach().index_select(0, rows).requires_grad_()

    def gather(self, ids: Any) -> tuple[Any, Any, Any]:
        """(distinct rows, their leaf, each id's row among them)."""
        import torch

        rows, inverse = torch.unique(ids, return_inverse=True)
        return rows, self.leaf(rows), inverse

    def step(self, rows: Any, leaf: Any) -> None:
        import torch

        (b1, b2), grad = self.betas, leaf.grad
        self.steps += 1
        with torch.no_grad():  # index_select / index_copy_: several times faster than t[rows]
            m = self.exp_avg.index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
            v = self.exp_avg_sq.index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self.exp_avg.index_copy_(0, rows, m)
            self.exp_avg_sq.index_copy_(0, rows, v)
            size = self.lr * (1 - b2**self.steps) ** 0.5 / (1 - b1**self.steps)
            moved = leaf.detach().sub_(m.div_(v.sqrt_().add_(self.eps)), alpha=size)
            self.weight.index_copy_(0, rows, moved)


class SoftmaxStep:
    """One batch of the softmax objective; called like the other steps. A history model
    (`sequences` given) is called with the rows of its events in `sequences` as `users`."""

    def __init__(
        self,
        model: Any,
        cfg: Any,
        item_counts: np.ndarray,
        generator: Any,
        sequences: Any = None,
    ) -> None:
        import torch

        self.model, self.cfg, self.gen, self.sequences = model, cfg, generator, sequences
        self.num_items = model.num_items
        self.full = self.num_items <= cfg.full_softmax_items
        device = model.item_embeddings.weight.device
        p = item_counts.astype(np.float64) / max(item_counts.sum(), 1)
        self.log_p1 = torch.as_tensor(np.log1p(-np.minimum(p, 1 - 1e-12)), device=device)
        if not model.history:
            self.users = RowAdam(model.user_embeddings.weight, cfg.embedding_lr)
        self.items = RowAdam(model.item_embeddings.weight, cfg.embedding_lr)
        dense = [q for n, q in model.named_parameters() if not n.endswith("embeddings.weight")]
        self.dense = torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.wd)

    def candidates(self, items: Any) -> tuple[Any, Any, Any]:
        """(candidate item rows, each event's column among them, log pi per column)."""
        import torch

        if self.full:
            return torch.arange(self.num_items, device=items.device), items, None
        shared = torch.randint(
            self.num_items, (self.cfg.negatives,), device=items.device, generator=self.gen
        )
        rows, inverse = torch.unique(torch.cat([items, shared]), return_inverse=True)
        n, s = len(items), self.cfg.negatives
        miss = n * self.log_p1[rows] + s * float(np.log1p(-1.0 / self.num_items))
        log_pi = torch.log(-torch.expm1(miss)).to(torch.float32)  # log(1 - exp(miss))
        return rows, inverse[:n], log_pi

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        m, cfg = self.model, self.cfg
        rows, target, log_pi = self.candidates(items)
        if m.history:
            rows, ie, a = self._history_users(users, rows)
        else:
            user_rows, ue, which = self.users.gather(users)
            ie = self.items.leaf(rows)  # the candidates are distinct rows already
            a = torch.relu(m.dense_user(ue))[which]  # the tower once per distinct user
        a = m.dropout(a)
        b = m.dropout(torch.relu(m.dense_item(ie[: len(rows)])))
        scaled = a if cfg.temperature == 1 else a / cfg.temperature
        logits = scaled @ b.T if log_pi is None else torch.addmm(-log_pi, scaled, b.T)
        weights = labels / labels.sum()
        loss = (F.cross_entropy(logits, target, reduction="none") * weights).sum()
        objective = loss
        if cfg.wd:  # L2 on the tower outputs, whose dot products are the logits
            objective = loss + cfg.wd * ((a * a).sum() / len(users) + (b * b).sum() / len(rows))
        self.dense.zero_grad(set_to_none=True)
        objective.backward()
        if m.history:
            self.items.step(self._touched, ie)
        else:
            self.users.step(user_rows, ue)
            self.items.step(rows, ie)
        self.dense.step()
        return loss.detach()

    def _history_users(self, positions: Any, candidates: Any) -> tuple[Any, Any, Any]:
        """(candidate rows, item embedding leaf, user tower outputs) of a history model.

        The leaf holds the candidates first, then the other products of the batch's windows,
        so both towers' gradients reach one lazily updated table. A window's events are
        dropped at random (history_dropout) so that no single recent product decides.
        """
        import torch
        import torch.nn.functional as F

        m = self.model
        hist, types, mask = self.sequences.windows(positions, m.history)
        if self.cfg.history_dropout:
            keep = torch.rand(mask.shape, device=mask.device, generator=self.gen)
            mask = mask & (keep >= self.cfg.history_dropout)
        seen = hist[mask]
        if self.full:  # every row is a candidate already
            touched, where = candidates, seen
        else:
            touched, inverse = torch.unique(torch.cat([candidates, seen]), return_inverse=True)
            # candidates first in the leaf: reorder so that rows[:len(candidates)] are they
            extra = torch.ones(len(touched), dtype=torch.bool, device=touched.device)
            extra[inverse[: len(candidates)]] = False
            touched = torch.cat([candidates, touched[extra]])
            slot = torch.empty(len(extra), dtype=torch.int64, device=touched.device)
            slot[inverse[: len(candidates)]] = torch.arange(len(candidates), device=slot.device)
            slot[extra] = torch.arange(len(candidates), len(touched), device=slot.device)
            where = slot[inverse[len(candidates) :]]
        self._touched = touched
        leaf = self.items.leaf(touched)
        slots = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
        slots[mask] = where  # a dropped or missing event points anywhere, with weight 0
        pooled = F.embedding_bag(
            slots, leaf, per_sample_weights=m.history_weights(types, mask), mode="sum"
        )
        return candidates, leaf, torch.relu(m.dense_user(pooled))


EXACT_NORMALIZER_MACS = 1e11  # users x items x dims above which log Z is estimated
_HEAD, _TAIL_SAMPLE = 4096, 4096


def log_normalizers(
    user_vectors: Any, item_vectors: Any, item_counts: np.ndarray, seed: int = 0
) -> np.ndarray:
    """log sum_j exp(u . i_j) for every user (vectors already divided by the temperature).

    Exact (in chunks) while users x items x dims <= EXACT_NORMALIZER_MACS; above that, the
    `_HEAD` most frequent items exactly plus a uniform sample of the rest, scaled up (an
    unbiased estimate of the tail's sum, and the head holds most of the mass).
    """
    import torch

    n_users, n_items = len(user_vectors), len(item_vectors)
    head = torch.arange(n_items, device=item_vectors.device)
    tail_scale = 0.0
    if n_users * n_items * item_vectors.shape[1] > EXACT_NORMALIZER_MACS and n_items > _HEAD:
        order = np.argsort(-item_counts, kind="stable")
        rng = np.random.default_rng(seed)
        tail = rng.choice(order[_HEAD:], size=min(_TAIL_SAMPLE, n_items - _HEAD), replace=False)
        tail_scale = (n_items - _HEAD) / len(tail)
        head = torch.as_tensor(order[:_HEAD], device=item_vectors.device)
        tail = torch.as_tensor(tail, device=item_vectors.device)
    out = []
    for s in range(0, n_users, 4096):
        u = user_vectors[s : s + 4096]
        lse = torch.logsumexp(u @ item_vectors[head].T, dim=1)
        if tail_scale:
            rest = torch.logsumexp(u @ item_vectors[tail].T, dim=1) + float(np.log(tail_scale))
            lse = torch.logaddexp(lse, rest)
        out.append(lse.cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)
