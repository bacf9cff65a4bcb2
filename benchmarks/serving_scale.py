"""Serving at catalog scale: 3,000 to 10^6 items through the real Triton server, exact vs HNSW retrieval.

    .venv/bin/python benchmarks/serving_scale.py [--sizes 3000 10000 100000 1000000] [--requests 300]
                                                 [--clients 8] [--per-client 100] [--work benchmarks/work/scale]
    .venv/bin/python benchmarks/serving_scale.py --only-rules --sizes 10000 1000000 --baseline-ref REF

For each catalog size N it builds (and keeps in --work, for the next run):
  * a prepared DIR (`odmt prepare --source csv`) of N items and 2,000 users with random sessions;
  * a RUN: an untrained 3-branch odmt model (d_model 64 per branch: the trained size, 192 + 1 prior
    dims fused) whose item vectors are synthetic with the shape of trained ones: per branch a Gaussian
    with a power-law spectrum (90% of the variance in about 7 of 64 dims; the trained fashion runs put
    90% of their 192-dim variance in 11-22 dims) and a median norm of 1 (as trained). Random sessions make
    the popularity prior nearly flat, so the ranking rests on the vectors: no easy popular head.
and measures
  * in-process search (model.recommend, batch 1, 1 thread): exact blocked scan vs HNSW, p50/p99;
  * served (export with the RUN's default retrieval, `auto`): p50/p99 at concurrency 1, requests/s at
    concurrency 8 (HTTP and gRPC, one session per request, the fast transform), as benchmarks/serving.py does;
  * recall@10 of the served answers against the exact top-k (history excluded) on --recall-sessions sessions;
  * at the largest N: peak RSS of full-catalog evaluation (training/streaming.py: the per-epoch fusion grid
    and evaluate_model on one batch of 512 users; the peak is per batch) in a fresh process;
  * business rules (`rules`, at sizes >= 10,000; `--only-rules` measures nothing else): one server, requests
    interleaved at concurrency 1 over HTTP: no rule, a 1% include list and a 50% exclude list (random catalog
    items, the same list on every request, as raw IDs); each case's p50/p99 and p99 over the unfiltered p99
    of the same run; recall@10 of the served filtered answers against the exact filtered top-k. The rule's
    input is encoded once per case (its client-side cost is reported apart: a Python client pays it per
    request unless it keeps the encoded list). With `--baseline-ref REF`, a repository exported by the code
    at git REF (a worktree in --work) is served beside it and its requests interleaved too: the no-rule
    overhead of this code against REF's, in the same run. `availability_50pct`: the 50% exclude list's items
    made unavailable in a copy of the repository (`odmt availability`), served by a second server whose
    requests carry no list and are interleaved with the others.
Prints a table and writes benchmarks/results/serving_scale.json. The load generator shares the 2 cores
with the server; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.serving import concurrency_1, concurrency_n, load_average, percentiles  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serving_scale.json"
RESULTS_RULES = Path(__file__).parent / "results" / "serving_scale_rules.json"  # --only-rules
GOALS = {"p50_ms": 5.0, "p99_ms": 10.0, "recall_at_10": 0.99, "small_p50_ms": 2.0, "eval_peak_rss_gb": 4.0,
         "rules_p99_ratio": 2.0, "no_rule_overhead": 1.05}
USERS, SESSION_LENGTH, D_MODEL, BRANCHES = 2_000, 12, 64, ("id", "text", "image")
EF_SWEEP = (64, 128, 256, 512, 1024)


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


# -- the synthetic catalog ---------------------------------------------------------------------------

def synthetic_dir(work: Path, n_items: int, seed: int = 0, categories: int = 0) -> Path:
    """A prepared DIR of `n_items` items (IDs only) and USERS users with uniformly random sessions; with
    `categories`, the catalog has a `category` attribute, item j in category c{j % categories} (the same
    items, vocabulary and sessions: the same synthetic RUN and HNSW index)."""
    import pandas as pd

    from odmt_t4r.prepare import PrepareConfig, prepare

    suffix = f"-cat{categories}" if categories else ""
    out = work / f"data-{n_items}{suffix}"
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    src = work / f"src-{n_items}{suffix}"
    src.mkdir(parents=True, exist_ok=True)
    items = [f"i{j}" for j in range(n_items)]
    catalog = pd.DataFrame({"item_id": items})
    if categories:
        catalog["category"] = [f"c{j % categories}" for j in range(n_items)]
    catalog.to_csv(src / "items.csv", index=False)
    picks = rng.integers(n_items, size=USERS * SESSION_LENGTH)
    pd.DataFrame({"user_id": np.repeat(np.arange(USERS), SESSION_LENGTH),
                  "item_id": [items[p] for p in picks],
                  "timestamp": np.tile(np.arange(SESSION_LENGTH), USERS)}).to_csv(src / "interactions.csv", index=False)
    log(f"preparing {out} ({n_items:,} items)")
    prepare(PrepareConfig(source="csv", interactions=str(src / "interactions.csv"), items=str(src / "items.csv"),
                          out=str(out)))
    return out


def synthetic_vectors(n_index: int, seed: int = 0, width: int = D_MODEL) -> dict:
    """{branch: [n_index width]} float32, trained-like: power-law spectrum (variance of the i-th principal
    direction ~ 1/i^2), a random rotation, median norm 1."""
    import torch

    rng = np.random.default_rng(seed)
    scale = np.arange(1, width + 1, dtype=np.float64) ** -1.0  # std ~ 1/i
    out = {}
    for b in BRANCHES:
        rotation = np.linalg.qr(rng.standard_normal((width, width)))[0]
        v = np.empty((n_index, width), dtype=np.float32)
        for s in range(0, n_index, 262_144):  # in chunks: float64 temporaries stay small
            z = rng.standard_normal((min(n_index, s + 262_144) - s, width)) * scale
            v[s:s + len(z)] = z @ rotation.T
        v /= np.median(np.linalg.norm(v[:100_000], axis=1))
        out[b] = torch.from_numpy(v)
    return out


def synthetic_run(data: Path, out: Path) -> Path:
    """An untrained odmt RUN whose catalog is `synthetic_vectors` (saved as its item vectors)."""
    import pandas as pd
    import torch

    from odmt_t4r.model import OdmtConfig, OdmtRecommender
    from odmt_t4r.model.prepared import read_prepared

    if (out / "item_vectors.pt").is_file():
        return out
    info = read_prepared(data)
    torch.manual_seed(0)
    config = OdmtConfig(name="odmt", n_index=info.n_index, max_length=info.max_length, item_column=info.item_column,
                        modalities=list(BRANCHES), feature_dims={"text": 384, "image": 1280},
                        item_tower="independent", d_model=D_MODEL, loss="in_batch")
    model = OdmtRecommender(config).eval()
    items = pd.read_parquet(data / "items.parquet", columns=["item_idx", "train_count"])
    counts = torch.zeros(info.n_index, dtype=torch.float64)
    counts[torch.from_numpy(items["item_idx"].to_numpy())] = torch.from_numpy(items["train_count"].to_numpy()).double()
    model.set_popularity(counts)
    model._catalog, model._frozen_catalog = synthetic_vectors(info.n_index), True  # no features: vectors only
    model.save_pretrained(out, extra={"data": {"dir": str(data)}, "untrained": True,
                                      "synthetic_catalog": "benchmarks/serving_scale.py synthetic_vectors"})
    return out


# -- measurements ------------------------------------------------------------------------------------

def encoded_histories(data: Path, sessions: list, max_length: int):
    import torch

    from odmt_t4r.contract import catalog_item_ids, last_items

    index = {raw: i for i, raw in enumerate(catalog_item_ids(data)) if raw}
    values = np.array([index[i] for s in sessions for i in s], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sessions])])
    return torch.from_numpy(last_items(values, offsets, max_length))


def in_process(run: Path, data: Path, sessions: list, n: int, k: int, kinds: list[str]) -> dict:
    """Batch 1, 1 thread, encoders traced as served: the search alone (`FusedRetriever.top_k` on the
    session's query) per retrieval kind and the whole `model.recommend`; "full" is the [1 N] score matrix
    + topk that `recommend` ran before retrieval.py (the small-catalog regression check)."""
    import torch

    from odmt_t4r.model import OdmtRecommender
    from triton_models.predict import trace_sequence_encoders

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    trace_sequence_encoders(model)
    hist = [h[None] for h in encoded_histories(data, sessions, model.config.max_length)]

    def full_matrix(i):
        s = model.score(hist[i])["fused"].clone()
        s.scatter_(1, hist[i], float("-inf"))
        return torch.topk(s, k, dim=-1)

    def timed(fn) -> dict:
        """fn(i) on session i: latency percentiles over n calls after 5 warm-up calls."""
        lat = []
        with torch.inference_mode():
            for i in range(5):
                fn(i)
            for j in range(n):
                t = time.perf_counter()
                fn(j % len(hist))
                lat.append(time.perf_counter() - t)
        return {**percentiles(lat), "requests": n}

    out, exact = {}, None
    for kind in kinds:
        t0 = time.perf_counter()
        model.set_retrieval({"index": kind})
        retriever = model.retriever()
        load_s = time.perf_counter() - t0
        with torch.inference_mode():
            queries = [retriever.queries(model.session_states(h)) for h in hist[:n]]
        search = timed(lambda i: retriever.top_k(*queries[i], hist[i], k))
        out[kind] = {"search": search, "recommend": timed(lambda i: model.recommend(hist[i], k)), "load_s": round(load_s, 1)}
        if kind == "exact":
            exact = [set(retriever.top_k(*queries[i], hist[i], k)[1][0].tolist()) for i in range(n)]
        elif exact is not None:  # the recall / latency curve the default hnsw_ef_search is chosen from
            default_ef, out[kind]["ef_sweep"] = retriever.config.hnsw_ef_search, []
            for ef in EF_SWEEP:
                retriever.config.hnsw_ef_search = ef
                found = [set(retriever.top_k(*queries[i], hist[i], k)[1][0].tolist()) for i in range(n)]
                recall = float(np.mean([len(f & e) / len(e) for f, e in zip(found, exact)]))
                out[kind]["ef_sweep"].append({"ef_search": ef, "recall_at_10": round(recall, 4),
                                              "search": timed(lambda i: retriever.top_k(*queries[i], hist[i], k))})
            retriever.config.hnsw_ef_search = default_ef
    if "exact" in kinds and model.config.n_index <= 200_000:
        out["full"] = {"recommend": timed(full_matrix)}
    return out


def exact_top_k(run: Path, data: Path, sessions: list, k: int) -> list[list[str]]:
    """The exact answers (blocked scan, history excluded) in raw IDs."""
    import torch

    from odmt_t4r.contract import catalog_item_ids
    from odmt_t4r.model import OdmtRecommender

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    model.set_retrieval({"index": "exact"})
    ids = catalog_item_ids(data)
    with torch.inference_mode():
        scores, idx = model.recommend(encoded_histories(data, sessions, model.config.max_length), k)
    return [[ids[i] for i, s in zip(row, srow) if np.isfinite(s)] for row, srow in zip(idx.tolist(), scores.tolist())]


def served(run: Path, data: Path, work: Path, sessions: list, args) -> dict:
    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    repo = work / "repo"
    t0 = time.perf_counter()
    manifest = export(run, repo, ServingConfig(k=args.k), data_dir=data, check_sessions=20, log=lambda m: None,
                      force=True)
    export_s = time.perf_counter() - t0
    gc.collect()
    entry = {"export_s": round(export_s, 1), "check": manifest["check"]}
    t0 = time.perf_counter()
    with TritonServer(repo, log_file=work / "tritonserver.log", timeout=3600) as server:
        entry["server_ready_s"] = round(time.perf_counter() - t0, 1)
        for protocol in args.protocols:
            url = server.http_url if protocol == "http" else server.grpc_url
            log(f"  served over {protocol}: concurrency 1, then {args.clients}")
            entry[protocol] = {"concurrency_1": concurrency_1(url, protocol, sessions, args.requests, args.k),
                               f"concurrency_{args.clients}": concurrency_n(url, protocol, sessions, args.clients,
                                                                            args.per_client, args.k)}
        recall_sessions = sessions[: args.recall_sessions]
        with RecommenderClient(server.grpc_url, "grpc") as client:
            answers = [[i for i, _ in a] for c in range(0, len(recall_sessions), 50)
                       for a in client.recommend(recall_sessions[c:c + 50], args.k)]
    exact = exact_top_k(run, data, recall_sessions, args.k)
    hits = [len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(answers, exact)]
    entry["recall_at_10"] = round(float(np.mean(hits)), 4)
    entry["recall_sessions"] = len(hits)
    entry["sessions_with_every_item_found"] = int(sum(h == 1.0 for h in hits))
    return entry


# -- business rules ----------------------------------------------------------------------------------

RULE_CASES = {"include_1pct": ("include_ids", 0.01), "exclude_50pct": ("exclude_ids", 0.5),
              "category_10pct": ("filter", 0.1),
              # exclude_50pct's items made unavailable in the repository (odmt availability): no list on the wire
              "availability_50pct": ("availability", 0.5)}
CATEGORIES = 10  # the rules DIR's category attribute: item j in c{j % 10}
CATEGORY_FILTER = {"category": ["c3"]}  # 10% of the catalog


def rule_ids(data: Path, cases, seed: int = 0) -> dict[str, list[str]]:
    """{case: raw IDs}: random catalog items, `RULE_CASES`' fraction of the catalog each; a filter case: [its
    JSON text]."""
    from odmt_t4r.contract import catalog_item_ids

    ids = [i for i in catalog_item_ids(data) if i]
    rng = np.random.default_rng(seed)
    out, drawn = {}, {}
    for case, (name, frac) in RULE_CASES.items():
        if name == "availability":  # the very items of the 50% exclude list, held by the server instead
            drawn[case] = drawn["exclude_50pct"]
        else:
            drawn[case] = np.sort(rng.choice(len(ids), max(1, int(frac * len(ids))), replace=False))  # as before
        if case in cases:
            out[case] = [json.dumps(CATEGORY_FILTER)] if name == "filter" else [ids[j] for j in drawn[case]]
    return out


def rule_of(data: Path, case: str, raw: list[str]):
    """The in-process ItemRules of a case: its IDs as index rows, or the filter's mask (plain pandas)."""
    import torch

    from odmt_t4r.contract import catalog_item_ids
    from odmt_t4r.data.attributes import run_attributes
    from odmt_t4r.model.retrieval import ItemRules
    from triton_models.checks import reference_filter_mask

    name = RULE_CASES[case][0]
    if name == "filter":
        return ItemRules(allow=torch.from_numpy(reference_filter_mask(run_attributes(_run_of(data), data), raw[0])))
    index = {v: i for i, v in enumerate(catalog_item_ids(data)) if v}
    key = "exclude" if name == "availability" else name.split("_")[0]
    return ItemRules(**{key: torch.tensor([index[i] for i in raw])})


