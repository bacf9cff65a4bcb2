"""Scale-out benchmark, side by side in one run: the ETL (`odmt prepare`'s session + split workflows) in one
process and on a local Dask cluster of 1 and 2 workers, and `odmt train` samples/s with 1 and 2 processes.

    .venv/bin/python benchmarks/scale_out.py [--rows 1000000 10000000] [--repeats 3] [--workers 0 1 2]
                                             [--data DIR] [--models odmt sasrec] [--nproc 1 2]
                                             [--epochs 1] [--train-repeats 3] [--skip-etl] [--skip-train]

ETL: interactions from benchmarks/etl.py's `generate`, run through odmt_t4r.prepare's `dask_cluster` and
`run_workflows` (the code `odmt prepare --dask-workers N` runs: one partition per worker, split by user
ranges, splits written as parquet), each configuration in a fresh child process (workers 0 = no cluster).
Seconds are the workflows and the parquet writes (median of the repeats; 1 repeat above 2M rows), the
cluster start is given apart. Peak RSS is the child's high-water mark (it holds the input frame and, with
a cluster, the scheduler and the nannies) plus each worker process's, read on them before the cluster
closes; the sum counts again the libraries every process loads (about 0.45 GB each). Outputs are checked equal across configurations.

Training: `odmt train --epochs E --threads 1 --nproc N` as a subprocess per configuration, interleaved over
the repeats; samples/s = training rows the epoch used / its `train_seconds` from the RUN's log.jsonl (rank
0's loop: evaluation, start-up and the final fusion excluded; with E > 1 the first epoch is left out).

Writes benchmarks/results/scale_out.json with the load average before and after each part.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import etl  # noqa: E402  (benchmarks/etl.py: the generator, fingerprint and child-process runner)

RESULTS = Path(__file__).parent / "results" / "scale_out.json"
WORK = Path(__file__).parent / "work"
GB = 2**20  # ru_maxrss is in KiB on Linux


def log(msg: str) -> None:
    print(f"[scale_out] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _autogroup() -> str:
    """Linux autogroup: when on, the CPU is shared between sessions first, so other jobs' nice hardly matters."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        return "unknown"


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB


# ---------------------------------------------------------------------------- ETL
def _import_stack() -> None:
    import workflows.sessions  # noqa: F401  (nvtabular, merlin, dask_cudf shims)


def _etl_child(workers: int, n_rows: int, repeats: int, q) -> None:
    """One configuration in this fresh process: `workers` 0 runs without a cluster, like `odmt prepare`."""
    warnings.filterwarnings("ignore")
    from odmt_t4r.contract import read_split
    from odmt_t4r.prepare import PrepareConfig, dask_cluster, run_workflows
    from workflows import sessions as W

    inter, items = etl.generate(n_rows)
    inter[W.ROW_COL] = np.arange(len(inter))  # input-file order, as prepare adds it
    cfg = PrepareConfig(dask_workers=workers)
    scfg = W.SessionConfig(max_length=etl.MAX_LENGTH)
    times, fingerprint, split_rows = [], None, None
    t = time.perf_counter()
    with dask_cluster(cfg) as client:
        if client is not None:  # the workers import the stack once, counted in the start (not the first repeat)
            client.run(_import_stack)
        start_s = time.perf_counter() - t
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                vocab = W.item_vocabulary(inter, items)
                _, split_rows = run_workflows(inter, vocab, scfg, Path(tmp), client)
                times.append(time.perf_counter() - t)
                fingerprint = {s: etl._fingerprint(read_split(Path(tmp) / s)) for s in W.SPLITS}
        # the worker processes' high-water marks, read before the cluster closes (LocalCluster's nannies and
        # scheduler live in this process, so its own mark covers them)
        worker_gb = list(client.run(_maxrss_gb).values()) if client else []
    q.put({"times": times, "cluster_start_s": start_s if workers else 0.0, "split_rows": split_rows,
           "fingerprint": fingerprint, "main_peak_rss_gb": _maxrss_gb(), "worker_peak_rss_gb": worker_gb})


