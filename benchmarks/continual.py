"""Continual benchmark: keeping a model fresh on a time-ordered stream, with no future data anywhere.

    .venv/bin/python benchmarks/continual.py [--datasets ml-100k fashion] [--models odmt sasrec] [--seed 0]
        [--cut 0.7] [--step 0.1] [--increments 3] [--updates lr1 ...] [--work benchmarks/work/continual] [--report-only]

Each dataset's interactions are ordered by time. DIR_0 holds the first `cut` of them (and the items they
name); increment k appends the next `step` (and the items first named there) with `odmt prepare --append-to
DIR_{k-1}` into DIR_k. After each increment three arms are scored on DIR_k's test rows (each user's latest
interaction so far), for every model:
  full    a training from scratch on DIR_k (`odmt train`, the benchmark's presets, as benchmarks/quality.py);
  update  `odmt update` from the previous increment's update (from the first full training at k=1): a chain
          per variant (--updates: `lr<F>` the learning-rate factor, `recent` the recent window, `e<N>` the epoch
          ceiling, joined by "-"); the update's defaults are chosen among them on validation;
  stale   the first full training, never updated, with DIR_k's new items added as `odmt add-items` adds them
          (training/update.served_on: what a promotion compares an update with).
Reported per arm: valid and test NDCG@10 (fused) with its standard error over users, test NDCG@10 on the
users whose target is an item added after the cut ("new items"), how many of those items the arm indexes and
how many it puts in anyone's top 10, and the arm's wall time. Finished steps are recorded in WORK/records
and reused; an interrupted training resumes. Writes benchmarks/results/continual.json and prints two tables:
every arm, and the goals per increment with the chosen update (mean ± std over every seed recorded in WORK;
run the script once per --seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import quality  # noqa: E402  (the benchmark's presets: the same training as the quality benchmark)

RESULTS = Path(__file__).parent / "results" / "continual.json"
UPDATE_SHARE = 0.25  # the goal: an update costs at most this share of a full retrain's wall time


def log(message: str) -> None:
    print(f"[continual {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the stream ----------------------------------------------------------------------------------------

def raw_source(dataset: str, work: Path):
    from odmt_t4r.data.sources import load_source

    return load_source(dataset, workdir=str(work / "raw" / dataset))


def slices(n_rows: int, cut: float, step: float, increments: int) -> list[tuple[int, int]]:
    """Row ranges of the time-ordered stream: the first `cut`, then `increments` steps of `step`."""
    ends = [round(n_rows * min(1.0, cut + k * step)) for k in range(increments + 1)]
    return [(0 if k == 0 else ends[k - 1], ends[k]) for k in range(increments + 1)]


def write_part(raw, rows: pd.DataFrame, known: set, folder: Path) -> tuple[Path, Path | None, set]:
    """One part of the stream as the CSV files `odmt prepare` takes: its interactions, and the catalog rows
    of the items it names first (None when there are none); returns the items known after it."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = folder / "interactions.csv"
    rows[["user_id", "item_id", "timestamp"]].to_csv(inter, index=False)
    named = pd.unique(rows["item_id"])
    fresh = raw.items[raw.items["item_id"].isin(set(named) - known)]
    items = None
    if len(fresh):
        items = folder / "items.csv"
        columns = [c for c in ("item_id", "text", "image") if c in fresh]
        frame = fresh[columns].copy()
        if "image" in frame:  # absolute paths: prepare resolves an image against the CSV's folder
            frame["image"] = frame["image"].map(lambda p: str(Path(p).resolve()) if isinstance(p, str) and p else p)
        frame.to_csv(items, index=False)
    return inter, items, known | set(named)


