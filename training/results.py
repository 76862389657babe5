"""What a run measures and leaves behind: the held-out evaluation every epoch (EvalSet,
epoch_metrics), the metrics document (run_metrics), and the model dir: the artifact,
metrics.json and curves.png (save_artifact).

A history model (the softmax default) is ranked as it serves, repeat term included, with
every product a candidate ("kept"); and, for the users whose held-out product is new to
them, among the products they never touched ("excluded"). The simple rules of
training/baselines.py are ranked on the same users in both modes, and `verdict` says in
one line whether the model beats them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.history import RecentEvents, RepeatTerm
from training.baselines import modes, rule_metrics
from training.config import TrainConfig
from training.metrics import (
    SeenItems,
    mse,
    popularity_metrics,
    ranking_metrics,
    sample_rows,
)


def run_metrics(
    cfg: TrainConfig, history: list[dict[str, Any]], ev: EvalSet, best: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The metrics document of a run (metrics.json and the manifest's `metrics`): `final` is
    the held-out score of the epoch kept (the best one under early stopping)."""
    final = best or history[-1]
    out = {
        "final": final,
        "epochs": history,
        "popularity": ev.popularity,
        "mean_predictor_test_mse": ev.mean_mse,
        "global_mean": ev.global_mean,
        "eval_users": len(ev.rank_rows),
        "config": asdict(cfg),
    }
    if ev.history is not None:
        out["baselines"] = ev.history.baselines
        out["verdict"] = verdict(final, ev.history.baselines, ev.k)
    return out


def verdict(final: dict[str, Any], baselines: dict[str, dict[str, Any]], k: int) -> str:
    """One line: does the model beat the best simple rule on HR@k and NDCG@k, in each mode?"""
    scores = {"kept": final, "excluded": final.get("excluded", {})}
    lost = []
    for mode, rules in baselines.items():
        for metric in ("hr", "ndcg"):
            name, best = max(((n, r[metric]) for n, r in rules.items()), key=lambda x: x[1])
            ours = scores[mode].get(metric, float("nan"))
            if not ours > best:
                label = "HR" if metric == "hr" else "NDCG"
                lost.append(f"{name} {label}@{k} {best:.4f} >= model {ours:.4f} ({mode})")
    if lost:
        return "a simple rule wins: " + "; ".join(lost)
    return "the model beats popularity, item-cosine (last 5) and top-frequency in both modes"


def baseline_table(final: dict[str, Any], baselines: dict[str, Any], k: int) -> str:
    """The model beside the simple rules, HR@k / NDCG@k, in both modes."""
    lines = [f"{'':<22}{'every product':>20}{'new products only':>22}"]
    rows = {"model": {"kept": final, "excluded": final.get("excluded", {})}}
    for mode, rules in baselines.items():
        for name, got in rules.items():
            rows.setdefault(name.replace("_", " "), {})[mode] = got
    for name, by_mode in rows.items():
        cells = [
            f"{m['hr']:.4f} / {m['ndcg']:.4f}" if m else "-"
            for m in (by_mode.get("kept"), by_mode.get("excluded"))
        ]
        lines.append(f"{name:<22}{cells[0]:>20}{cells[1]:>22}")
    users = final.get("excluded", {}).get("users")
    lines.append(
        f"(HR@{k} / NDCG@{k}; new products only: the {users} held-out users whose product was"
        " new to them, their earlier products excluded)"
    )
    return "\n".join(lines)


@dataclass
class HistoryEval:
    """A history model's held-out users: their training events (row j = eval user j), the
    held-out products, the two modes' users and the simple rules' scores."""

    events: RecentEvents
    test_items: np.ndarray
    modes: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    repeat: RepeatTerm | None = None  # the last evaluation's fit, where the next one starts

    @classmethod
    def build(cls, cfg: TrainConfig, data: Any, rank_rows: np.ndarray, num_items: int):
        from training.history import training_events

        every = training_events(data)
        users = np.asarray(data.test_users, np.int64)[rank_rows]
        items = np.asarray(data.test_items, np.int64)[rank_rows]
        events = every.subset(users)
        own = np.arange(len(users))
        return cls(
            events,
            items,
            modes(events, num_items, own, items),
            rule_metrics(events, num_items, own, items, cfg.k),
        )


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
    history: HistoryEval | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, data: Any, num_users: int, num_items: int) -> EvalSet:
        seen = SeenItems.build(data.train_users, data.train_items, num_users)
        rank_rows = sample_rows(len(data.test_users), cfg.eval_users, cfg.seed)
        tu, ti = np.asarray(data.test_users, np.int64), np.asarray(data.test_items, np.int64)
        global_mean = float(np.mean(data.train_labels, dtype=np.float64))
        tl = np.asarray(data.test_labels, np.float32)
        train_rows = sample_rows(len(data.train_labels), cfg.train_mse_rows, cfg.seed + 1)
        history = None
        if cfg.history_length and len(rank_rows):
            history = HistoryEval.build(cfg, data, rank_rows, num_items)
            pop = history.baselines["kept"]["popularity"]
        else:
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
            history,
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


