"""`odmt evaluate`: full-ranking HR/NDCG of a RUN on the valid or test split, fused and per branch.

    odmt evaluate --run RUN --split test [--data DIR]
prints the metrics as JSON and writes RUN/metrics-<split>.json:
    {"HR@10", "NDCG@10", "HR@20", "NDCG@20" (fused), "id/HR@10", ... (per branch), "split", "protocol",
     "n_users", "n_target_in_history", "model", "data"}

    odmt evaluate --run RUN --slice cold
scores the cold-start test rows of a DIR prepared with --cold-items (users whose test target is a held-out
item) with a RUN that `odmt add-items` gave those items; same protocol and keys, "slice": "cold", written
to RUN/metrics-test-cold.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odmt_t4r.contract import COLD_ITEMS, RunFolder, cold_item_ids, last_items, read_cold_test, run_item_ids
from odmt_t4r.model import OdmtRecommender, history_and_target

from .data import PreparedData
from .metrics import PROTOCOL, RankingAccumulator
from .streaming import streaming_update


def long_tail_items(data: PreparedData) -> tuple[torch.Tensor, float]:
    """[N] bool: catalog items with at most the catalog's median train count (the long-tail slice's
    targets), and that median. Items without interactions count as 0."""
    items = data.info.dir.items(["item_idx", "train_count"])
    median = float(np.median(items["train_count"].to_numpy()))
    tail = torch.zeros(data.info.n_index, dtype=torch.bool)
    idx = torch.from_numpy(items["item_idx"].to_numpy().astype(np.int64))
    tail[idx] = torch.from_numpy(items["train_count"].to_numpy() <= median)
    return tail, median


@torch.no_grad()
def evaluate_model(model: OdmtRecommender, data: PreparedData, split: str = "valid", batch_size: int = 512,
                   progress: bool = False) -> dict:
    """Rank every item for each user of `split`; the user's items before the target are excluded.
    Scorers: "fused" (the model's fusion), each branch, and "mean" (the plain mean) when the model
    fuses otherwise; plus the long-tail slice and coverage@10 of each."""
    was_training = model.training
    model.eval()
    tail_items, median = long_tail_items(data)
    acc = RankingAccumulator(n_index=model.config.n_index)
    n = 0
    bar = tqdm(data.batches(split, batch_size), total=data.num_batches(split, batch_size),
               desc=f"evaluate {split}", disable=not progress, leave=False, file=sys.stderr)
    for batch in bar:
        history, target = history_and_target(batch["items"])
        streaming_update(acc, model, history, target, batch.get("seen"), tail=tail_items[target])  # item blocks
        n += len(target)
    model.train(was_training)
    return {**acc.compute(), "split": split, "protocol": PROTOCOL, "n_users": n,
            "n_target_in_history": acc.n_target_in_history,
            "longtail_rule": f"target's train count <= the catalog median ({median:g})",
            "fusion": {"weights": model.config.fusion_weights, "scores": model.config.fusion_scores}}


@torch.no_grad()
def evaluate_cold_slice(model: OdmtRecommender, data: PreparedData, run_dir: str | Path, batch_size: int = 512) -> dict:
    """The cold-start slice: each user whose test target is an item held out by `--cold-items`, scored by
    `model` (RUN `run_dir`, which must index the held-out items) over every item, the user's earlier
    items excluded (their history and any earlier held-out item), as in `evaluate_model`."""
    rows = read_cold_test(data.root)
    cold_ids = cold_item_ids(data.root)
    ids = run_item_ids(run_dir, data.root)
    index = {raw: i for i, raw in enumerate(ids) if raw and i < model.config.n_index}
    missing = [i for i in cold_ids if i not in index]
    if missing:
        raise ValueError(f"{run_dir} does not score {len(missing)} of the {len(cold_ids)} held-out items of {data.root} "
                         f"(e.g. {missing[0]!r}): add them first with `odmt add-items --run {run_dir} --items "
                         f"{data.root / COLD_ITEMS}` and evaluate the RUN it writes")
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(n_index=model.config.n_index)
    for start in range(0, len(rows), batch_size):
        part = rows.iloc[start:start + batch_size]
        history = torch.from_numpy(_padded(list(part["history"]), data.max_length))  # [B L], the model's window
        # excluded: every earlier item, the held-out ones included (the protocol's rule)
        seen = torch.from_numpy(_padded([np.concatenate([h, np.asarray([index[i] for i in e], dtype=np.int64)])
                                         for h, e in zip(part["history"], part["earlier_cold_ids"])]))  # [B S]
        target = torch.tensor([index[t] for t in part["target_id"]], dtype=torch.long)
        scores = {k: v.cpu() for k, v in model.score(history.to(model.log_popularity.device)).items()}
        acc.update(scores, target, seen)
    model.train(was_training)
    return {**acc.compute(), "split": "test", "slice": "cold", "protocol": PROTOCOL, "n_users": len(rows),
            "n_target_in_history": acc.n_target_in_history, "cold_items": len(cold_ids),
            "fusion": {"weights": model.config.fusion_weights, "scores": model.config.fusion_scores}}


def _padded(lists: list, width: int | None = None) -> np.ndarray:
    """Item index lists -> [B W] int64, each list's last W items right-padded (W = the longest if None)."""
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
    return last_items(values, np.concatenate([[0], np.cumsum(lengths)]), width)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a RUN folder written by `odmt train`")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--slice", choices=["cold"], default=None,
                   help="cold: the test users whose target is an item held out by `odmt prepare --cold-items`; "
                        "RUN must be one `odmt add-items` wrote with DIR/cold/items.csv")
    p.add_argument("--data", default=None, help="the prepared DIR (default: the one the RUN was trained on)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None, split: str = "test", slice_: str | None = None,
                 batch_size: int = 512, threads: int = 1, progress: bool = False, warn=None) -> dict:
    """Score a RUN on a split of a prepared DIR (default: the DIR it was trained on): the RUN is verified
    before its weights are loaded, the DIR by PreparedData. Fused and per-branch HR/NDCG, long tail,
    coverage, "model", "data", "seconds". `odmt evaluate`, `odmt run`, the report and the benchmarks."""
    from odmt_t4r.trust import verify_run

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if not run.has_model():
        raise FileNotFoundError(f"{run_dir} holds no trained model (config.json, model.pt)")
    data_dir = data_dir or run.recorded_data().get("dir")
    if not data_dir or not Path(data_dir).is_dir():
        raise FileNotFoundError(f"prepared DIR {str(data_dir)!r} not found; pass --data DIR")
    if slice_ and split != "test":
        raise ValueError(f"--slice {slice_} is a slice of the test split, not of '{split}'")
    verify_run(run_dir)  # before model.pt is loaded; PreparedData checks the DIR (read_prepared)
    data = PreparedData(data_dir)
    trained_on = run.recorded_data().get("manifest_sha256")
    if warn is not None and trained_on and trained_on != data.info.manifest_sha256:
        warn(f"{data.root} is not the prepared data this RUN was trained on (manifest hash differs)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))  # one thread by default: a second only contends on 2 cores
    try:
        t0 = time.perf_counter()
        model = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir)
        if slice_ == "cold":
            metrics = evaluate_cold_slice(model, data, run_dir, batch_size)
        else:
            metrics = evaluate_model(model, data, split, batch_size, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
    metrics.update({"model": model.config.name, "branches": model.branch_names, "data": str(data.root),
                    "seconds": round(time.perf_counter() - t0, 2)})
    return metrics


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    metrics = evaluate_run(run_dir, args.data, args.split, args.slice, args.batch_size, args.threads,
                           progress=not args.no_progress,
                           warn=lambda m: print(f"odmt evaluate: warning: {m}", file=sys.stderr))
    name = "-".join(filter(None, ["metrics", args.split, args.slice]))
    (run_dir / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {**metrics, "split": f"{args.split}, {args.slice} slice", "longtail_rule": "not computed on a slice"} \
        if args.slice else metrics
    print(scorer_table(shown, metrics["branches"]), file=sys.stderr)
    print(json.dumps(metrics, indent=2))
    return 0


def scorer_table(metrics: dict, branches: list[str]) -> str:
    """A readable table (for stderr): each branch, the plain mean and the chosen fusion, overall and on
    the long-tail slice, with coverage@10."""
    fusion = metrics.get("fusion", {})
    chosen = "mean" if not fusion.get("weights") else f"{fusion.get('scores')} " + " ".join(
        f"{b}:{w:g}" for b, w in fusion["weights"].items() if w > 0)
    rows = [(b, f"{b}/") for b in branches]
    if "mean/NDCG@10" in metrics:
        rows.append(("mean (paper)", "mean/"))
    rows.append((f"fused [{chosen}]", ""))
    lines = [f"{metrics['split']}: {metrics['n_users']} users, long-tail slice {metrics.get('longtail_users', 0)} "
             f"({metrics.get('longtail_rule', '')})",
             f"{'scorer':<34} {'HR@10':>7} {'NDCG@10':>8} {'HR@20':>7} {'NDCG@20':>8} {'tail NDCG@10':>13} {'cover@10':>9}"]
    for name, pre in rows:
        get = lambda k: metrics.get(k, float("nan"))  # noqa: E731
        lines.append(f"{name:<34} {get(pre + 'HR@10'):7.4f} {get(pre + 'NDCG@10'):8.4f} {get(pre + 'HR@20'):7.4f} "
                     f"{get(pre + 'NDCG@20'):8.4f} {get('longtail/' + pre + 'NDCG@10'):13.4f} {get(pre + 'coverage@10'):9.4f}")
    if "se/NDCG@10" in metrics:  # the split's own noise: differences well inside it are not findings
        lines.append(f"fused NDCG@10 standard error over these users: {metrics['se/NDCG@10']:.4f}")
    return "\n".join(lines)