def prepared_stream(dataset: str, work: Path, cut: float, step: float, increments: int) -> list[Path]:
    """DIR_0 (a fresh prepare of the first `cut`) and DIR_1..DIR_n (each appended to the previous one)."""
    from odmt_t4r.prepare import PrepareConfig, prepare

    root = work / "data" / dataset
    dirs = [root / f"dir{k}" for k in range(increments + 1)]
    if all((d / "manifest.json").is_file() for d in dirs):
        return dirs
    raw = raw_source(dataset, work)
    stream = raw.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    known: set = set()
    for k, (start, end) in enumerate(slices(len(stream), cut, step, increments)):
        inter, items, known = write_part(raw, stream.iloc[start:end], known, root / f"part{k}")
        if (dirs[k] / "manifest.json").is_file():
            continue
        log(f"{dataset}: preparing DIR_{k} ({end - start:,} interactions{'' if k == 0 else ' appended'})")
        extra = {} if k == 0 else {"append_to": str(dirs[k - 1])}
        if k == 0 and items is None:
            raise ValueError(f"{dataset}: the first part names no items")
        prepare(PrepareConfig(source="csv", interactions=str(inter), items=str(items) if items else None,
                              out=str(dirs[k]), **extra))
    return dirs


# -- scoring ---------------------------------------------------------------------------------------------

@torch.no_grad()
def scored(model, data_dir: Path, first_ids: set) -> dict:
    """Valid and test NDCG@10 (fused, with its standard error), and on the test users whose target is an item
    added after the cut; how many of those items the model indexes and puts in anyone's top 10."""
    from odmt_t4r.contract import catalog_item_ids
    from odmt_t4r.model import history_and_target
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_model
    from odmt_t4r.training.metrics import RankingAccumulator
    from odmt_t4r.training.streaming import streaming_update

    data = PreparedData(data_dir)
    ids = catalog_item_ids(data_dir)
    new = torch.zeros(max(model.config.n_index, len(ids)), dtype=torch.bool)
    new[: len(ids)] = torch.tensor([bool(i) and i not in first_ids for i in ids], dtype=torch.bool)
    model.eval()
    acc = RankingAccumulator(n_index=model.config.n_index)
    for batch in data.batches("test", 512):
        history, target = history_and_target(batch["items"])
        streaming_update(acc, model, history, target, batch.get("seen"), tail=new[target])  # tail: the new-item rows
    test = acc.compute()
    valid = evaluate_model(model, data, "valid")
    return {"valid_ndcg10": valid["NDCG@10"], "valid_se": valid["se/NDCG@10"],
            "test_ndcg10": test["NDCG@10"], "test_se": test["se/NDCG@10"],
            "new_ndcg10": test.get("longtail/NDCG@10", 0.0), "new_test_users": int(torch.cat(acc.tail).sum()),
            "test_users": int(sum(len(r) for r in acc.ranks["fused"])),
            "new_items": int(new.sum()), "new_items_indexed": int(new[: model.config.n_index].sum()),
            "new_items_recommended": int(acc.recommended["fused"][new[: model.config.n_index]].sum())}


# -- the arms --------------------------------------------------------------------------------------------

class Records:
    """One JSON file per finished step in WORK/records: what a rerun reuses, and what the results are made of."""

    def __init__(self, work: Path):
        self.folder = work / "records"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> dict:
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, self.path(key))
        return record

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]


