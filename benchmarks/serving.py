"""Serving benchmark: the exported ensemble on a real Triton server (CPU) against the in-process model.

    .venv/bin/python benchmarks/serving.py [--data DIR] [--run RUN] [--requests 500] [--per-client 250]

For each request transform (fast, workflow) it exports DIR/RUN to a temporary model repository, starts
`tritonserver` on it and measures, over HTTP and gRPC, one session per request (sessions from the
test split, raw item IDs):
  * latency p50/p90/p99 at concurrency 1 (one client, back-to-back requests);
  * throughput at concurrency 8 (8 client threads, each its own connection, closed loop) with its
    latency percentiles, errors, and how many requests Triton's dynamic batcher merged per execution;
and, in the same run, the in-process model call (`model.recommend` on the encoded history, batch 1,
1 thread, eager and with the encoders traced as served): the serving overhead column is served p50 /
eager in-process p50.

DIR defaults to data/fashion (prepared with `odmt prepare --source fashion` if missing). Without
--run an UNTRAINED odmt model is built for DIR: fine for latency (same architecture and shapes), the
recommendations themselves are meaningless; the output says so. The load generator runs on the same
2-core machine as the server; its CPU time, the server's (tritonserver + stubs) CPU time at concurrency
8 (requests per server CPU-second: a load-independent efficiency figure) and the load average
before/after are recorded.
Prints a table and writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
RESULTS = Path(__file__).parent / "results" / "serving.json"
GOALS = {"fast_p50_ms": 3.0, "fast_p99_ms": 6.0, "fast_c8_req_per_s": 800.0, "workflow_p99_ms": 20.0}


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def well_formed(answer, k: int) -> bool:
    return len(answer) == 1 and len(answer[0]) == k and all(
        a[1] >= b[1] for a, b in zip(answer[0], answer[0][1:]))


def concurrency_1(url: str, protocol: str, sessions: list, n: int, k: int) -> dict:
    from triton_models.client import RecommenderClient

    with RecommenderClient(url, protocol) as client:
        for s in sessions[:20]:  # warm up connections and the model
            client.recommend([s], k)
        lat, bad = [], 0
        for i in range(n):
            t = time.perf_counter()
            answer = client.recommend([sessions[i % len(sessions)]], k)
            lat.append(time.perf_counter() - t)
            bad += not well_formed(answer, k)
    return {**percentiles(lat), "requests": n, "malformed": bad}


def concurrency_n(url: str, protocol: str, sessions: list, clients: int, per_client: int, k: int) -> dict:
    from triton_models.client import RecommenderClient

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    malformed = [0]
    start = threading.Barrier(clients + 1)

    def worker(c: int) -> None:
        with RecommenderClient(url, protocol) as client:
            client.recommend([sessions[c]], k)  # connect before the clock starts
            start.wait()
            for j in range(per_client):
                s = sessions[(c * per_client + j) % len(sessions)]
                t = time.perf_counter()
                try:
                    answer = client.recommend([s], k)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                lat[c].append(time.perf_counter() - t)
                malformed[0] += not well_formed(answer, k)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    done = [x for c in lat for x in c]
    return {"clients": clients, "requests": clients * per_client, "ok": len(done), "errors": len(errors),
            "error_examples": errors[:3], "malformed": malformed[0], "seconds": round(wall, 3),
            "req_per_s": round(len(done) / wall, 1), **percentiles(done),
            "load_generator_cpu_s": round(cpu, 2)}


def group_cpu_seconds(pgid: int) -> float:
    """user + system CPU seconds of the live processes of a process group (tritonserver and its stubs)."""
    from triton_models.server import group_pids

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_pids(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def batching_stats(url: str) -> dict:
    """Triton's cumulative counters for the executor: inferences (requests) vs executions (batches)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("executor_model")["model_stats"][0]
    finally:
        client.close()
    return {"inferences": int(stats["inference_count"]), "executions": int(stats["execution_count"])}


