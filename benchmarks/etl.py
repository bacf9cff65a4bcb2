"""ETL benchmark: the NVTabular session + split workflows against the plain pandas reference
(workflows/reference.py) on generated interactions, in the same run; outputs are checked equal.

    .venv/bin/python benchmarks/etl.py [--rows 1000000 10000000] [--repeats 3]

Prints and writes benchmarks/results/etl.json: rows/s of each path (median of the repeats), the ratio
NVTabular / pandas, and the peak memory (RSS high-water mark) of each path, measured in a fresh child
process per path and size so one path's memory does not count against the other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).parent / "results" / "etl.json"
MAX_LENGTH = 20


def generate(n_rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interactions with string IDs: ~n/40 users, Zipf-skewed items, coarse timestamps (many ties)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, n_rows // 40), max(10, n_rows // 200)
    items = np.minimum(rng.zipf(1.3, n_rows), n_items) - 1
    inter = pd.DataFrame({
        "user_id": pd.Series(rng.integers(0, n_users, n_rows)).map("u{}".format),
        "item_id": pd.Series(items).map("i{}".format),
        "timestamp": rng.integers(0, 10_000, n_rows),
    })
    return inter, pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)]})


def run_nvtabular(inter, items, out):
    import nvtabular as nvt
    from workflows import sessions as W
    t = time.perf_counter()
    inter = inter.assign(**{W.ROW_COL: np.arange(len(inter))})
    vocab = W.item_vocabulary(inter, items)
    _, splits = W.run_session_workflows(nvt.Dataset(inter), vocab, W.SessionConfig(max_length=MAX_LENGTH), str(out / "cats"))
    result = {split: ds.to_ddf().compute() for split, ds in splits.items()}
    return time.perf_counter() - t, result


def run_pandas(inter, items):
    from workflows import reference as ref
    from workflows import sessions as W
    t = time.perf_counter()
    vocab = W.item_vocabulary(inter, items)
    sess = ref.sessions(inter, vocab)
    cfg = W.SessionConfig(max_length=MAX_LENGTH)
    result = {split: ref.split(sess, split, cfg) for split in W.SPLITS}
    return time.perf_counter() - t, result


def _child(path: str, n_rows: int, repeats: int, q) -> None:
    warnings.filterwarnings("ignore")
    inter, items = generate(n_rows)
    times, result = [], None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            secs, result = run_nvtabular(inter, items, Path(tmp)) if path == "nvtabular" else run_pandas(inter, items)
        times.append(secs)
    # a fingerprint of the outputs, compared across the two processes
    fp = {s: _fingerprint(df) for s, df in result.items()}
    q.put({"times": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "fingerprint": fp})


def _fingerprint(df: pd.DataFrame) -> list:
    lists = sorted(tuple(int(v) for v in x) for x in df["item_id-list"])
    seen = sorted(tuple(int(v) for v in x) for x in df["seen-list"]) if "seen-list" in df else []
    return [len(df), hash(tuple(lists)), hash(tuple(seen))]


def measure(path, n_rows: int, repeats: int, target=None) -> dict:
    """What target(path, n_rows, repeats, queue) (default `_child`) puts on the queue, run in a fresh
    spawned process so its memory high-water mark is its own; a child that dies (e.g. out of memory) raises."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target or _child, args=(path, n_rows, repeats, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{path} at {n_rows:,} rows: the child process died (exit code {p.exitcode})") from None
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rows = []
    for n in args.rows:
        reps = args.repeats if n <= 2_000_000 else 1  # 10M once per path keeps the run to minutes
        nvt_res, pd_res = measure("nvtabular", n, reps), measure("pandas", n, reps)
        equal = nvt_res["fingerprint"] == pd_res["fingerprint"]
        t_nvt, t_pd = statistics.median(nvt_res["times"]), statistics.median(pd_res["times"])
        row = {"rows": n, "repeats": reps, "outputs_equal": equal,
               "nvtabular_s": round(t_nvt, 2), "pandas_s": round(t_pd, 2),
               "nvtabular_rows_per_s": round(n / t_nvt), "pandas_rows_per_s": round(n / t_pd),
               "speed_ratio_nvtabular_over_pandas": round(t_pd / t_nvt, 2),
               "nvtabular_peak_rss_gb": round(nvt_res["peak_rss_gb"], 2), "pandas_peak_rss_gb": round(pd_res["peak_rss_gb"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not equal:
            raise SystemExit(f"outputs differ at {n} rows")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "etl", "machine": platform.processor() or platform.machine(),
                                          "cpus": mp.cpu_count(), "max_length": MAX_LENGTH, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
