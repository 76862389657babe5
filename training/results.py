"""What a run measures and leaves behind: the held-out evaluation every epoch (EvalSet,
epoch_metrics), the metrics document (run_metrics), and the model dir: the artifact,
metrics.json and curves.png (save_artifact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.evaluate import (
    SeenItems,
    mse,
    plot_curves,
    popularity_metrics,
    ranking_metrics,
    sample_rows,
)


def run_metrics(
    cfg: TrainConfig, history: list[dict[str, Any]], ev: EvalSet, best: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The metrics document of a run (metrics.json and the manifest's `metrics`): `final` is
    the held-out score of the epoch kept (the best one under early stopping)."""
    return {
        "final": best or history[-1],
        "epochs": history,
        "popularity": ev.popularity,
        "mean_predictor_test_mse": ev.mean_mse,
        "global_mean": ev.global_mean,
        "eval_users": len(ev.rank_rows),
        "config": asdict(cfg),
    }


@dataclass
class EvalSet:
    test_users: np.ndarray
    test_items: np.ndarray
    test_labels: np.ndarray
    train_rows: np.ndarray  # sample of training rows for train MSE
    train_users: np.ndarray
    train_items: np.ndarray
    train_labels: np.ndarray
    rank_rows: np.ndarray  # positions in the test arrays to rank
    seen: SeenItems
    global_mean: float
    mean_mse: float
    popularity: dict[str, float]
    k: int

    @classmethod
    def build(cls, cfg: TrainConfig, data: Any, num_users: int, num_items: int) -> EvalSet:
        seen = SeenItems.build(data.train_users, data.train_items, num_users)
        rank_rows = sample_rows(len(data.test_users), cfg.eval_users, cfg.seed)
        tu, ti = np.asarray(data.test_users, np.int64), np.asarray(data.test_items, np.int64)
        global_mean = float(np.mean(data.train_labels, dtype=np.float64))
        tl = np.asarray(data.test_labels, np.float32)
        train_rows = sample_rows(len(data.train_labels), cfg.train_mse_rows, cfg.seed + 1)
        pop = popularity_metrics(
            data.train_items, num_items, tu[rank_rows], ti[rank_rows], seen, cfg.k
        )
        return cls(
            tu,
            ti,
            tl,
            train_rows,
            np.asarray(data.train_users, np.int64),
            np.asarray(data.train_items, np.int64),
            np.asarray(data.train_labels),
            rank_rows,
            seen,
            global_mean,
            mse(np.full(len(tl), global_mean), tl),
            pop,
            cfg.k,
        )


def _tower(model: Any, side: str, rows: np.ndarray, device: Any, chunk: int = 1 << 18) -> Any:
    """Tower outputs (eval mode) for the given rows, as one device tensor."""
    import torch

    tower = model.user_tower if side == "user" else model.item_tower
    idx = torch.as_tensor(rows, device=device)
    with torch.no_grad():
        return torch.cat(
            [tower(idx[s : s + chunk]) for s in range(0, len(idx), chunk)]
            or [torch.empty(0, model.num_emb, device=device)]
        )


def _predict(model: Any, users: np.ndarray, items: np.ndarray, device: Any) -> np.ndarray:
    out = []
    for s in range(0, len(users), 1 << 18):
        u = _tower(model, "user", users[s : s + (1 << 18)], device)
        i = _tower(model, "item", items[s : s + (1 << 18)], device)
        out.append((u * i).sum(1).cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def epoch_metrics(model: Any, ev: EvalSet, device: Any) -> dict[str, float]:
    tr = ev.train_rows
    item_vectors = _tower(model, "item", np.arange(model.num_items), device)
    rank = ranking_metrics(
        _tower(model, "user", ev.test_users[ev.rank_rows], device),
        item_vectors,
        ev.test_users[ev.rank_rows],
        ev.test_items[ev.rank_rows],
        ev.seen,
        ev.k,
    )
    return {
        "train_mse": mse(
            _predict(model, ev.train_users[tr], ev.train_items[tr], device), ev.train_labels[tr]
        ),
        "test_mse": mse(_predict(model, ev.test_users, ev.test_items, device), ev.test_labels),
        "mean_mse": ev.mean_mse,
        "hr": rank["hr"],
        "ndcg": rank["ndcg"],
        "k": ev.k,
    }


def item_popularity(model: Any, train_users: np.ndarray, device: Any) -> np.ndarray:
    """Per-item fallback score: the model's score for the *average training user*.

    That user's vector is the event-weighted mean of the user tower outputs, so
    the score is on the model's own scale (fallback rows sort with scored rows)
    and, under BPR, favours items many users like.
    """
    import torch

    counts = torch.as_tensor(
        np.bincount(train_users, minlength=model.num_users), dtype=torch.float32, device=device
    )
    mean_user = torch.zeros(model.num_emb, device=device)
    for s in range(0, model.num_users, 1 << 18):
        rows = np.arange(s, min(s + (1 << 18), model.num_users))
        mean_user += counts[rows] @ _tower(model, "user", rows, device)
    mean_user /= counts.sum()
    items = _tower(model, "item", np.arange(model.num_items), device)
    return (items @ mean_user).cpu().numpy().astype(np.float32)


def save_artifact(
    model: Any,
    cfg: TrainConfig,
    data: Any,
    metrics: dict,
    ev: EvalSet,
    model_dir: Path,
    device: Any,
) -> Path:
    import json

    from model.artifact import save_mfblock

    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if cfg.objective == "softmax":  # scores are p(product | user) over the catalogue
        from training.softmax import log_normalizers

        events = np.concatenate([data.train_items, data.test_items])
        counts = np.bincount(events, minlength=model.num_items)
        users = _tower(model, "user", np.arange(model.num_users), device) / cfg.temperature
        items = _tower(model, "item", np.arange(model.num_items), device)
        weights["user_log_normalizer"] = log_normalizers(users, items, counts, cfg.seed)
        weights["item_popularity"] = counts / max(counts.sum(), 1)
        score = {"kind": "probability", "temperature": cfg.temperature}
        popularity_doc = "share of all events that name the product"
    else:
        weights["item_popularity"] = item_popularity(model, ev.train_users, device)
        score = {"kind": "raw"}
        popularity_doc = "model score of the event-weighted mean training user for the item"
    save_mfblock(
        model_dir,
        weights,
        data.user_ids,
        data.product_ids,
        architecture={
            "num_users": model.num_users,
            "num_items": model.num_items,
            "num_emb": model.num_emb,
            "dropout_p": model.dropout_p,
        },
        objective=cfg.objective,
        init=cfg.init,
        train_config=asdict(cfg),
        metrics=metrics,
        global_mean=ev.global_mean,
        score=score,
        item_popularity=popularity_doc,
        data_stats=getattr(data, "stats", {}),
    )
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(metrics["epochs"], metrics["popularity"], model_dir / "curves.png")
    return model_dir