def in_process(run: Path, data: Path, sessions: list, n: int, k: int) -> dict:
    """model.recommend at batch 1 on encoded histories, 1 thread: eager (what a Python caller pays),
    then with the sequence encoders traced as the served operator runs them."""
    import pandas as pd
    import torch

    from odmt_t4r.model import OdmtRecommender
    from triton_models.graph import load_inference_workflow

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    workflow = load_inference_workflow(data)
    col = workflow.input_schema.column_names[0]
    encoded = workflow.transform(pd.DataFrame({col: [list(s) for s in sessions]}))[col]
    L = model.config.max_length
    hists = []
    for v in encoded:
        h = np.zeros((1, L), dtype=np.int64)
        v = np.asarray(v)[-L:]
        h[0, : len(v)] = v
        hists.append(torch.from_numpy(h))
    def timed() -> list[float]:
        lat = []
        with torch.inference_mode():
            for h in hists[:20]:
                model.recommend(h, k)
            for i in range(n):
                t = time.perf_counter()
                model.recommend(hists[i % len(hists)], k)
                lat.append(time.perf_counter() - t)
        return lat

    eager = timed()
    from triton_models.predict import trace_sequence_encoders

    status = trace_sequence_encoders(model)  # what the served OdmtPredict runs
    traced = timed()
    t = time.perf_counter()
    for s in sessions[:100]:  # the request transform a Python caller would also run
        workflow.transform(pd.DataFrame({col: [list(s)]}))
    transform_ms = (time.perf_counter() - t) / min(100, len(sessions)) * 1e3
    return {"model_recommend": {**percentiles(eager), "requests": n},
            "model_recommend_traced": {**percentiles(traced), "requests": n, "encoders": status},
            "workflow_transform_mean_ms": round(transform_ms, 3)}


def ensure_data(data: Path) -> Path:
    if (data / "manifest.json").is_file():
        return data
    from odmt_t4r.prepare import PrepareConfig, prepare

    print(f"[bench] {data} is not prepared: running `odmt prepare --source fashion --out {data}`", flush=True)
    prepare(PrepareConfig(source="fashion", out=str(data)))
    return data


def untrained_run(data: Path, out: Path) -> Path:
    import torch

    from odmt_t4r.model import build_model

    torch.manual_seed(0)
    build_model("odmt", data).save_pretrained(out, extra={"data": {"dir": str(data)}, "untrained": True})
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "fashion"), help="prepared DIR (default data/fashion)")
    p.add_argument("--run", default=None, help="trained RUN (default: an untrained odmt model, latency only)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=500, help="requests per concurrency-1 measurement")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=250, help="requests per client at concurrency 8")
    p.add_argument("--transforms", nargs="+", default=["fast", "workflow"])
    p.add_argument("--protocols", nargs="+", default=["http", "grpc"])
    p.add_argument("--instances", type=int, default=None, help="executor instances (default: export's)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from triton_models.checks import example_sessions
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="odmt-serving-bench-"))
    load_before = load_average()
    try:
        data = ensure_data(Path(args.data).resolve())
        trained = args.run is not None
        run = Path(args.run).resolve() if trained else untrained_run(data, work / "untrained-odmt")
        if not trained:
            print("[bench] no --run given: built an UNTRAINED odmt model for latency only "
                  "(same architecture and shapes; its recommendations are meaningless)", flush=True)
        sessions = example_sessions(data, 1000, seed=1)
        model_cfg = json.loads((run / "config.json").read_text())["model"]
        result = {
            "benchmark": "serving",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_average_before": load_before},
            "data": str(data), "run": str(run) if trained else None, "trained": trained,
            "model": {k: model_cfg.get(k) for k in ("name", "modalities", "d_model", "seq_layers", "imt_layers",
                                                    "max_length", "n_index")},
            "k": args.k,
            "sessions": {"source": "test split histories", "count": len(sessions),
                         "mean_length": round(float(np.mean([len(s) for s in sessions])), 2)},
        }
        print(f"[bench] in-process model ({model_cfg.get('name')}, {model_cfg.get('n_index', 0) - 3} items)", flush=True)
        result["in_process"] = in_process(run, data, sessions, args.requests, args.k)
        result["served"] = {}
        for transform in args.transforms:
            cfg = ServingConfig(k=args.k, transform=transform)
            if args.instances:
                cfg.instances = args.instances
            repo = work / f"repo-{transform}"
            manifest = export(run, repo, cfg, data_dir=data, check_sessions=20, log=lambda m: None)
            entry = {"serving_config": manifest["serving"], "encoders": manifest["check"]["sequence_encoders"]}
            with TritonServer(repo, log_file=work / f"tritonserver-{transform}.log") as server:
                for protocol in args.protocols:
                    url = server.http_url if protocol == "http" else server.grpc_url
                    print(f"[bench] {transform} / {protocol}: concurrency 1", flush=True)
                    c1 = concurrency_1(url, protocol, sessions, args.requests, args.k)
                    before = batching_stats(server.http_url)
                    print(f"[bench] {transform} / {protocol}: concurrency {args.clients}", flush=True)
                    server_cpu = group_cpu_seconds(server.process.pid)
                    cn = concurrency_n(url, protocol, sessions, args.clients, args.per_client, args.k)
                    server_cpu = group_cpu_seconds(server.process.pid) - server_cpu
                    after = batching_stats(server.http_url)
                    cn["server_cpu_s"] = round(server_cpu, 2)
                    cn["req_per_server_cpu_s"] = round(cn["ok"] / max(server_cpu, 1e-9), 1)
                    executions = after["executions"] - before["executions"]
                    cn["requests_per_execution"] = round((after["inferences"] - before["inferences"]) / max(executions, 1), 2)
                    entry[protocol] = {"concurrency_1": c1, f"concurrency_{args.clients}": cn,
                                       "overhead_vs_in_process_p50": round(
                                           c1["p50_ms"] / result["in_process"]["model_recommend"]["p50_ms"], 2)}
            result["served"][transform] = entry
        result["machine"]["load_average_after"] = load_average()
        result["goals"] = goal_check(result, args.clients)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(table(result, args.clients))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def goal_check(result: dict, clients: int) -> dict:
    """{path_protocol: {metric: {value, goal, met}}} for the issue's goals."""
    def entry(value, goal, higher_is_better=False):
        return {"value": value, "goal": goal, "met": value >= goal if higher_is_better else value <= goal}

    served, out = result["served"], {}
    for protocol in ("http", "grpc"):
        fast = served.get("fast", {}).get(protocol)
        if fast:
            c1, cn = fast["concurrency_1"], fast[f"concurrency_{clients}"]
            out[f"fast_{protocol}"] = {"c1_p50_ms": entry(c1["p50_ms"], GOALS["fast_p50_ms"]),
                                       "c1_p99_ms": entry(c1["p99_ms"], GOALS["fast_p99_ms"]),
                                       f"c{clients}_req_per_s": entry(cn["req_per_s"], GOALS["fast_c8_req_per_s"], True)}
        wf = served.get("workflow", {}).get(protocol)
        if wf:
            out[f"workflow_{protocol}"] = {"c1_p99_ms": entry(wf["concurrency_1"]["p99_ms"], GOALS["workflow_p99_ms"])}
    return out


