"""One training batch: the fused mse/bpr step (FusedStep), the seed's autograd step
(DenseStep) and `make_step`, which also picks the softmax step (training/softmax.py).

Speed (why the step is hand-written): the ids, labels and all parameters stay
on the device; an epoch is one `randperm` and contiguous slices, no DataLoader.
With `update="lazy"` (default) a step runs without autograd: the forward pass,
its hand-derived backward (checked against autograd in the tests) and the
optimiser update for the embedding rows the batch touched only (gathered with
`index_select`, written back with `index_add_`). torch's Bernoulli sampler is
~30x slower than the rest of the step on CPU, so dropout masks are compared
random bytes: the keep probability is rounded to a multiple of 1/256 (0.5 is
exact).

Momentum without touching every row: the seed's dense SGD moves *every*
embedding row by its decaying velocity on every step. Here a row's skipped
steps are caught up when the batch next touches it (k skipped steps move it by
lr * v * (mu + ... + mu^k) and decay v by mu^k), and all rows are caught up at
the end of each epoch, so with wd = 0 the weights equal the seed's dense
momentum SGD (checked in the tests). With wd > 0 the decay of an untouched row
is skipped (lazy). `update="dense"` runs the seed's way (autograd, dense
embedding gradients, torch.optim.SGD): the benchmark's baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.config import TrainConfig


class FusedStep:
    """One batch without autograd: forward, hand-derived backward, lazy update."""

    def __init__(self, model: Any, cfg: TrainConfig, generator: Any) -> None:
        import torch

        self.cfg, self.gen = cfg, generator
        self.wu, self.wi = model.user_embeddings.weight.data, model.item_embeddings.weight.data
        self.dense = [
            model.dense_user.weight.data,
            model.dense_user.bias.data,
            model.dense_item.weight.data,
            model.dense_item.bias.data,
        ]
        self.dense_state = [torch.zeros_like(p) for p in self.dense]
        self.emb_state = [torch.zeros_like(self.wu), torch.zeros_like(self.wi)]
        # the step that last touched each row, for the momentum catch-up
        self.last = [
            torch.zeros(len(w), dtype=torch.int64, device=w.device) for w in (self.wu, self.wi)
        ]
        self.steps = 0
        self.keep_bytes = round((1.0 - cfg.dropout) * 256)  # keep if random byte < this
        self.scale = 256.0 / self.keep_bytes

    def _mask(self, h: Any) -> Any:
        """relu'(h) * inverted-dropout mask, as one float tensor."""
        import torch

        active = h > 0
        if self.keep_bytes < 256:
            words = torch.empty((h.numel() + 7) // 8, dtype=torch.int64, device=h.device)
            words.random_(-(2**63), None, generator=self.gen)  # all 64 bits random
            active &= words.view(torch.uint8)[: h.numel()].view(h.shape) < self.keep_bytes
        return active.to(h.dtype).mul_(self.scale)

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        du_w, du_b, di_w, di_b = self.dense
        if negatives is not None:
            items = torch.cat([items, negatives])
        touched = [torch.unique(ids, return_inverse=True) for ids in (users, items)]
        self.steps += 1
        if self.cfg.opt == "sgd" and self.cfg.momentum:  # bring the rows up to date first
            for table, (rows, _) in enumerate(touched):
                self._catch_up(table, rows, self.steps - 1 - self.last[table].index_select(0, rows))
        ue, ie = self.wu.index_select(0, users), self.wi.index_select(0, items)
        hu, hi = torch.addmm(du_b, ue, du_w.t()), torch.addmm(di_b, ie, di_w.t())
        mu, mi = self._mask(hu), self._mask(hi)
        a, b = hu.mul_(mu), hi.mul_(mi)  # tower outputs after relu and dropout
        n = len(users)
        if negatives is None:  # the seed's L2 loss, 0.5 * (pred - label)^2
            err = (a * b).sum(1) - labels
            loss = 0.5 * (err * err).mean()
            g = (err / n).unsqueeze(1)
            ga, gb = g * b, g * a
        else:  # BPR: -log sigmoid(score(u, pos) - score(u, neg))
            diff = b[:n] - b[n:]
            x = (a * diff).sum(1)
            loss = F.softplus(-x).mean()
            g = ((torch.sigmoid(x) - 1.0) / n).unsqueeze(1)
            ga, gp = g * diff, g * a
            gb = torch.cat([gp, -gp])
        ghu, ghi = ga.mul_(mu), gb.mul_(mi)
        grads = [ghu.t() @ ue, ghu.sum(0), ghi.t() @ ie, ghi.sum(0)]
        gue, gie = ghu @ du_w, ghi @ di_w  # before the Dense weights move
        self._update_dense(grads)
        self._update_rows(0, *touched[0], gue)
        self._update_rows(1, *touched[1], gie)
        return loss

    def flush(self) -> None:
        """Catch every row up to the current step (end of epoch, before evaluation)."""
        import torch

        if self.cfg.opt != "sgd" or not self.cfg.momentum:
            return
        for table in (0, 1):
            rows = torch.arange(len(self.last[table]), device=self.last[table].device)
            self._catch_up(table, rows, self.steps - self.last[table])

    def _catch_up(self, table: int, rows: Any, skipped: Any) -> None:
        """Apply `skipped` steps of zero-gradient momentum to (unique) rows."""
        import torch

        mu, weight, state = self.cfg.momentum, (self.wu, self.wi)[table], self.emb_state[table]
        decay = torch.pow(mu, skipped.to(weight.dtype)).unsqueeze(1)  # mu^k
        v = state.index_select(0, rows)
        weight.index_add_(0, rows, v * ((1.0 - decay) * (-self.cfg.lr * mu / (1.0 - mu))))
        state.index_copy_(0, rows, v.mul_(decay))
        self.last[table].index_fill_(0, rows, self.steps)

    def _update_dense(self, grads: list[Any]) -> None:
        import torch

        cfg = self.cfg
        if cfg.wd:
            torch._foreach_add_(grads, self.dense, alpha=cfg.wd)
        if cfg.opt == "adagrad":
            torch._foreach_addcmul_(self.dense_state, grads, grads)
            steps = torch._foreach_div(
                grads, torch._foreach_add(torch._foreach_sqrt(self.dense_state), 1e-10)
            )
        elif cfg.momentum:
            torch._foreach_mul_(self.dense_state, cfg.momentum)
            torch._foreach_add_(self.dense_state, grads)
            steps = self.dense_state
        else:
            steps = grads
        torch._foreach_add_(self.dense, steps, alpha=-cfg.lr)

    def _update_rows(self, table: int, rows: Any, inverse: Any, grad: Any) -> None:
        """Sum the gradients of duplicate rows, then update only the touched rows."""
        import torch

        cfg, weight, state = self.cfg, (self.wu, self.wi)[table], self.emb_state[table]
        g = torch.zeros(len(rows), weight.shape[1], device=grad.device).index_add_(0, inverse, grad)
        if cfg.wd:
            g.add_(weight.index_select(0, rows), alpha=cfg.wd)
        if cfg.opt == "adagrad":
            s = state.index_select(0, rows).addcmul_(g, g)
            state.index_copy_(0, rows, s)
            g = g.div_(s.sqrt_().add_(1e-10))
        elif cfg.momentum:
            g = state.index_select(0, rows).mul_(cfg.momentum).add_(g)
            state.index_copy_(0, rows, g)
        weight.index_add_(0, rows, g.mul(-cfg.lr))


class DenseStep:
    """The seed's step: autograd, nn.Dropout, dense gradients, a torch optimiser."""

    def __init__(self, model: Any, cfg: TrainConfig) -> None:
        import torch

        self.model = model
        if cfg.opt == "adagrad":
            self.opt = torch.optim.Adagrad(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
        else:
            self.opt = torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd
            )

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch.nn.functional as F

        m = self.model
        if negatives is None:
            loss = 0.5 * ((m(users, items) - labels) ** 2).mean()
        else:
            a = m.dropout(m.user_tower(users))
            pos = (a * m.dropout(m.item_tower(items))).sum(1)
            neg = (a * m.dropout(m.item_tower(negatives))).sum(1)
            loss = F.softplus(neg - pos).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_step(cfg: TrainConfig, model: Any, data: Any, gen: Any, sequences: Any = None) -> Any:
    if cfg.objective == "softmax":
        from training.softmax import SoftmaxStep

        counts = np.bincount(data.train_items, minlength=model.num_items)
        return SoftmaxStep(model, cfg, counts, gen, sequences)
    return FusedStep(model, cfg, gen) if cfg.update == "lazy" else DenseStep(model, cfg)
