"""MFBlock: the seed's matrix-factorisation network, in PyTorch.

user id -> Embedding -> Dense(num_emb, ReLU) -> Dropout \
                                                         * -> sum -> score
item id -> Embedding -> Dense(num_emb, ReLU) -> Dropout /

Parameter names match the seed's Gluon attribute names (`user_embeddings`,
`dense_user`, ...), so a seed `model.params` maps onto this module 1:1.

With `history=L` (the softmax default) the user side reads events, not an id:

recent events -> item Embedding -> weighted mean -> Dense(num_emb, ReLU) -> user vector

the weights exp(history_position[k] + history_type[type_k]) by position from the latest
event and event type (model/history.py has the same formula in numpy, for serving).
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("normal", "seed")


class MFBlock(nn.Module):
    def __init__(
        self,
        num_users: int,
        num_items: int,
        num_emb: int = 64,
        dropout_p: float = 0.5,
        sparse: bool = True,
        history: int = 0,
        event_types: int = 4,
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.num_emb = num_users, num_items, num_emb
        self.dropout_p, self.history = dropout_p, history
        if history:
            self.history_position = nn.Parameter(torch.zeros(history))
            self.history_type = nn.Parameter(torch.zeros(event_types))
        else:
            self.user_embeddings = nn.Embedding(num_users, num_emb, sparse=sparse)
        self.item_embeddings = nn.Embedding(num_items, num_emb, sparse=sparse)
        self.dense_user = nn.Linear(num_emb, num_emb)
        self.dense_item = nn.Linear(num_emb, num_emb)
        self.dropout = nn.Dropout(dropout_p)

    def user_tower(self, users: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense_user(self.user_embeddings(users)))

    def history_weights(self, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) pooling weights of events by position (column 0: the latest) and type,
        0 where `mask` is False, each row summing to 1 (or 0 without any event)."""
        w = torch.exp(self.history_position[: types.shape[1]] + self.history_type[types]) * mask
        return w / w.sum(1, keepdim=True).clamp_min(1e-30)

    def history_tower(
        self, items: torch.Tensor, types: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """User vectors from (B, L) recent events, latest first (`mask`: which are events)."""
        vectors = self.item_embeddings(items.clamp_min(0))
        pooled = (self.history_weights(types, mask).unsqueeze(2) * vectors).sum(1)
        return torch.relu(self.dense_user(pooled))

    def item_tower(self, items: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense_item(self.item_embeddings(items)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        a = self.dropout(self.user_tower(users))
        b = self.dropout(self.item_tower(items))
        return (a * b).sum(dim=1)

    @torch.no_grad()
    def init_weights(
        self, scheme: str = "normal", generator: torch.Generator | None = None
    ) -> None:
        """Initialise all parameters.

        `seed` reproduces the seed's `mx.init.Xavier(magnitude=60)` (uniform,
        avg fan, bound sqrt(60 / fan_avg)), which makes initial scores huge and
        training diverge for most of an epoch. `normal` (the default) draws
        embeddings from N(0, 0.01²) and uses He-uniform Dense weights with a small
        positive bias, so both towers start active and scores start near zero.
        (0.01 rather than 0.1: measured on planted data, 2 epochs at seed settings,
        test MSE 0.2340 vs 0.2541 (mean predictor 0.2335), and BPR HR@10 0.356 vs 0.307.)
        """
        if scheme not in INITS:
            raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")
        for name, param in self.named_parameters():
            if name.startswith("history_"):
                param.zero_()  # a plain mean of the recent events to start
            elif scheme == "seed":
                if name.endswith("bias"):
                    param.zero_()
                else:
                    fan_out, fan_in = param.shape
                    bound = math.sqrt(60.0 / ((fan_in + fan_out) / 2.0))
                    param.uniform_(-bound, bound, generator=generator)
            elif "embeddings" in name:
                param.normal_(0.0, 0.01, generator=generator)
            elif name.endswith("bias"):
                param.fill_(0.01)
            else:
                bound = math.sqrt(6.0 / param.shape[1])
                param.uniform_(-bound, bound, generator=generator)