def bench_etl(sizes: list[int], repeats: int, workers: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        reps = repeats if n <= 2_000_000 else 1  # 10M once per configuration keeps the run to minutes
        by_config, fingerprints = {}, {}
        for w in workers:
            log(f"ETL {n:,} rows, {'no cluster' if w == 0 else f'{w} Dask worker(s)'}, {reps} repeat(s); load {load()}")
            before = load()
            res = etl.measure(w, n, reps, target=_etl_child)
            secs = statistics.median(res["times"])
            total_gb = res["main_peak_rss_gb"] + sum(res["worker_peak_rss_gb"])
            by_config[w] = {
                "seconds": round(secs, 2), "times": [round(x, 2) for x in res["times"]],
                "rows_per_s": round(n / secs), "cluster_start_s": round(res["cluster_start_s"], 2),
                "peak_rss_gb_total": round(total_gb, 2), "peak_rss_gb_main": round(res["main_peak_rss_gb"], 2),
                "peak_rss_gb_workers": [round(x, 2) for x in res["worker_peak_rss_gb"]],
                "split_rows": res["split_rows"], "load_before": before, "load_after": load()}
            fingerprints[w] = res["fingerprint"]
            log(f"  {json.dumps(by_config[w])}")
        names = {w: "1 process" if w == 0 else f"{w} workers" for w in workers}
        base = by_config[workers[0]]["seconds"]
        row = {"rows": n, "repeats": reps,
               "outputs_equal": all(fp == fingerprints[workers[0]] for fp in fingerprints.values()),
               "configs": {names[w]: c for w, c in by_config.items()},
               f"speedup_over_{names[workers[0]].replace(' ', '_')}":
                   {names[w]: round(base / c["seconds"], 2) for w, c in by_config.items()}}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- training
def _train_once(data_dir: Path, model: str, nproc: int, epochs: int, run: Path) -> dict:
    cmd = [sys.executable, "-m", "odmt_t4r.cli", "train", "--data", str(data_dir), "--model", model,
           "--out", str(run), "--epochs", str(epochs), "--threads", "1", "--nproc", str(nproc), "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"odmt train failed ({model}, --nproc {nproc}): exit {proc.returncode}")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    batch = json.loads((run / "config.json").read_text())["train"]["batch_size"]
    n_rows = json.loads((data_dir / "manifest.json").read_text())["counts"]["rows"]["train"]
    n_batches = -(-n_rows // batch)
    # each rank takes the same number of steps: the batches beyond a multiple of nproc are not used
    used = min(n_rows, (n_batches // nproc) * nproc * batch)
    timed = records[1:] or records  # the first epoch warms up; kept when it is the only one
    secs = sum(r["train_seconds"] for r in timed)
    return {"samples_per_s": used * len(timed) / secs, "train_seconds": [r["train_seconds"] for r in timed],
            "samples_per_epoch": used, "batch_per_process": batch, "wall_s": round(wall, 1)}


def bench_train(data_dir: Path, models: list[str], nprocs: list[int], epochs: int, repeats: int) -> dict:
    runs = {m: {n: [] for n in nprocs} for m in models}
    before = load()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for m in models:  # interleaved: each repeat measures every configuration
                for n in nprocs:
                    res = _train_once(data_dir, m, n, epochs, Path(tmp) / f"{m}-{n}-{r}")
                    runs[m][n].append(res)
                    log(f"train {m} --nproc {n} repeat {r + 1}: {res['samples_per_s']:.1f} samples/s "
                        f"({res['train_seconds']} s, wall {res['wall_s']} s); load {load()}")
    out = {"data": str(data_dir), "epochs": epochs, "repeats": repeats, "threads_per_process": 1,
           "load_before": before, "load_after": load(), "models": {}}
    for m in models:
        rates = {n: statistics.median(x["samples_per_s"] for x in runs[m][n]) for n in nprocs}
        first = runs[m][nprocs[0]][0]
        out["models"][m] = {
            "samples_per_s": {str(n): round(v, 1) for n, v in rates.items()},
            "all_samples_per_s": {str(n): [round(x["samples_per_s"], 1) for x in runs[m][n]] for n in nprocs},
            "speedup_over_nproc_" + str(nprocs[0]): {str(n): round(v / rates[nprocs[0]], 2) for n, v in rates.items()},
            "samples_per_epoch": first["samples_per_epoch"], "batch_per_process": first["batch_per_process"]}
    return out


def _train_data(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from train_speed import _prepared  # benchmarks/train_speed.py: reuses benchmarks/work/data/fashion or prepares it
    return _prepared("fashion", WORK)


# ---------------------------------------------------------------------------- report
def table(result: dict) -> str:
    lines = []
    for row in result.get("etl", []):
        lines.append(f"ETL {row['rows']:,} rows ({row['repeats']} repeat(s), outputs equal: {row['outputs_equal']})")
        lines.append(f"  {'config':<12}{'seconds':>9}{'rows/s':>11}{'speedup':>9}{'start s':>9}{'peak RSS GB':>13}")
        speedups = next(v for k, v in row.items() if k.startswith("speedup"))
        for (name, c), s in zip(row["configs"].items(), speedups.values()):
            lines.append(f"  {name:<12}{c['seconds']:>9}{c['rows_per_s']:>11,}{s:>9}{c['cluster_start_s']:>9}"
                         f"{c['peak_rss_gb_total']:>13}")
    train = result.get("train")
    if train:
        lines.append(f"Training samples/s ({Path(train['data']).name}, {train['epochs']} epoch(s), median of "
                     f"{train['repeats']}, 1 torch thread per process)")
        for m, r in train["models"].items():
            speed = next(v for k, v in r.items() if k.startswith("speedup"))
            lines.append("  " + m + ": " + ", ".join(f"nproc {n} {v}" for n, v in r["samples_per_s"].items())
                         + " (x" + ", x".join(str(v) for v in speed.values()) + ")")
    lines.append(f"load average before {result['load_before']}, after {result['load_after']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3, help="ETL repeats at <= 2M rows (larger sizes run once)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = one process, no cluster")
    ap.add_argument("--data", default=None, help="prepared DIR to train on (default: benchmarks/work/data/fashion)")
    ap.add_argument("--models", nargs="+", default=["odmt", "sasrec"])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-repeats", type=int, default=3)
    ap.add_argument("--skip-etl", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    result = {"benchmark": "scale_out", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "sched_autogroup": _autogroup(), "load_before": load()}
    if not args.skip_etl:
        result["etl"] = bench_etl(args.rows, args.repeats, args.workers)
    if not args.skip_train:
        result["train"] = bench_train(_train_data(args.data), args.models, args.nproc, args.epochs, args.train_repeats)
    result["load_after"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    if not all(row["outputs_equal"] for row in result.get("etl", [])):
        raise SystemExit("ETL outputs differ between configurations")


if __name__ == "__main__":
    main()