def table(result: dict, clients: int) -> str:
    m = result["machine"]
    ip = result["in_process"]["model_recommend"]
    lines = [
        f"serving benchmark: {result['model']['name']} ({'trained' if result['trained'] else 'UNTRAINED, latency only'}), "
        f"{result['model']['n_index'] - 3} items, k={result['k']}, {m['cpus']} CPUs, "
        f"load average {m['load_average_before']} before / {m['load_average_after']} after",
        f"in-process model.recommend (batch 1, 1 thread): eager p50 {ip['p50_ms']:.2f} ms  p99 {ip['p99_ms']:.2f} ms; "
        f"traced encoders (as served) p50 {result['in_process']['model_recommend_traced']['p50_ms']:.2f} ms; "
        f"Workflow.transform of one session {result['in_process']['workflow_transform_mean_ms']:.2f} ms",
        f"{'transform':<9} {'proto':<5} | {'c=1 p50':>8} {'p90':>7} {'p99':>7} {'x model':>7} | "
        f"{'c=' + str(clients) + ' req/s':>10} {'p50':>7} {'p99':>7} {'req/exec':>8} {'req/srvCPUs':>11} "
        f"{'errors':>6}",
    ]
    for transform, entry in result["served"].items():
        for protocol in ("http", "grpc"):
            if protocol not in entry:
                continue
            c1, cn = entry[protocol]["concurrency_1"], entry[protocol][f"concurrency_{clients}"]
            lines.append(f"{transform:<9} {protocol:<5} | {c1['p50_ms']:>8.2f} {c1['p90_ms']:>7.2f} {c1['p99_ms']:>7.2f} "
                         f"{entry[protocol]['overhead_vs_in_process_p50']:>7.2f} | {cn['req_per_s']:>10.0f} "
                         f"{cn['p50_ms']:>7.2f} {cn['p99_ms']:>7.2f} {cn['requests_per_execution']:>8.2f} "
                         f"{cn['req_per_server_cpu_s']:>11.0f} {cn['errors']:>6}")
    for name, goals in result["goals"].items():
        parts = [f"{metric} {g['value']} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}"
                 for metric, g in goals.items()]
        lines.append(f"goals {name}: " + "; ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
