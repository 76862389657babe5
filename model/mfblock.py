"""MFBlock: the seed's matrix-factorisation network, in PyTorch.

user id -> Embedding -> Dense(num_emb, ReLU) -> Dropout \
                                                         * -> sum -> score
item id -> Embedding -> Dense(num_emb, ReLU) -> Dropout /

Parameter names match the seed's Gluon attribute names (`user_embeddings`,
`dense_user`, ...), so a seed `model.params` maps onto this module 1:1.
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
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.num_emb = num_users, num_items, num_emb
        self.dropout_p = dropout_p
        self.user_embeddings = nn.Embedding(num_users, num_emb, sparse=sparse)
        self.item_embeddings = nn.Embedding(num_items, num_emb, sparse=sparse)
        self.dense_user = nn.Linear(num_emb, num_emb)
        self.dense_item = nn.Linear(num_emb, num_emb)
        self.dropout = nn.Dropout(dropout_p)

    def user_tower(self, users: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense_user(self.user_embeddings(users)))

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
            if scheme == "seed":
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