def timed(fn):
    """(fn(), its wall seconds, its CPU seconds): one torch thread per process, so on a shared machine the CPU
    time is what the step would take alone; the wall time grows with whatever else runs."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def full_arm(dataset: str, model: str, k: int, dirs: list[Path], seed: int, work: Path, records: Records,
             first_ids: set) -> dict:
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.selection import train_model

    key = f"{dataset}-{model}-full-{k}-s{seed}"
    if (done := records.get(key)) is not None:
        return done
    run = work / "runs" / dataset / f"{model}-full{k}-s{seed}"
    settings = quality.train_settings(model, seed, None, None)
    log(f"{key}: training from scratch on {dirs[k]}")
    resumed = run.is_dir() and any(run.iterdir())
    summary, seconds, cpu = timed(lambda: train_model(settings, dirs[k], run, resume=True,
                                                      log=lambda m: log(f"  [{key}] {m}")))
    metrics = scored(OdmtRecommender.from_pretrained(run, data_dir=dirs[k]), dirs[k], first_ids)
    return records.put(key, {"dataset": dataset, "model": model, "arm": "full", "increment": k, "seed": seed,
                             "run": str(run), "seconds": round(seconds, 1), "epochs_run": summary["epochs_run"],
                             **({} if resumed else {"cpu_seconds": round(cpu, 1)}), **metrics})


def update_settings(variant: str) -> dict:
    """An --updates variant ("lr1-recent-e5") -> odmt update's settings."""
    settings = {"progress": False, "threads": 1}
    for part in variant.split("-"):
        if part.startswith("lr"):
            settings["lr_factor"] = float(part[2:])
        elif part in ("recent", "all"):
            settings["window"] = part
        elif part.startswith("e") and part[1:].isdigit():
            settings["epochs"] = int(part[1:])
        else:
            raise ValueError(f"update variant {variant!r}: unknown part {part!r} (lr<F>, recent, all, e<N>)")
    return settings


def update_arm(dataset: str, model: str, k: int, dirs: list[Path], seed: int, work: Path, records: Records,
               first_ids: set, variant: str, parent: Path) -> dict:
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.update import update_run

    arm = f"update-{variant}"
    key = f"{dataset}-{model}-{arm}-{k}-s{seed}"
    if (done := records.get(key)) is not None:
        return done
    run = work / "runs" / dataset / f"{model}-{arm}{k}-s{seed}"
    settings = update_settings(variant)
    log(f"{key}: updating {parent.name} on {dirs[k]}")
    resume = run.is_dir() and any(run.iterdir())
    summary, seconds, cpu = timed(lambda: update_run(parent, dirs[k], run, settings, resume=resume,
                                                     log=lambda m: log(f"  [{key}] {m}")))
    metrics = scored(OdmtRecommender.from_pretrained(run, data_dir=dirs[k]), dirs[k], first_ids)
    return records.put(key, {"dataset": dataset, "model": model, "arm": arm, "increment": k, "seed": seed,
                             "run": str(run), "parent_run": str(parent), "seconds": round(seconds, 1),
                             "epochs_run": summary["epochs_run"], "settings": settings,
                             **({} if resume else {"cpu_seconds": round(cpu, 1)}), **metrics})


def stale_arm(dataset: str, model: str, k: int, dirs: list[Path], seed: int, records: Records, first_ids: set,
              run0: Path) -> dict:
    from odmt_t4r.training.update import served_on

    key = f"{dataset}-{model}-stale-{k}-s{seed}"
    if (done := records.get(key)) is not None:
        return done
    model_k, seconds, cpu = timed(lambda: served_on(run0, dirs[k]))
    return records.put(key, {"dataset": dataset, "model": model, "arm": "stale", "increment": k, "seed": seed,
                             "run": str(run0), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                             **scored(model_k, dirs[k], first_ids)})


# -- results -----------------------------------------------------------------------------------------------

def chosen_update(records: list[dict]) -> str | None:
    """The update arm with the best mean valid NDCG@10 over the (dataset, model, increment, seed) cases that every
    update arm ran (a variant run on one seed only is compared on that seed)."""
    by_arm: dict[str, dict[tuple, float]] = {}
    for r in records:
        if r["arm"].startswith("update") and r["increment"] > 0:
            by_arm.setdefault(r["arm"], {})[(r["dataset"], r["model"], r["increment"], r["seed"])] = r["valid_ndcg10"]
    if not by_arm:
        return None
    common = set.intersection(*(set(cases) for cases in by_arm.values()))
    if not common:
        return None
    return max(by_arm, key=lambda a: statistics.mean(by_arm[a][c] for c in common))


