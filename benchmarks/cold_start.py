"""Cold-start benchmark: items held out of training entirely, added afterwards with
`odmt add-items`, scored on the test users whose target is one of them.

    .venv/bin/python benchmarks/cold_start.py [--cold-items 0.1] [--models odmt sasrec] [--seeds 0 1 2]
                                              [--epochs N] [--patience P] [--work benchmarks/work/cold]
                                              [--served] [--out benchmarks/results/cold_start.json]

Steps: `odmt prepare --source fashion --cold-items F` into WORK/data/fashion-cold<F>; each (model, seed)
trains there exactly as benchmarks/quality.py trains it (its `one_run`: same presets, budget, early
stopping on validation, fusion chosen on validation; finished runs are reused, interrupted ones resumed);
`add_items(RUN, DIR/cold/items.csv, assumed_count=A)` writes RUN.cold-A; `evaluate_cold_slice` scores it. Nothing is chosen
on test. Writes benchmarks/results/cold_start.json (every run, mean/std per model, the goal: fused odmt
NDCG@10 >= 5x sasrec's on cold targets) and prints a markdown table. With --served, each RUN.cold is also
exported and served by a real Triton server, and the new-arrivals shelf (the filter {"new_arrival": true}) is
scored through it: its HR@10 / NDCG@10, and list by list against the in-process ranking among the held-out items.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the runs are quality.py's: same training, same resume)
import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cold_start.json"
GOAL_RATIO = 5.0  # the goal: odmt NDCG@10 on cold targets >= 5x sasrec's


def prepared_cold(fraction: float, work: Path) -> Path:
    from odmt_t4r.prepare import PrepareConfig, prepare

    out = work / "data" / f"fashion-cold{fraction:g}"
    if not (out / "manifest.json").is_file():
        prepare(PrepareConfig(source="fashion", out=str(out), cold_items=fraction))
    return out


class AmongHeldOut(torch.nn.Module):
    """`model` with every item of the prepared catalog out of the ranking: the target then ranks among
    the held-out items only (a new-arrivals shelf). Separates the content signal from how the added
    items score against the trained catalog (where popularity decides)."""

    def __init__(self, model, first_added: int):
        super().__init__()
        self.model, self.first_added = model, first_added
        self.config, self.log_popularity = model.config, model.log_popularity
        self.eval()  # a scorer only (an added-items model cannot train)

    def score(self, history):
        scores = self.model.score(history)
        for s in scores.values():
            s[:, : self.first_added] = float("-inf")
        return scores


class WithoutPrior(AmongHeldOut):
    """`model` with its learned popularity prior taken out of every branch score (and the fusions
    recomputed): added items have no train count, so the prior ranks every trained item above them."""

    def __init__(self, model):
        super().__init__(model, 0)

    def score(self, history):
        from odmt_t4r.model.peer_distillation import fuse

        scores, prior = self.model.score(history), self.model.popularity_bias()
        branches = {b: scores[b] - (prior[b] if prior else 0.0) for b in self.model.branch_names}
        out = {**branches, "fused": fuse(branches, self.config.fusion_weights, self.config.fusion_scores)}
        if "mean" in scores:
            out["mean"] = fuse(branches)
        return out


def cold_run(run: Path, assumed_count: str) -> Path:
    """Where cold_metrics writes RUN after add-items of the held-out items."""
    return run.with_name(f"{run.name}.cold-{assumed_count}")


def cold_metrics(run: Path, data: Path, assumed_count: str = "median") -> dict:
    """The cold slice of RUN after add-items (RUN.cold-<assumed count>, written once and then reused), plus the same
    slice ranked among the held-out items only (`held_out_only/...`) and without the popularity prior
    (`no_prior/...`): diagnostics of the full-ranking figures, not settings (nothing is chosen on them)."""
    from odmt_t4r.catalog_update import add_items
    from odmt_t4r.contract import ADDED_ITEMS, COLD_ITEMS
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_cold_slice

    added = cold_run(run, assumed_count)
    done = added / "metrics-test-cold.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not (added / ADDED_ITEMS).is_file():
        add_items(run, data / COLD_ITEMS, out=added, assumed_count=assumed_count)
    model, prepared = OdmtRecommender.from_pretrained(added), PreparedData(data)
    metrics = evaluate_cold_slice(model, prepared, added)
    shelf = evaluate_cold_slice(AmongHeldOut(model, prepared.info.n_index), prepared, added)
    metrics.update({f"held_out_only/{k}": v for k, v in shelf.items() if "@" in k and "coverage" not in k})
    unbiased = evaluate_cold_slice(WithoutPrior(model), prepared, added)
    metrics.update({f"no_prior/{k}": v for k, v in unbiased.items() if "@" in k and "coverage" not in k})
    done.write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def served_shelf(added: Path, data: Path, work: Path, k: int = 10) -> dict:
    """The new-arrivals shelf through the served path: RUN.cold (add-items' output) exported and served by a real
    Triton server; each cold test user's history sent as the session with the filter {"new_arrival": true} and
    their earlier held-out items as `exclude_ids` (the protocol's exclusions). Returns HR@k / NDCG@k of the served
    answers and how many users' served top k equal the in-process ranking among the held-out items (fused)."""
    from odmt_t4r.contract import read_cold_test, run_item_ids
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import _padded
    from odmt_t4r.training.metrics import hr_ndcg
    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    rows, ids = read_cold_test(data), run_item_ids(added, data)
    model = OdmtRecommender.from_pretrained(added).eval()
    shelf = AmongHeldOut(model, PreparedData(data).info.n_index)  # the trained catalog's rows: off the shelf
    index = {raw: i for i, raw in enumerate(ids) if raw}
    expected = []  # in-process: the fused ranking among the held-out items, earlier items excluded
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            part = rows.iloc[start:start + 256]
            scores = shelf.score(torch.from_numpy(_padded(list(part["history"]), model.config.max_length)))["fused"]
            for b, (history, earlier) in enumerate(zip(part["history"], part["earlier_cold_ids"])):
                scores[b, [*history, *(index[i] for i in earlier)]] = float("-inf")
            expected += [[ids[i] for i in row] for row in scores.topk(k, dim=1).indices.tolist()]
    repo = work / "repos" / added.name
    export(added, repo, ServingConfig(k=k), data_dir=data, check_sessions=20, log=lambda m: None)
    ranks, equal = [], 0  # the target's 0-based rank in each served answer (k: not in it)
    with TritonServer(repo, log_file=work / f"tritonserver-{added.name}.log") as server:
        client = RecommenderClient(server.http_url)
        for (history, earlier, target), want in zip(rows[["history", "earlier_cold_ids", "target_id"]].itertuples(index=False),
                                                    expected):
            answer = [item for item, _ in client.recommend([[ids[i] for i in history]], k=k, exclude=list(earlier) or None,
                                                           filter={"new_arrival": True})[0]]
            equal += answer == want
            ranks.append(answer.index(target) if target in answer else k)
    return {"users": len(rows), **hr_ndcg(torch.tensor(ranks, dtype=torch.float32), ks=(k,)),
            "equal_to_in_process": equal, "filter": {"new_arrival": True}, "repository": str(repo)}


def goal(agg: dict) -> dict:
    """Issue 12's target on the full ranking, and the same ratio among the held-out items only."""
    out = {}
    for name, key in (("full ranking", "NDCG@10"), ("among held-out items only", "held_out_only/NDCG@10")):
        odmt, sas = (agg.get(m, {}).get(key, {}).get("mean") for m in ("odmt", "sasrec"))
        if odmt is None or sas is None:
            continue
        ratio = odmt / sas if sas > 0 else None  # sasrec at exactly 0: no finite ratio
        out[name] = {"goal": f"fashion cold slice ({name}): odmt NDCG@10 >= {GOAL_RATIO:g}x sasrec", "odmt": odmt,
                     "sasrec": sas, "ratio": None if ratio is None else round(ratio, 2),
                     "met": odmt > 0 and (ratio is None or ratio >= GOAL_RATIO)}
    return out


def markdown(agg: dict, n_users: int, n_items: int, fraction: float) -> str:
    rows = [("fused", ""), ("mean (paper)", "mean/"), ("id branch", "id/"), ("text branch", "text/"), ("image branch", "image/")]
    lines = [f"**fashion, cold slice** (--cold-items {fraction:g}: {n_items} items held out; {n_users} test users "
             "whose target is one of them; history excluded; mean ± std over seeds)", "",
             "| model | scorer | HR@10 | NDCG@10 | HR@20 | NDCG@20 | without the prior: NDCG@10 | among held-out only: HR@10 | NDCG@10 | seeds |",
             "|---" * 10 + "|"]
    for model, row in agg.items():
        for name, pre in rows:
            if f"{pre}NDCG@10" not in row:
                continue
            keys = [pre + k for k in quality.METRICS] + [f"no_prior/{pre}NDCG@10"] + [
                f"held_out_only/{pre}{k}" for k in ("HR@10", "NDCG@10")]
            cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" if k in row else "-" for k in keys]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
    return "\n".join(lines)


def served_markdown(runs: list[dict]) -> str:
    lines = ["| model | seed | users | served shelf HR@10 | NDCG@10 | in-process among held-out: HR@10 | NDCG@10 | "
             "served top 10 = in-process |", "|---" * 8 + "|"]
    for r in runs:
        got = r["served_shelf"]
        lines.append(f"| {r['model']} | {r['seed']} | {got['users']} | {got['HR@10']:.4f} | {got['NDCG@10']:.4f} | "
                     f"{r['held_out_only/HR@10']:.4f} | {r['held_out_only/NDCG@10']:.4f} | "
                     f"{got['equal_to_in_process']} of {got['users']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-items", type=float, default=0.1, help="share of the interacted catalog held out")
    ap.add_argument("--models", nargs="+", default=["odmt", "sasrec"], choices=[*quality.MODELS, *quality.VARIANTS])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="epoch cap (default: TrainConfig's; early stopping ends runs)")
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--work", default=str(Path(__file__).parent / "work" / "cold"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--assumed-count", default="median",
                    help="odmt add-items --assumed-count: the train count the prior gives the added items")
    ap.add_argument("--served", action="store_true",
                    help="also serve each RUN.cold on a real Triton server and score the new-arrivals shelf through it")
    ap.add_argument("--train-only", action="store_true", help="prepare and train; no add-items, no cold slice")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per benchmark job, as in quality.py

    work = Path(args.work)
    data = prepared_cold(args.cold_items, work)
    dataset = data.name
    runs = []
    for seed in args.seeds:  # seed by seed: a partial benchmark still compares every model
        for model in args.models:
            normal = quality._report(quality.one_run(dataset, model, seed, data, work, args.epochs, args.patience))
            if args.train_only:
                continue
            run = Path(normal["run"])
            cold = cold_metrics(run, data, args.assumed_count)
            print(f"  cold slice {model} s{seed}: NDCG@10 {cold['NDCG@10']:.4f} " + " ".join(
                f"{b} {cold[b + '/NDCG@10']:.4f}" for b in ("id", "text", "image") if f"{b}/NDCG@10" in cold), flush=True)
            if args.served:
                cold = {**cold, "served_shelf": served_shelf(cold_run(run, args.assumed_count), data, work)}
                got = cold["served_shelf"]
                print(f"  served new-arrivals shelf {model} s{seed}: HR@10 {got['HR@10']:.4f} NDCG@10 {got['NDCG@10']:.4f} "
                      f"(in-process among held-out: {cold['held_out_only/HR@10']:.4f} / {cold['held_out_only/NDCG@10']:.4f}); "
                      f"{got['equal_to_in_process']} of {got['users']} top-10 lists equal", flush=True)
            runs.append({**cold, "dataset": dataset, "model": model, "seed": seed, "run": str(run),
                         "train_seconds": normal["train_seconds"],
                         "normal_test": {k: normal[k] for k in quality.METRICS}})
    if args.train_only:
        return
    agg = quality.aggregate(runs).get(dataset, {})
    manifest = json.loads((data / "manifest.json").read_text())
    n_users, n_items = manifest["cold"]["test_users"], manifest["cold"]["items"]
    result = {"benchmark": "cold_start", "dataset": "fashion", "cold": manifest["cold"], "epochs_cap": args.epochs,
              "assumed_count": args.assumed_count,
              "patience": args.patience, "aggregate": agg, "goal": goal(agg), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(agg, n_users, n_items, args.cold_items))
    if args.served:
        print("\n" + served_markdown(runs))
    print(json.dumps(result["goal"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
