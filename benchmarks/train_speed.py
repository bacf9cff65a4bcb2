"""Training speed benchmark: samples/s of an ODMT step against a SASRec step at the same width, length and
batch, interleaved in one run (medians of the repeats), plus the time our sasrec needs to reach the RecBole
SASRec anchor's NDCG@10 on ml-100k, plus the wall time of a model selection (`--model odmt-auto`) with its
candidates trained side by side against one after another.

    .venv/bin/python benchmarks/train_speed.py [--data ml-100k fashion] [--steps 5] [--repeats 3]
                                               [--loss full in_batch] [--batch 128] [--threads 1]
                                               [--parts steps anchor selection] [--selection-epochs 3]

Writes benchmarks/results/train_speed.json. Anchor: RecBole SASRec on ml-100k on one core here
reached its best epoch (6) after about 6 x 2.2 = 13.2 minutes; goal: our sasrec reaches the same
NDCG@10 (0.1058, RecBole's test figure; we compare it to our valid NDCG@10) in at most a third of that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
RECBOLE_MINUTES_TO_BEST = 6 * 2.2
RECBOLE_NDCG10 = 0.1058


def _prepared(source: str, work: Path) -> Path:
    from odmt_t4r.prepare import PrepareConfig, prepare
    out = work / "data" / source
    if not (out / "manifest.json").is_file():
        prepare(PrepareConfig(source=source, out=str(out)))
    return out


def cpu_bf16_units() -> list[str]:
    """The CPU's bfloat16 instruction sets (AMX, AVX-512 BF16), from /proc/cpuinfo; [] elsewhere."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16"))


def step_rates(data_dir: Path, losses: list[str], steps: int, repeats: int, batch: int, threads: int) -> dict:
    import torch
    from odmt_t4r.model import build_model
    from odmt_t4r.training.data import PreparedData

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    data = PreparedData(data_dir)
    batches = []
    for b in data.batches("train", batch, shuffle=True, seed=0):
        if len(b["items"]) == batch:
            batches.append(b["items"])
        if len(batches) == steps:
            break
    # each preset with the loss it uses by default (the headline ratio), then both at each loss
    variants = {"sasrec": ("sasrec", {}), "odmt": ("odmt", {}), "odmt-imt": ("odmt-imt", {})}
    for loss in losses:
        variants[f"odmt[{loss}]"] = ("odmt", {"loss": loss})
        variants[f"sasrec[{loss}]"] = ("sasrec", {"loss": loss})
    # bf16 autocast (TrainConfig.amp "bf16"): measured, not assumed, whatever the CPU has
    variants["odmt[bf16]"], variants["sasrec[bf16]"] = ("odmt", {}), ("sasrec", {})
    models = {}
    for name, (preset, kw) in variants.items():
        model = build_model(preset, data.info, **kw)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("[bf16]"))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), amp)
    times = {n: [] for n in models}
    for _ in range(repeats):
        for name, (model, opt, amp) in models.items():  # interleaved: each repeat measures every variant
            model.train()
            t = time.perf_counter()
            for items in batches:
                with amp:
                    loss = model(items, progress=0.5)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name].append(time.perf_counter() - t)
    rates = {n: round(len(batches) * batch / statistics.median(ts), 1) for n, ts in times.items()}
    # the in-batch tower runs on each batch's unique history and target items, not the catalog
    unique = statistics.median(len(torch.unique(b[b > 0])) for b in batches)
    out = {"samples_per_s": rates, "batch": batch, "steps": len(batches), "repeats": repeats, "threads": threads,
           "max_length": data.max_length, "n_items": data.info.n_index - 3, "unique_items_per_batch": unique}
    out["odmt_step_cost_over_sasrec"] = round(rates["sasrec"] / rates["odmt"], 2)
    out["odmt-imt_step_cost_over_odmt"] = round(rates["odmt"] / rates["odmt-imt"], 2)
    out["cpu_bf16_units"] = cpu_bf16_units()
    out["bf16_speedup"] = {m: round(rates[f"{m}[bf16]"] / rates[m], 2) for m in ("odmt", "sasrec")}
    for loss in losses:
        out[f"odmt_step_cost_over_sasrec[{loss}]"] = round(rates[f"sasrec[{loss}]"] / rates[f"odmt[{loss}]"], 2)
    return out