def cost(record: dict, other: dict | None = None) -> float:
    """An arm's cost in seconds, compared with `other`'s in the same unit: CPU seconds when both have them (what
    each would take on a quiet machine), else the epochs' logged wall time (robust to a resume)."""
    if "cpu_seconds" in record and (other is None or "cpu_seconds" in other):
        return record["cpu_seconds"]
    return record.get("train_seconds", record["seconds"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def goals(records: list[dict], update: str | None) -> list[dict]:
    """The issue's goals, per dataset, model and increment, over the seeds where the full retrain, the chosen update
    and the stale arm all ran: the update's mean test NDCG@10 at least the full retrain's mean minus one standard
    error (over users, the mean of the seeds'), at <= UPDATE_SHARE of its cost (the median of the seeds' shares);
    the stale arm's mean below the update's."""
    index = {(r["dataset"], r["model"], r["arm"], r["increment"], r["seed"]): r for r in records}
    cases: dict[tuple, list[int]] = {}
    for (ds, model, arm, k, seed) in index:
        if arm == "full" and k > 0 and all((ds, model, a, k, seed) in index for a in (update, "stale")):
            cases.setdefault((ds, model, k), []).append(seed)
    out = []
    for (ds, model, k), seeds in sorted(cases.items()):
        seeds = sorted(seeds)
        full, upd, stale = ([index[(ds, model, a, k, s)] for s in seeds] for a in ("full", update, "stale"))
        (f_mean, f_std), (u_mean, u_std), (s_mean, s_std) = (
            _mean_std([r["test_ndcg10"] for r in arm]) for arm in (full, upd, stale))
        f_se, u_se = statistics.mean(r["test_se"] for r in full), statistics.mean(r["test_se"] for r in upd)
        shares = [cost(u, f) / cost(f, u) for u, f in zip(upd, full)]
        out.append({"dataset": ds, "model": model, "increment": k, "seeds": seeds,
                    "full_test": round(f_mean, 4), "full_test_std": round(f_std, 4), "full_test_se": round(f_se, 4),
                    "update_test": round(u_mean, 4), "update_test_std": round(u_std, 4),
                    "stale_test": round(s_mean, 4), "stale_test_std": round(s_std, 4),
                    "update_within_1se": u_mean >= f_mean - f_se,
                    "update_gap_in_se": round((u_mean - f_mean) / max(f_se, 1e-12), 2),
                    "update_time_share": round(statistics.median(shares), 3),
                    "update_time_met": statistics.median(shares) <= UPDATE_SHARE,
                    "update_epoch_share": round(statistics.median(u["epochs_run"] / f["epochs_run"]
                                                                  for u, f in zip(upd, full)), 3),
                    "stale_below_update": s_mean < u_mean,
                    "stale_gap_in_se": round((u_mean - s_mean) / max(u_se, 1e-12), 2)})
    return out


def markdown(records: list[dict], update: str | None) -> str:
    lines = ["| dataset | model | k | arm | seed | valid NDCG@10 | test NDCG@10 ± se | new-item NDCG@10 (users) | "
             "new items indexed / in a top 10 | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["dataset"], r["model"], r["increment"], r["arm"], r["seed"])):
        mark = " (chosen)" if r["arm"] == update else ""
        lines.append(f"| {r['dataset']} | {r['model']} | {r['increment']} | {r['arm']}{mark} | {r['seed']} | "
                     f"{r['valid_ndcg10']:.4f} | {r['test_ndcg10']:.4f} ± {r['test_se']:.4f} | "
                     f"{r['new_ndcg10']:.4f} ({r['new_test_users']}) | "
                     f"{r['new_items_indexed']} / {r['new_items_recommended']} of {r['new_items']} | {cost(r):.0f} |")
    return "\n".join(lines)


def goals_markdown(goal_rows: list[dict]) -> str:
    """The goals per increment: mean ± std over seeds of the full retrain, the chosen update and the stale arm."""
    lines = ["| dataset | model | k | seeds | full retrain (± std; se) | update | within 1 se | stale | "
             "stale below update (gap in se) | update / full cost (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in goal_rows:
        lines.append(f"| {g['dataset']} | {g['model']} | {g['increment']} | {len(g['seeds'])} | "
                     f"{g['full_test']:.4f} ± {g['full_test_std']:.4f}; {g['full_test_se']:.4f} | "
                     f"{g['update_test']:.4f} ± {g['update_test_std']:.4f} | "
                     f"{'yes' if g['update_within_1se'] else 'no'} ({g['update_gap_in_se']:+.2f}) | "
                     f"{g['stale_test']:.4f} ± {g['stale_test_std']:.4f} | "
                     f"{'yes' if g['stale_below_update'] else 'no'} ({g['stale_gap_in_se']:+.2f}) | "
                     f"{g['update_time_share']:.2f} |")
    return "\n".join(lines)


def with_train_seconds(record: dict) -> dict:
    """A trained arm's training + validation seconds over its epochs (RUN/log.jsonl, summed across resumes: the
    wall time of a run that was interrupted and resumed is not one figure)."""
    if record["arm"] != "stale" and "train_seconds" not in record and (Path(record["run"]) / "log.jsonl").is_file():
        record = {**record, "train_seconds": quality._logged_seconds(Path(record["run"]))}
    return record


def write_results(records: Records, args) -> dict:
    everything = [with_train_seconds(r) for r in records.all()]
    update = chosen_update(everything)
    settings = {"cut": args.cut, "step": args.step, "increments": args.increments,  # of the stream in WORK
                "datasets": sorted({r["dataset"] for r in everything}), "seeds": sorted({r["seed"] for r in everything}),
                "arms": sorted({r["arm"] for r in everything})}
    result = {"settings": settings, "chosen_update": update,
              "update_share_goal": UPDATE_SHARE, "goals": goals(everything, update), "records": everything,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, RESULTS)  # two processes (one per dataset) may write it: each writes every record found
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "fashion"])
    p.add_argument("--models", nargs="+", default=["odmt", "sasrec"])
    p.add_argument("--seed", type=int, default=0, help="the seed of this run's trainings; run once per seed: the "
                   "goals are computed over every seed recorded in WORK")
    p.add_argument("--cut", type=float, default=0.7, help="share of the timeline the first model is trained on")
    p.add_argument("--step", type=float, default=0.1, help="share of the timeline each increment adds")
    p.add_argument("--increments", type=int, default=3)
    p.add_argument("--updates", nargs="+", default=["lr1"],
                   help="update chains to compare: lr<F> (--lr-factor), recent/all (--window), e<N> (--epochs), "
                        "joined by '-'; the update's defaults are chosen among them on validation")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "continual")
    p.add_argument("--report-only", action="store_true", help="train nothing: the tables of what WORK records")
    args = p.parse_args()
    if not (0 < args.cut < 1 and args.step > 0 and args.increments >= 1):
        p.error("--cut must be in (0, 1), --step > 0 and --increments >= 1")
    for variant in args.updates:
        try:
            update_settings(variant)
        except ValueError as exc:
            p.error(str(exc))
    torch.set_num_threads(1)
    records = Records(args.work)
    for dataset in [] if args.report_only else args.datasets:
        dirs = prepared_stream(dataset, args.work, args.cut, args.step, args.increments)
        from odmt_t4r.contract import catalog_item_ids
        first_ids = {i for i in catalog_item_ids(dirs[0]) if i}
        for model in args.models:
            first = full_arm(dataset, model, 0, dirs, args.seed, args.work, records, first_ids)
            chains = {v: Path(first["run"]) for v in args.updates}
            for k in range(1, args.increments + 1):
                for v in args.updates:
                    chains[v] = Path(update_arm(dataset, model, k, dirs, args.seed, args.work, records, first_ids, v,
                                                chains[v])["run"])
                stale_arm(dataset, model, k, dirs, args.seed, records, first_ids, Path(first["run"]))
                write_results(records, args)
                full_arm(dataset, model, k, dirs, args.seed, args.work, records, first_ids)
                write_results(records, args)
    result = write_results(records, args)
    print(markdown(result["records"], result["chosen_update"]))
    print()
    print(goals_markdown(result["goals"]))


if __name__ == "__main__":
    main()