def _run_of(data: Path) -> Path:
    return data.parent / data.name.replace("data-", "run-", 1)


def baseline_repo(ref: str, run: Path, data: Path, work: Path, k: int) -> tuple[Path, str, Path]:
    """(a repository exported by the code at git `ref`, its commit, the worktree): a worktree of `ref` in `work`
    exports it, and its executor imports that code (the venv's editable install points at this checkout)."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree, repo = work / f"baseline-{sha[:10]}", work / f"baseline-{sha[:10]}-repo"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    code = ("import sys; from triton_models.export import ServingConfig, export; "
            f"export({str(run)!r}, {str(repo)!r}, ServingConfig(k={k}), data_dir={str(data)!r}, check_sessions=20, "
            "log=lambda m: None, force=True)")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # before site-packages' editable finder
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True)
    model_py = repo / "executor_model" / "1" / "model.py"
    future = "from __future__ import annotations\n"  # must stay first; the graph is unpickled later, in initialize
    model_py.write_text(model_py.read_text().replace(future, f"{future}import sys\nsys.path.insert(0, {str(tree)!r})\n", 1))
    return repo, sha, tree


def _rule_input(name: str, ids: list[str]):
    import tritonclient.http as httpclient

    array = np.array([[i.encode("utf-8") for i in ids]], dtype=np.object_)
    tensor = httpclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def _session_inputs(session: list[str]):
    import tritonclient.http as httpclient

    from triton_models.client import encode_sessions

    out = []
    for name, array, dtype in zip(("item_id-list__values", "item_id-list__offsets"), encode_sessions([session]),
                                  ("BYTES", "INT32")):
        tensor = httpclient.InferInput(name, [1, *array.shape], dtype)
        tensor.set_data_from_numpy(array[None], binary_data=True)
        out.append(tensor)
    return out


def interleaved(urls: dict[str, str], cases: dict[str, list], sessions: list, n: int) -> dict:
    """{case: latency percentiles}: case = (server, rule inputs); each round sends one request per case, in
    a shuffled order, one session each, at concurrency 1."""
    import tritonclient.http as httpclient

    clients = {name: httpclient.InferenceServerClient(url, network_timeout=300) for name, url in urls.items()}
    outputs = [httpclient.InferRequestedOutput(o, binary_data=True) for o in ("item_ids", "scores")]
    inputs = [_session_inputs(s) for s in sessions[: min(n, len(sessions))]]
    lat = {case: [] for case in cases}
    rng = np.random.default_rng(0)
    try:
        for j in range(n + 10):
            for case in rng.permutation(list(cases)):
                server, rule = cases[case]
                t = time.perf_counter()
                clients[server].infer("executor_model", inputs[j % len(inputs)] + rule, outputs=outputs)
                if j >= 10:  # the first rounds warm up connections and caches
                    lat[case].append(time.perf_counter() - t)
    finally:
        for client in clients.values():
            client.close()
    return {case: {**percentiles(v), "requests": len(v)} for case, v in lat.items()}


def filtered_recall(run: Path, data: Path, urls: dict[str, str], sessions: list, lists: dict, k: int) -> dict:
    """{case: recall@10 of the served answers under the rule against the exact filtered top-k}; `urls`: the
    server of each case."""
    import torch

    from odmt_t4r.contract import catalog_item_ids
    from odmt_t4r.model import OdmtRecommender
    from triton_models.client import RecommenderClient

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    model.set_retrieval({"index": "exact"})
    ids = catalog_item_ids(data)
    hist = encoded_histories(data, sessions, model.config.max_length)
    out = {}
    for case in lists:
        name = RULE_CASES[case][0]
        rule = rule_of(data, case, lists[case])
        given = {} if name == "availability" else {"filter": lists[case][0]} if name == "filter" else \
            {name.split("_")[0]: lists[case]}
        with RecommenderClient(urls[case]) as client:
            served_, hits = [], []
            for c in range(0, len(sessions), 50):
                served_ += client.recommend(sessions[c:c + 50], k, **given)
                with torch.inference_mode():
                    scores, idx = model.recommend(hist[c:c + 50], k, rules=rule)
                for answer, row, srow in zip(served_[c:], idx.tolist(), scores.tolist()):
                    exact = {ids[i] for i, x in zip(row, srow) if np.isfinite(x)}
                    hits.append(len({i for i, _ in answer} & exact) / max(1, len(exact)))
            out[case] = {"recall_at_10": round(float(np.mean(hits)), 4), "sessions": len(hits),
                         "short_answers": int(sum(len(a) < k for a in served_))}
    return out


def rules_benchmark(run: Path, data: Path, work: Path, sessions: list, args) -> dict:
    """The business-rule cases at one catalog size (see the module docstring)."""
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    lists = rule_ids(data, args.rule_cases)
    repo = work / "repo"
    export(run, repo, ServingConfig(k=args.k), data_dir=data, check_sessions=20, log=lambda m: None, force=True)
    entry = {"lists": {case: len(v) for case, v in lists.items()}}
    for case in lists:
        if RULE_CASES[case][0] == "filter":  # the items it allows
            entry["lists"][case] = int(rule_of(data, case, lists[case]).allow.sum())
            entry.setdefault("filters", {})[case] = lists[case][0]
    rule_inputs = {}
    for case in lists:
        name = RULE_CASES[case][0]
        if name == "availability":
            continue  # nothing on the wire
        t = time.perf_counter()
        rule_inputs[case] = [_rule_input(name, lists[case])]
        entry.setdefault("client_encode_ms", {})[case] = round(1e3 * (time.perf_counter() - t), 1)
    entry["in_process_ms"] = rules_in_process(run, data, sessions[:20], lists, args.k)
    available = [case for case in lists if RULE_CASES[case][0] == "availability"]
    held = work / "repo-availability"  # the same repository with the case's items unavailable
    if available:
        from triton_models.availability import set_availability

        shutil.rmtree(held, ignore_errors=True)
        shutil.copytree(repo, held)
        t = time.perf_counter()
        set_availability(held, unavailable=lists[available[0]], log=lambda m: None)
        entry["availability_set_s"] = round(time.perf_counter() - t, 1)
    baseline, tree = None, None
    if args.baseline_ref:
        baseline, entry["baseline_commit"], tree = baseline_repo(args.baseline_ref, run, data, work, args.k)
    try:
        with TritonServer(repo, log_file=work / "tritonserver.log", timeout=3600) as server:
            if baseline is not None:  # its own phase: the rule requests' memory traffic stays out of it
                with TritonServer(baseline, log_file=work / "tritonserver-baseline.log", timeout=3600) as old:
                    log(f"  no rule, this code and {args.baseline_ref}'s, interleaved: {args.rules_requests} rounds")
                    entry["no_rule_vs_baseline"] = interleaved({"new": server.http_url, "baseline": old.http_url},
                                                               {"none": ("new", []), "none_baseline": ("baseline", [])},
                                                               sessions, args.rules_requests)
            cases = {"none": ("new", []), **{case: ("new", inputs) for case, inputs in rule_inputs.items()}}
            urls = {"new": server.http_url}
            with contextlib.ExitStack() as more:
                if available:
                    urls["held"] = more.enter_context(TritonServer(held, log_file=work / "tritonserver-held.log",
                                                                   timeout=3600)).http_url
                    cases.update({case: ("held", []) for case in available})
                log(f"  rules: {', '.join(cases)} interleaved, {args.rules_requests} rounds")
                entry["latency"] = interleaved(urls, cases, sessions, args.rules_requests)
                entry["recall"] = filtered_recall(run, data, {case: urls[cases[case][0]] for case in lists},
                                                  sessions[: args.rules_recall_sessions], lists, args.k)
    finally:
        if tree is not None:  # the worktree's git metadata leaves with it
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False,
                           capture_output=True)
    lat = entry["latency"]
    entry["p99_over_unfiltered"] = {case: round(lat[case]["p99_ms"] / lat["none"]["p99_ms"], 2) for case in lists}
    entry["p50_over_unfiltered"] = {case: round(lat[case]["p50_ms"] / lat["none"]["p50_ms"], 2) for case in lists}
    if "no_rule_vs_baseline" in entry:
        both = entry["no_rule_vs_baseline"]
        entry["no_rule_over_baseline"] = {q: round(both["none"][q] / both["none_baseline"][q], 3)
                                          for q in ("p50_ms", "p99_ms", "mean_ms")}
    return entry


def rules_in_process(run: Path, data: Path, sessions: list, lists: dict, k: int) -> dict:
    """Where a rule's server time goes, in-process (1 thread, p50 ms over `sessions`): resolving its raw IDs
    (OdmtPredict.catalog_rows on the UTF-8 bytes Triton delivers) or evaluating its filter (item_filter.py's
    AttributeIndex, built once as at load), and the search under it (retrieval.py)."""
    import torch

    from odmt_t4r.contract import catalog_item_ids
    from odmt_t4r.data.attributes import run_attributes
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.model.item_filter import AttributeIndex
    from odmt_t4r.model.retrieval import ItemRules
    from triton_models.predict import catalog_index

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    ids = np.array([i.encode("utf-8") for i in catalog_item_ids(data)], dtype=object)
    index = catalog_index(ids)
    hist = encoded_histories(data, sessions, model.config.max_length)
    retriever = model.retriever()
    with torch.inference_mode():
        queries = [retriever.queries(model.session_states(hist[i:i + 1])) for i in range(len(hist))]
    out = {}
    attributes = None
    for case in lists:
        name = RULE_CASES[case][0]
        if name == "filter" and attributes is None:
            t = time.perf_counter()
            attributes = AttributeIndex(run_attributes(run, data))
            out["attribute_index_build_s"] = round(time.perf_counter() - t, 2)
        raw = np.array([i.encode("utf-8") for i in lists[case]], dtype=object)
        resolve, search = [], []
        held = None
        if name == "availability":  # resolved once per change, as the executor does (predict._availability_rule)
            mask = torch.ones(len(ids), dtype=torch.bool)
            mask[torch.from_numpy(index.get_indexer(raw) + 3)] = False
            held = ItemRules(allow=mask)
        for i in range(len(hist)):
            t = time.perf_counter()
            if held is not None:
                rule = held
            elif name == "filter":
                rule = ItemRules(allow=torch.from_numpy(attributes.allowed(attributes.parse(raw[:1]))))
            else:
                rule = ItemRules(**{name.split("_")[0]: torch.from_numpy(index.get_indexer(raw) + 3)})
            resolve.append(time.perf_counter() - t)
            t = time.perf_counter()
            retriever.top_k(*queries[i], hist[i:i + 1], k, rule)
            search.append(time.perf_counter() - t)
        out[case] = {"resolve_ids" if name != "filter" else "evaluate_filter": percentiles(resolve)["p50_ms"],
                     "search": percentiles(search)["p50_ms"]}
    plain = []
    for i in range(len(hist)):
        t = time.perf_counter()
        retriever.top_k(*queries[i], hist[i:i + 1], k)
        plain.append(time.perf_counter() - t)
    out["none"] = {"search": percentiles(plain)["p50_ms"]}
    return out


def rules_line(n: int, e: dict) -> str:
    lat = e["latency"]
    cases = "; ".join(f"{case} ({e['lists'][case]:,} {'items' if case in e.get('filters', {}) else 'IDs'}) "
                      f"p50 {lat[case]['p50_ms']:.2f} p99 {lat[case]['p99_ms']:.2f} ms "
                      f"= {e['p99_over_unfiltered'][case]}x, recall@10 {e['recall'][case]['recall_at_10']:.4f}"
                      for case in e["lists"])
    base = ""
    if "no_rule_over_baseline" in e:
        a, b = e["no_rule_vs_baseline"]["none"], e["no_rule_vs_baseline"]["none_baseline"]
        base = (f" | no rule, own phase: p50 {a['p50_ms']:.2f} p99 {a['p99_ms']:.2f} ms, baseline {e['baseline_commit'][:7]} "
                f"p50 {b['p50_ms']:.2f} p99 {b['p99_ms']:.2f} ms: {e['no_rule_over_baseline']['p50_ms']}x p50, "
                f"{e['no_rule_over_baseline']['p99_ms']}x p99")
    return (f"{n:>9,} items | rules: none p50 {lat['none']['p50_ms']:.2f} p99 {lat['none']['p99_ms']:.2f} ms; {cases}{base}")


def eval_peak_rss(run: Path, data: Path) -> dict:
    """Full-catalog evaluation (the per-epoch fusion grid + evaluate_model) on one batch, in a fresh process."""
    cmd = [sys.executable, __file__, "--eval-rss", str(run), str(data)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"evaluation subprocess failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _eval_rss_child(run: str, data: str) -> None:
    import torch

    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_model
    from odmt_t4r.training.fusion import evaluate_fusions
    from odmt_t4r.training.train import TrainConfig

    class OneBatch:  # the peak is per batch: one batch of 512 users measures it
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def batches(self, split, batch_size, **kw):
            yield next(iter(self.inner.batches(split, batch_size, **kw)))

        def num_batches(self, split, batch_size):
            return 1

    def peak_gb() -> float:
        """This process's own RSS high-water mark (VmHWM: ru_maxrss would include the parent's at fork)."""
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 2**20, 2)

    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data)
    data_ = OneBatch(PreparedData(data))
    base = peak_gb()
    t0 = time.perf_counter()
    grid = evaluate_fusions(model, data_, "valid", step=TrainConfig().epoch_fusion_step, batch_size=512)
    t1 = time.perf_counter()
    evaluate_model(model, data_, "valid", batch_size=512)
    t2 = time.perf_counter()
    print(json.dumps({"model_loaded_rss_gb": base, "fusion_candidates": len(grid),
                      "fusion_grid_s_per_512_users": round(t1 - t0, 1), "evaluate_s_per_512_users": round(t2 - t1, 1),
                      "peak_rss_gb": peak_gb()}))


# -- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[3_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency-1 measurement")
    p.add_argument("--in-process-requests", type=int, default=100)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=100)
    p.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    p.add_argument("--recall-sessions", type=int, default=500)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "scale"))
    p.add_argument("--no-eval-rss", action="store_true", help="skip the evaluation memory measurement")
    p.add_argument("--only-rules", action="store_true", help="measure the business-rule cases only")
    p.add_argument("--no-rules", action="store_true", help="skip the business-rule cases")
    p.add_argument("--rules-requests", type=int, default=300, help="interleaved rounds of the rule cases")
    p.add_argument("--rules-recall-sessions", type=int, default=200)
    p.add_argument("--rule-cases", nargs="+", default=list(RULE_CASES), choices=list(RULE_CASES),
                   help="the rule cases measured (the category filter runs on a DIR with a category attribute)")
    p.add_argument("--baseline-ref", help="git ref whose code serves the no-rule baseline beside this code's")
    p.add_argument("--out", help=f"default {RESULTS.name} ({RESULTS_RULES.name} with --only-rules)")
    p.add_argument("--eval-rss", nargs=2, metavar=("RUN", "DIR"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    args.out = args.out or str(RESULTS_RULES if args.only_rules else RESULTS)
    if args.eval_rss:
        _eval_rss_child(*args.eval_rss)
        return 0

    import torch

    from odmt_t4r.model.retrieval import RetrievalConfig
    from triton_models.export import example_sessions

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ODMT_CACHE_DIR", str(work / "cache"))  # the HNSW indexes, reused by later runs
    result = {"benchmark": "serving_scale", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_average_before": load_average()},
              "model": {"name": "odmt (untrained, synthetic item vectors)", "branches": list(BRANCHES),
                        "d_model": D_MODEL, "fused_dims": D_MODEL * len(BRANCHES) + 1},
              "retrieval_defaults": RetrievalConfig().as_dict(), "k": args.k, "sizes": {}}
    for n in args.sizes:
        log(f"catalog of {n:,} items")
        data = synthetic_dir(work, n)
        run = synthetic_run(data, work / f"run-{n}")
        sessions = example_sessions(data, 1000, seed=1)
        entry = {}
        if not args.only_rules:
            kinds = ["exact", "hnsw"] if n >= 10_000 else ["exact"]
            entry["in_process"] = in_process(run, data, sessions, args.in_process_requests, args.k, kinds)
            gc.collect()
            entry["served"] = served(run, data, work / f"serve-{n}", sessions, args)
            entry["served"]["retrieval"] = "hnsw" if n > RetrievalConfig().exact_max_items else "exact"
            if n == max(args.sizes) and not args.no_eval_rss:
                log("  streaming evaluation: peak RSS")
                entry["evaluation"] = eval_peak_rss(run, data)
            log(f"  {one_line(n, entry, args.clients)}")
        if n >= 10_000 and not args.no_rules:
            gc.collect()
            if "category_10pct" in args.rule_cases:  # the same catalog with a category attribute
                data = synthetic_dir(work, n, categories=CATEGORIES)
                run = synthetic_run(data, _run_of(data))
            entry["rules"] = rules_benchmark(run, data, work / f"rules-{n}", sessions, args)
            entry["rules"]["retrieval"] = "hnsw" if n > RetrievalConfig().exact_max_items else "exact"
            log(f"  {rules_line(n, entry['rules'])}")
        result["sizes"][str(n)] = entry
    result["machine"]["load_average_after"] = load_average()
    result["goals"] = goal_check(result, args.clients)
    print(table(result, args.clients))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def one_line(n: int, e: dict, clients: int) -> str:
    s, ip = e["served"], e["in_process"]
    search = "  ".join(f"{k} p50 {v['search']['p50_ms']:.2f} ms" for k, v in ip.items() if "search" in v)
    served_ = "; ".join(f"{p} p50 {s[p]['concurrency_1']['p50_ms']:.2f} p99 {s[p]['concurrency_1']['p99_ms']:.2f} ms "
                        f"c={clients} {s[p][f'concurrency_{clients}']['req_per_s']:.0f} req/s"
                        for p in ("http", "grpc") if p in s)
    return f"{n:>9,} items | in-process {search} | served ({s['retrieval']}) {served_} | recall@10 {s['recall_at_10']:.4f}"


def goal_check(result: dict, clients: int) -> dict:
    """{size_protocol: {metric: {value, goal, met}}} for the issue's goals."""
    out = {}
    sizes = result["sizes"]

    def entry(value, goal, higher_is_better=False):
        return {"value": value, "goal": goal, "met": value >= goal if higher_is_better else value <= goal}

    for protocol in ("http", "grpc"):
        if protocol in sizes.get("1000000", {}).get("served", {}):
            s = sizes["1000000"]["served"]
            out[f"1M_{protocol}"] = {"c1_p50_ms": entry(s[protocol]["concurrency_1"]["p50_ms"], GOALS["p50_ms"]),
                                     "c1_p99_ms": entry(s[protocol]["concurrency_1"]["p99_ms"], GOALS["p99_ms"]),
                                     "recall_at_10": entry(s["recall_at_10"], GOALS["recall_at_10"], True)}
        if protocol in sizes.get("3000", {}).get("served", {}):
            out[f"3000_{protocol}"] = {"c1_p50_ms": entry(sizes["3000"]["served"][protocol]["concurrency_1"]["p50_ms"],
                                                          GOALS["small_p50_ms"])}
    if "evaluation" in sizes.get("1000000", {}):
        out["1M_evaluation"] = {"peak_rss_gb": entry(sizes["1000000"]["evaluation"]["peak_rss_gb"],
                                                     GOALS["eval_peak_rss_gb"])}
    for n, e in sizes.items():
        if "rules" in e:
            r = e["rules"]
            goals = {f"{case}_p99_over_unfiltered": entry(r["p99_over_unfiltered"][case], GOALS["rules_p99_ratio"])
                     for case in r["lists"]}
            goals.update({f"{case}_recall_at_10": entry(r["recall"][case]["recall_at_10"], GOALS["recall_at_10"], True)
                          for case in r["lists"]})
            if "no_rule_over_baseline" in r:
                goals["no_rule_p50_over_baseline"] = entry(r["no_rule_over_baseline"]["p50_ms"],
                                                           GOALS["no_rule_overhead"])
            out[f"{int(n):,}_rules"] = goals
    return out