def time_to_anchor(data_dir: Path, work: Path, epochs: int) -> dict:
    import shutil
    from odmt_t4r.training.train import TrainConfig, train_run

    run = work / "runs" / "speed-sasrec"
    shutil.rmtree(run, ignore_errors=True)
    train_run(TrainConfig(model="sasrec", epochs=epochs, patience=epochs, progress=False), data_dir, run, log=lambda m: None)
    elapsed, reached = 0.0, None
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        elapsed += rec["seconds"]
        if reached is None and rec["valid"]["NDCG@10"] >= RECBOLE_NDCG10:
            reached = {"epoch": rec["epoch"], "minutes": round(elapsed / 60, 2), "valid_NDCG@10": round(rec["valid"]["NDCG@10"], 4)}
    budget = RECBOLE_MINUTES_TO_BEST / 3
    return {"target_NDCG@10": RECBOLE_NDCG10, "recbole_minutes_to_best": RECBOLE_MINUTES_TO_BEST,
            "goal_minutes": round(budget, 2), "reached": reached,
            "goal_met": bool(reached and reached["minutes"] <= budget)}


def selection_wall_time(data_dir: Path, work: Path, epochs: int, repeats: int) -> dict:
    """Seconds for `odmt train --model odmt-auto --epochs N` with its candidates one after another
    (--candidate-jobs 1) and side by side (0: as many as the cores allow), interleaved; medians."""
    import shutil
    from odmt_t4r.parallel import usable_cores
    from odmt_t4r.training.selection import train_model

    seconds = {1: [], 0: []}
    for _ in range(repeats):
        for jobs in seconds:
            run = work / "runs" / f"speed-selection-{jobs}"
            shutil.rmtree(run, ignore_errors=True)
            settings = dict(model="odmt-auto", epochs=epochs, patience=epochs, progress=False, candidate_jobs=jobs)
            start = time.perf_counter()
            summary = train_model(settings, data_dir, run, log=lambda m: None)
            seconds[jobs].append(time.perf_counter() - start)
            print(f"selection, candidate_jobs {jobs}: {seconds[jobs][-1]:.1f}s (chose {summary['chosen']})",
                  file=sys.stderr, flush=True)
    one, side = statistics.median(seconds[1]), statistics.median(seconds[0])
    return {"model": "odmt-auto", "epochs": epochs, "repeats": repeats, "cores": usable_cores(),
            "one_after_another_s": round(one, 1), "side_by_side_s": round(side, 1),
            "speedup": round(one / side, 2), "all_s": {str(k): [round(x, 1) for x in v] for k, v in seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["ml-100k", "fashion"], help="prepared DIRs or source names")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: TrainConfig's batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (TrainConfig's default is 1)")
    ap.add_argument("--loss", nargs="+", default=["full", "in_batch"])
    ap.add_argument("--anchor-epochs", type=int, default=15, help="0 skips the anchor part")
    ap.add_argument("--parts", nargs="+", default=["steps", "anchor", "selection"],
                    choices=["steps", "anchor", "selection"], help="what to measure (the others are kept from --out)")
    ap.add_argument("--selection-epochs", type=int, default=3, help="epochs of each selection candidate")
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(args.work)
    from odmt_t4r.training.train import TrainConfig
    batch = args.batch or TrainConfig().batch_size
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    result = {"benchmark": "train_speed", "datasets": {}, **previous}
    if "steps" in args.parts:
        result["datasets"] = {}
        for d in args.data:
            data_dir = Path(d) if Path(d).is_dir() else _prepared(d, work)
            r = step_rates(data_dir, args.loss, args.steps, args.repeats, batch, args.threads)
            result["datasets"][d] = r
            print(json.dumps({d: r}), flush=True)
    ml = Path("ml-100k") if Path("ml-100k").is_dir() else _prepared("ml-100k", work)
    if "anchor" in args.parts and args.anchor_epochs > 0:  # 0: not measured (the JSON keeps the last figure)
        result["sasrec_time_to_recbole_anchor"] = time_to_anchor(ml, work, args.anchor_epochs)
        print(json.dumps(result["sasrec_time_to_recbole_anchor"]))
    if "selection" in args.parts and args.selection_epochs > 0:
        result["selection_ml-100k"] = selection_wall_time(ml, work, args.selection_epochs, args.repeats)
        print(json.dumps(result["selection_ml-100k"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
