"""Soak benchmark: a served model repository under a minute of steady load, one request in ten malformed.

    .venv/bin/python benchmarks/soak.py [--data DIR] [--run RUN] [--seconds 60] [--clients 8] [--malformed-every 10]

It exports DIR/RUN (as benchmarks/serving.py does: DIR defaults to data/fashion, prepared if missing; without
--run an UNTRAINED odmt model of the same shapes) with the fast transform, starts a real `tritonserver` on
it, and runs `--clients` closed-loop client threads (half HTTP, half gRPC) for `--seconds`. Every
`--malformed-every`-th request of a client is malformed, cycling through five kinds (offsets past the
values, decreasing offsets, INT64 values, a missing input, an unknown input name); the others carry 1-3
test-split sessions (some with unknown IDs) in raw item IDs.

Recorded:
  * well-formed answers compared with the in-process model (`reference_recommend`: Workflow.transform
    and the eager model): identical IDs in order, or a reorder among scores equal within 1e-4 (a tie), or a
    mismatch; and errors on well-formed requests;
  * malformed requests: how many got an error, and with which status (400 / INVALID_ARGUMENT expected);
  * server RSS (tritonserver + its python stubs) after warm-up, at the end, and its peak (sampled each second);
  * latency percentiles and throughput of the well-formed requests, the load average before/after.
Prints the figures and writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import ensure_data, load_average, percentiles, untrained_run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "soak.json"
VALUES, OFFSETS = "item_id-list__values", "item_id-list__offsets"
ATOL = 1e-4
MALFORMED = ("offsets past the values", "decreasing offsets", "INT64 values", "missing offsets", "unknown input name")


def group_rss_mb(pgid: int) -> float:
    """Resident memory of a process group (tritonserver and its stubs), MB."""
    from triton_models.server import group_pids

    total = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def malformed_inputs(kind: str) -> list[tuple[str, np.ndarray, str]]:
    """One batch entry of a malformed request: (name, array [1, ...], datatype)."""
    one = np.array([[b"x", b"y"]], dtype=object)
    if kind == "offsets past the values":
        return [(VALUES, one, "BYTES"), (OFFSETS, np.array([[0, 5]], dtype=np.int32), "INT32")]
    if kind == "decreasing offsets":
        return [(VALUES, one, "BYTES"), (OFFSETS, np.array([[0, 2, 1, 2]], dtype=np.int32), "INT32")]
    if kind == "INT64 values":
        return [(VALUES, np.array([[3, 4]], dtype=np.int64), "INT64"), (OFFSETS, np.array([[0, 2]], dtype=np.int32), "INT32")]
    if kind == "missing offsets":
        return [(VALUES, one, "BYTES")]
    if kind == "unknown input name":
        return [("item_ids", one, "BYTES"), (OFFSETS, np.array([[0, 2]], dtype=np.int32), "INT32")]
    raise ValueError(kind)


def send_malformed(protocol: str, url: str, kind: str) -> str | None:
    """Sends a malformed request; returns the error status, or None if the server answered it."""
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url)
    try:
        tensors = []
        for name, array, datatype in malformed_inputs(kind):
            tensor = tc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, **({"binary_data": True} if protocol == "http" else {}))
            tensors.append(tensor)
        try:
            client.infer("executor_model", tensors)
        except InferenceServerException as exc:
            return str(exc.status())
        return None
    finally:
        client.close()


class Reference:
    """The in-process answer for every session of the pool, computed once (batched)."""

    def __init__(self, run: Path, data: Path, sessions: list[list[str]], k: int):
        import torch

        from odmt_t4r.model import OdmtRecommender
        from triton_models.checks import catalog_ids, reference_recommend
        from triton_models.graph import load_inference_workflow

        torch.set_num_threads(1)
        model = OdmtRecommender.from_pretrained(run, data_dir=data)
        workflow, ids = load_inference_workflow(data), catalog_ids(data)
        self.answers = {}
        for start in range(0, len(sessions), 256):
            chunk = sessions[start:start + 256]
            want_ids, want_scores = reference_recommend(model, workflow, ids, chunk, k)
            for s, i, sc in zip(chunk, want_ids, want_scores):
                keep = np.asarray([bool(x) for x in i])
                self.answers[tuple(s)] = (list(i[keep]), sc[keep].astype(np.float64))

    def judge(self, session: list[str], answer: list[tuple[str, float]]) -> str:
        want_ids, want_scores = self.answers[tuple(session)]
        got_ids, got_scores = [i for i, _ in answer], np.asarray([s for _, s in answer])
        if got_ids == want_ids and np.allclose(got_scores, want_scores, atol=ATOL, rtol=0):
            return "match"
        if sorted(got_ids) == sorted(want_ids) and np.allclose(got_scores, want_scores, atol=ATOL, rtol=0):
            return "tie_reorder"  # equal scores within ATOL listed in another order
        return "mismatch"


def soak(url_http: str, url_grpc: str, pool: list[list[str]], reference: Reference, clients: int, seconds: float,
         malformed_every: int, k: int, seed: int) -> dict:
    from triton_models.client import RecommenderClient

    lock = threading.Lock()
    counts = collections.Counter()
    statuses = collections.Counter()
    errors, mismatches, latencies = [], [], []
    deadline = time.monotonic() + seconds

    def worker(c: int) -> None:
        protocol = "grpc" if c % 2 else "http"
        url = url_grpc if protocol == "grpc" else url_http
        rng = random.Random(seed * 1000 + c)
        local = collections.Counter()
        lat = []
        with RecommenderClient(url, protocol) as client:
            j = 0
            while time.monotonic() < deadline:
                j += 1
                if j % malformed_every == 0:
                    kind = MALFORMED[(j // malformed_every + c) % len(MALFORMED)]
                    status = send_malformed(protocol, url, kind)
                    local["malformed"] += 1
                    local["malformed_rejected" if status is not None else "malformed_answered"] += 1
                    with lock:
                        statuses[f"{kind}: {status}"] += 1
                    continue
                batch = [pool[rng.randrange(len(pool))] for _ in range(rng.choice((1, 1, 1, 2, 3)))]
                t = time.perf_counter()
                try:
                    answers = client.recommend(batch, k)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    local["wellformed_errors"] += 1
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                lat.append(time.perf_counter() - t)
                local["wellformed_requests"] += 1
                for session, answer in zip(batch, answers):
                    verdict = reference.judge(session, answer)
                    local[f"sessions_{verdict}"] += 1
                    if verdict == "mismatch" and len(mismatches) < 5:
                        with lock:
                            mismatches.append({"session": session, "served": answer[:5]})
                if len(answers) != len(batch):
                    local["wrong_number_of_answers"] += 1
        with lock:
            counts.update(local)
            latencies.extend(lat)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {key: int(counts.get(key, 0)) for key in (
        "wellformed_requests", "wellformed_errors", "sessions_match", "sessions_tie_reorder", "sessions_mismatch",
        "wrong_number_of_answers", "malformed", "malformed_rejected", "malformed_answered")}
    out.update({"seconds": round(wall, 1), "clients": clients, "malformed_every": malformed_every,
                "wellformed_req_per_s": round(out["wellformed_requests"] / wall, 1),
                "latency": percentiles(latencies) if latencies else {},
                "malformed_statuses": dict(sorted(statuses.items())),
                "error_examples": errors[:3], "mismatch_examples": mismatches})
    return out


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "fashion"), help="prepared DIR (default data/fashion)")
    p.add_argument("--run", default=None, help="trained RUN (default: an untrained odmt model)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--malformed-every", type=int, default=10, help="every n-th request of a client is malformed")
    p.add_argument("--sessions", type=int, default=1000, help="test-split sessions in the request pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    from triton_models.client import RecommenderClient
    from triton_models.checks import example_sessions
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="odmt-soak-"))
    load_before = load_average()
    try:
        data = ensure_data(Path(args.data).resolve())
        trained = args.run is not None
        run = Path(args.run).resolve() if trained else untrained_run(data, work / "untrained-odmt")
        sessions = example_sessions(data, args.sessions, seed=args.seed + 3)
        known = sorted({i for s in sessions for i in s})
        pool = sessions + [["never-seen"], ["never-seen", known[0]], [known[1], "", "日本語"]]
        print(f"[soak] in-process reference answers for {len(pool)} sessions", file=sys.stderr, flush=True)
        reference = Reference(run, data, pool, args.k)
        manifest = export(run, work / "repo", ServingConfig(k=args.k), data_dir=data, check_sessions=20,
                          log=lambda m: None)
        with TritonServer(work / "repo", log_file=work / "tritonserver.log") as server:
            with RecommenderClient(server.http_url) as client:  # warm up: a few of every request shape
                for s in pool[:50]:
                    client.recommend([s], args.k)
            pgid = server.process.pid
            rss_before = group_rss_mb(pgid)
            peak = [rss_before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    peak[0] = max(peak[0], group_rss_mb(pgid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            print(f"[soak] {args.clients} clients for {args.seconds:g} s, 1 request in {args.malformed_every} "
                  "malformed", file=sys.stderr, flush=True)
            result = soak(server.http_url, server.grpc_url, pool, reference, args.clients, args.seconds,
                          args.malformed_every, args.k, args.seed)
            stop.set()
            sampler.join()
            rss_after = group_rss_mb(pgid)
            with RecommenderClient(server.grpc_url, "grpc") as client:
                still_serving = reference.judge(pool[0], client.recommend([pool[0]], args.k)[0]) != "mismatch"
            server_errors = server.log_errors(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        "benchmark": "soak",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average()},
        "data": str(data), "trained": trained, "model": manifest["model"], "n_items": manifest["n_items"],
        "k": args.k, "transform": manifest["transform"], "pool_sessions": len(pool),
        "server_rss_mb": {"after_warmup": rss_before, "end": rss_after, "peak": peak[0],
                          "growth": round(rss_after - rss_before, 1)},
        "still_serving_after": still_serving,
        "server_error_lines": server_errors.splitlines()[-5:],
        **result,
    }
    print(report(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


def report(s: dict) -> str:
    sessions = s["sessions_match"] + s["sessions_tie_reorder"] + s["sessions_mismatch"]
    lat = s["latency"]
    rss = s["server_rss_mb"]
    return "\n".join([
        f"soak: {s['model']} ({'trained' if s['trained'] else 'untrained'}), {s['n_items']} items, k={s['k']}, "
        f"{s['clients']} clients, {s['seconds']} s, load average {s['machine']['load_average_before']} before / "
        f"{s['machine']['load_average_after']} after",
        f"well-formed: {s['wellformed_requests']} requests ({s['wellformed_req_per_s']} req/s, p50 "
        f"{lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms), {s['wellformed_errors']} errors; {sessions} sessions: "
        f"{s['sessions_match']} identical to the in-process model, {s['sessions_tie_reorder']} tie reorders, "
        f"{s['sessions_mismatch']} mismatches; {s['wrong_number_of_answers']} answers with a wrong session count",
        f"malformed: {s['malformed']} requests, {s['malformed_rejected']} rejected, {s['malformed_answered']} answered",
        f"server RSS: {rss['after_warmup']} MB after warm-up, {rss['end']} MB at the end (peak {rss['peak']} MB, "
        f"growth {rss['growth']} MB); still serving: {s['still_serving_after']}",
    ])


if __name__ == "__main__":
    sys.exit(main())