def table(result: dict, clients: int) -> str:
    m = result["machine"]
    lines = [f"serving at scale: {result['model']['name']}, {result['model']['fused_dims']} fused dims, k={result['k']}, "
             f"{m['cpus']} CPUs, load average {m['load_average_before']} before / {m['load_average_after']} after"]
    if any("served" in e for e in result["sizes"].values()):
        lines += ["in-process (batch 1, 1 thread, ms p50): search alone (exact / hnsw); recommend as before (full "
                  "matrix) and now",
                  f"{'items':>9} | {'exact':>7} {'hnsw':>6} | {'full rec':>8} {'rec now':>7} | {'served':>6} {'proto':>5} "
                  f"{'c=1 p50':>8} {'p99':>6} {'c=' + str(clients) + ' req/s':>10} | {'recall@10':>9}"]
    if any("rules" in e for e in result["sizes"].values()):
        lines.append("business rules, served over HTTP at concurrency 1, requests interleaved (p99 over the unfiltered "
                     "p99 of the same run; recall@10 against the exact filtered top-k):")
    for n, e in result["sizes"].items():
        if "rules" in e:
            lines.append(rules_line(int(n), e["rules"]))
        if "served" not in e:  # --only-rules
            continue
        ip, s = e["in_process"], e["served"]
        hnsw = f"{ip['hnsw']['search']['p50_ms']:6.2f}" if "hnsw" in ip else f"{'-':>6}"
        full = f"{ip['full']['recommend']['p50_ms']:8.2f}" if "full" in ip else f"{'-':>8}"
        now = ip["hnsw" if s["retrieval"] == "hnsw" else "exact"]["recommend"]["p50_ms"]
        for j, protocol in enumerate(p for p in ("http", "grpc") if p in s):
            c1, cn = s[protocol]["concurrency_1"], s[protocol][f"concurrency_{clients}"]
            head = (f"{int(n):>9,} | {ip['exact']['search']['p50_ms']:7.2f} {hnsw} | {full} {now:7.2f} | {s['retrieval']:>6}"
                    if j == 0 else f"{'':>9} | {'':>7} {'':>6} | {'':>8} {'':>7} | {'':>6}")
            lines.append(f"{head} {protocol:>5} {c1['p50_ms']:8.2f} {c1['p99_ms']:6.2f} {cn['req_per_s']:10.0f} | "
                         f"{s['recall_at_10']:9.4f}")
        if "ef_sweep" in ip.get("hnsw", {}):
            lines.append("  hnsw search by ef_search: " + "; ".join(
                f"{p['ef_search']}: recall@10 {p['recall_at_10']:.4f} p50 {p['search']['p50_ms']:.2f} ms"
                for p in ip["hnsw"]["ef_sweep"]))
        if "evaluation" in e:
            ev = e["evaluation"]
            lines.append(f"  full-catalog evaluation at {int(n):,} items: peak RSS {ev['peak_rss_gb']} GB "
                         f"({ev['fusion_candidates']} fusion candidates: {ev['fusion_grid_s_per_512_users']} s and "
                         f"evaluate_model {ev['evaluate_s_per_512_users']} s per 512 users)")
    for name, goals in result["goals"].items():
        lines.append(f"goals {name}: " + "; ".join(f"{k} {g['value']} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}"
                                                    for k, g in goals.items()))
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