def epoch_metrics(model: Any, ev: EvalSet, device: Any) -> dict[str, Any]:
    if ev.history is not None:
        return history_metrics(model, ev.history, ev.k, device)
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


def history_metrics(model: Any, ev: HistoryEval, k: int, device: Any) -> dict[str, Any]:
    """Held-out HR/NDCG of a history model in both modes, with the repeat term fitted on
    these held-out events (its weights go into the row, for the artifact)."""
    from training.history import fit_repeat, user_vectors

    users = np.arange(ev.events.num_users)
    user_vecs = user_vectors(model, ev.events, users, device)
    item_vecs = _tower(model, "item", np.arange(model.num_items), device)
    repeat = ev.repeat = fit_repeat(user_vecs, item_vecs, ev.test_items, ev.events, start=ev.repeat)
    out: dict[str, Any] = {"k": k}
    for mode, (positions, seen) in ev.modes.items():
        bonus = repeat.bonus(ev.events) if mode == "kept" else None  # touched: excluded
        got = ranking_metrics(
            user_vecs[positions],
            item_vecs,
            positions,
            ev.test_items[positions],
            seen,
            k,
            bonus=bonus,
        )
        if mode == "kept":
            out.update(hr=got["hr"], ndcg=got["ndcg"])
        else:
            out[mode] = {"hr": got["hr"], "ndcg": got["ndcg"], "users": got["users"]}
    out["repeat"] = repeat.to_json()
    return out


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
    extra: dict[str, Any] = {}
    if cfg.objective == "softmax":  # scores are p(product | user) over the catalogue
        from training.softmax import log_normalizers

        events = np.concatenate([data.train_items, data.test_items])
        counts = np.bincount(events, minlength=model.num_items)
        items = _tower(model, "item", np.arange(model.num_items), device)
        if model.history:  # users as of every event, the held-out ones included
            from training.history import every_event, normalizers_with_bonus, user_vectors

            recent = every_event(data, cfg.recent_events)
            everyone = np.arange(recent.num_users)
            users = user_vectors(model, recent, everyone, device) / cfg.temperature
            repeat = RepeatTerm.from_json(metrics["final"]["repeat"])
            bonus = repeat.bonus(recent)
            plain = log_normalizers(users, items, counts, cfg.seed)
            weights["user_log_normalizer"] = normalizers_with_bonus(plain, users, items, bonus)
            weights.update(
                {
                    "events.indptr": recent.indptr,
                    "events.items": recent.items,
                    "events.types": recent.types,
                    "events.times": recent.times,
                }
            )
            extra = {
                "user_tower": {"kind": "history", "events": cfg.history_length},
                "recent_events": cfg.recent_events,
                "repeat": repeat.to_json(),
            }
        else:
            users = _tower(model, "user", np.arange(model.num_users), device) / cfg.temperature
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
        **extra,
    )
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(metrics["epochs"], metrics["popularity"], model_dir / "curves.png")
    return model_dir


def plot_curves(history: list[dict[str, Any]], baseline: dict[str, float], path: Path) -> None:
    """Per-epoch MSE (train, test, mean predictor) and HR/NDCG vs popularity, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("train_mse", "train MSE"),
        ("test_mse", "test MSE"),
        ("mean_mse", "mean predictor (test)"),
    ):
        if all(key in h for h in history):  # a history model estimates no event weights
            left.plot(epochs, [h[key] for h in history], marker="o", label=label)
    if "excluded" in (history[0] if history else {}):
        for key, style in (("hr", "-"), ("ndcg", "--")):
            values = [h["excluded"][key] for h in history]
            left.plot(epochs, values, style, marker="o", label=f"model {key}, new products")
        left.set(xlabel="epoch", ylabel=f"@{history[0]['k']}", title="new products only")
    else:
        left.set(xlabel="epoch", ylabel="MSE", title="regression")
    left.legend()
    for key, style in (("hr", "-"), ("ndcg", "--")):
        right.plot(epochs, [h[key] for h in history], style, marker="o", label=f"model {key}")
        right.axhline(baseline[key], linestyle=style, color="grey", label=f"popularity {key}")
    right.set(xlabel="epoch", ylabel=f"@{history[0]['k'] if history else 10}", title="ranking")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
