"""Prints the test metrics of several RUN folders side by side (used by `make run`).

    python scripts/compare_runs.py runs/odmt runs/sasrec [--split test]
Reads RUN/metrics-<split>.json (written by `odmt evaluate`).
"""

import argparse
import json
import sys
from pathlib import Path

METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        path = Path(run) / f"metrics-{args.split}.json"
        if not path.is_file():
            print(f"{path} not found: run `odmt evaluate --run {run} --split {args.split}` first", file=sys.stderr)
            return 2
        rows.append((Path(run).name, json.loads(path.read_text())))
    width = max(len(name) for name, _ in rows) + 2
    print(f"{args.split} split, all items ranked, each user's earlier items excluded "
          f"({rows[0][1].get('n_users', '?')} users)")
    print("model".ljust(width) + "".join(m.rjust(10) for m in METRICS))
    for name, m in rows:
        print(name.ljust(width) + "".join(f"{m[k]:10.4f}" for k in METRICS))
    base = rows[-1][1]["NDCG@10"]
    for name, m in rows[:-1]:
        print(f"{name} NDCG@10 / {rows[-1][0]} NDCG@10 = {m['NDCG@10'] / base:.2f}x" if base else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
