"""Serving demo: export a RUN, start a real Triton server, ask it for recommendations, stop it.

    .venv/bin/python scripts/demo_serving.py --run RUN [--data DIR] [--sessions 3] [--k 5] [--transform fast]

Exports RUN (with its prepared DIR's inference workflow) to a temporary model repository, starts
`tritonserver` on it (CPU), sends a few sessions from DIR's test split through the HTTP and gRPC
endpoints in raw item IDs, prints each session's latest items and the recommendations with their
item text (marking the held-out next item when it is recommended), and stops the server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def held_out_sessions(data_dir: Path, n: int, seed: int) -> list[tuple[list[str], str]]:
    """(history, held-out next item) in raw IDs for `n` users of the test split."""
    import numpy as np
    import pandas as pd

    from odmt_t4r.prepare import read_split

    frame = read_split(data_dir / "test", ["seen-list", "item_id-list"])
    items = pd.read_parquet(data_dir / "items.parquet", columns=["item_idx", "item_id"])
    raw = dict(zip(items["item_idx"].tolist(), items["item_id"].astype(str).tolist()))
    rows = np.random.default_rng(seed).choice(len(frame), size=min(n, len(frame)), replace=False)
    out = []
    for r in rows:
        history = [raw[int(i)] for i in frame["seen-list"].iloc[r]]
        target = raw[int(frame["item_id-list"].iloc[r][-1])]
        out.append((history, target))
    return out


def describe(item_id: str, text: dict, width: int = 70) -> str:
    return textwrap.shorten(f"{item_id}  {text.get(item_id, '')}", width=width, placeholder="...")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained RUN (odmt train ... --out RUN)")
    p.add_argument("--data", default=None, help="prepared DIR (default: the one recorded in the RUN)")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--transform", choices=("fast", "workflow"), default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-history", type=int, default=4, help="latest history items to print per session")
    args = p.parse_args(argv)

    import pandas as pd

    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export, run_data_dir
    from triton_models.server import TritonServer, TritonServerError

    try:
        data_dir = run_data_dir(Path(args.run), args.data)
    except FileNotFoundError as exc:
        print(f"demo_serving: error: {exc}", file=sys.stderr)
        return 2
    items = pd.read_parquet(data_dir / "items.parquet")
    text = dict(zip(items["item_id"].astype(str), items["text"].fillna("") if "text" in items else [""] * len(items)))
    work = Path(tempfile.mkdtemp(prefix="odmt-demo-serving-"))
    try:
        repo = work / "repo"
        t = time.perf_counter()
        manifest = export(args.run, repo, ServingConfig(k=max(args.k, 10), transform=args.transform),
                          data_dir=data_dir, check_sessions=50, log=lambda m: print(f"[export] {m}", flush=True))
        print(f"exported {manifest['model']} ({manifest['transform']} transform) in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        with TritonServer(repo, log_file=work / "tritonserver.log") as server:
            print(f"tritonserver ready in {time.perf_counter() - t:.1f}s  (HTTP {server.http_url}, gRPC {server.grpc_url})\n")
            examples = held_out_sessions(data_dir, args.sessions, args.seed)
            with RecommenderClient(server.http_url, "http") as http, RecommenderClient(server.grpc_url, "grpc") as grpc:
                t = time.perf_counter()
                answers = http.recommend([h for h, _ in examples], args.k)
                http_ms = (time.perf_counter() - t) * 1e3
                assert grpc.recommend([h for h, _ in examples], args.k) == answers, "HTTP and gRPC disagree"
            for n, ((history, target), recs) in enumerate(zip(examples, answers), 1):
                print(f"session {n}: {len(history)} items, latest {min(args.show_history, len(history))}:")
                for item in history[-args.show_history:]:
                    print(f"      {describe(item, text)}")
                print(f"  held-out next item: {describe(target, text)}")
                print(f"  top-{args.k}:")
                for rank, (item, score) in enumerate(recs, 1):
                    mark = "  <- the held-out next item" if item == target else ""
                    print(f"  {rank:>3}. {score:8.3f}  {describe(item, text)}{mark}")
                print()
            print(f"{len(examples)} sessions in one HTTP request: {http_ms:.1f} ms; gRPC gave the same answers")
    except (TritonServerError, FileNotFoundError, ValueError, AssertionError) as exc:
        print(f"demo_serving: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
