"""`odmt export`: a trained RUN -> a Triton model repository (a merlin-systems Ensemble, python backend).

    odmt export --run RUN --out REPO [--k 10] [--transform fast|workflow] [--data DIR]

The served graph, run by merlin-systems' executor model on Triton's PYTHON backend (no libtorch needed):

    item_id-list (raw IDs)                                          <- request
      fast:     >> VocabularyLookup(the fitted inference workflow's vocabulary and slice)
      workflow: >> TransformWorkflow(DIR/workflows/inference)   (a second Triton model, called via BLS)
      >> OdmtPredict(RUN, k)                                        -> item_ids, scores

`fast` (default) runs the fitted Categorify vocabulary as a dict lookup inside the executor (no pandas,
no second model); `workflow` runs the saved NVTabular workflow itself. Both are checked in-process
against `Workflow.transform` + the model before anything is written (merlin's export swaps
TransformWorkflow for its Triton twin, so the check cannot run afterwards).

Wire contract (model `executor_model`; triton_models/client.py speaks it):
    inputs   item_id-list__values   BYTES  [1, N]    raw item IDs (UTF-8) of all sessions of the request
             item_id-list__offsets  INT32  [1, B+1]  session b = values[offsets[b]:offsets[b+1]]
    outputs  item_ids               BYTES  [1, B, K] raw item IDs, best first; b"" pads
             scores                 FP32   [1, B, K] descending; -inf where the ID is b""
The leading 1 is the request's batch entry: the executor declares `max_batch_size: 64` so Triton's
dynamic batcher can merge concurrent requests, and the executor scores all their sessions in one
graph run. `--max-batch-size 0` keeps merlin's unbatched shapes ([N], [B+1], [B, K]), no batching.

REPO/manifest.json records the run, data DIR, workflow, k, transform, batching, versions, checks and the
sha256 of every file (signed when ODMT_SIGNING_KEY is set); `odmt serve` checks them before Triton loads
anything. The repository is built next to REPO and swapped in whole (odmt_t4r/output_folder.py).

Small catalogs: a session may leave fewer than k unseen items (a catalog smaller than k, or a session
holding every item). The answer then holds what is left, padded with b"" IDs and -inf scores, the
same in-process (`reference_recommend`, `check_in_process`) and served.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "odmt-triton-repo/1"
MODEL_NAME = "executor_model"
TRANSFORMS = ("fast", "workflow")
from odmt_t4r.contract import ITEM_LIST as INPUT, SEEN_LIST, read_split, run_data_dir  # noqa: E402,F401


@dataclass
class ServingConfig:
    k: int = 10
    transform: str = "fast"
    max_batch_size: int = 64  # requests the dynamic batcher may merge into one executor call
    max_queue_delay_us: int = 0  # 0: batch whatever queued while the instance was busy; no added wait
    instances: int = 1  # CPU instances of the executor (one stub process each)
    workflow_instances: int = 1  # CPU instances of the NVTabular workflow model (workflow transform)
    torch_threads: int = 1  # intra-op threads per instance (2 cores: more threads only contend)
    max_sessions_per_run: int = 256  # sessions of merged requests scored together (memory bound)
    jit: bool = True  # TorchScript-trace the sequence encoders at load (checked against eager, else eager)


# -- inputs ------------------------------------------------------------------------------------------

def load_inference_workflow(data_dir: Path):
    """The prepared DIR's fitted inference workflow (a pickle: the DIR is checked against its manifest first)."""
    import nvtabular as nvt

    from odmt_t4r.prepare import FORMAT as PREPARED_FORMAT
    from odmt_t4r.trust import verify_folder

    path = Path(data_dir) / "workflows" / "inference"
    if not (path / "workflow.pkl").is_file():
        raise FileNotFoundError(f"{path} holds no saved workflow: was {data_dir} made by `odmt prepare`?")
    verify_folder(data_dir, PREPARED_FORMAT, "prepared folder")
    return nvt.Workflow.load(str(path))


def vocabulary_ids(workflow, column: str = INPUT) -> list[str]:
    """index -> raw item ID from the fitted Categorify vocabulary ("" for the reserved rows 0-2)."""
    import pandas as pd
    from merlin.dag import postorder_iter_nodes
    from nvtabular.ops import Categorify

    cats = [n.op for n in postorder_iter_nodes(workflow.output_node) if isinstance(n.op, Categorify)]
    if len(cats) != 1:
        raise ValueError(f"the inference workflow has {len(cats)} Categorify ops; expected one")
    cat = cats[0]
    storage = cat.storage_name.get(column, column)
    vocab = pd.read_parquet(cat.categories[storage])
    values = vocab[storage] if storage in vocab else vocab.iloc[:, 0]
    n = int(vocab.index.max()) + 1 if len(vocab) else 3
    ids = [""] * n
    for label, value in zip(vocab.index.tolist(), values.tolist()):
        ids[int(label)] = str(value)
    return ids


def catalog_ids(data_dir: str | Path) -> np.ndarray:
    """index -> raw item ID (str) from the DIR's item catalog (items.parquet), "" for unused rows.
    Independent of the workflow's vocabulary file, so the checks can compare the two."""
    import pandas as pd

    items = pd.read_parquet(Path(data_dir) / "items.parquet", columns=["item_idx", "item_id"])
    ids = np.full(int(items["item_idx"].max()) + 1 if len(items) else 3, "", dtype=object)
    ids[items["item_idx"].to_numpy()] = items["item_id"].astype(str).to_numpy()
    return ids


def example_sessions(data_dir: str | Path, n: int = 100, split: str = "test", seed: int = 0) -> list[list[str]]:
    """`n` sessions of a split in raw item IDs: each user's whole history before the split's target."""
    import pandas as pd


    frame = read_split(Path(data_dir) / split, [SEEN_LIST])
    items = pd.read_parquet(Path(data_dir) / "items.parquet", columns=["item_idx", "item_id"])
    raw = dict(zip(items["item_idx"].tolist(), items["item_id"].astype(str).tolist()))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(frame), size=min(n, len(frame)), replace=False)
    return [[raw[int(i)] for i in frame[SEEN_LIST].iloc[r]] for r in sorted(rows)]


# -- the graph -------------------------------------------------------------------------------------

def build_ensemble(run: str | Path, data_dir: str | Path | None = None, cfg: ServingConfig | None = None):
    """(Ensemble, its OdmtPredict op, the inference workflow) for a RUN; nothing is written."""
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    from triton_models.predict import OdmtPredict
    from triton_models.vocab_lookup import VocabularyLookup

    cfg = cfg or ServingConfig()
    if cfg.transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, not {cfg.transform!r}")
    run = Path(run).resolve()
    data_dir = run_data_dir(run, data_dir)
    workflow = load_inference_workflow(data_dir)
    column = workflow.input_schema.column_names[0]
    predict = OdmtPredict(run, vocabulary_ids(workflow, column), k=cfg.k, data_dir=data_dir,
                          input_column=column, torch_threads=cfg.torch_threads, jit=cfg.jit)
    if cfg.transform == "fast":
        encode = VocabularyLookup.from_workflow(workflow, column)
    else:
        encode = TransformWorkflow(workflow)
    graph = [column] >> encode >> predict
    return Ensemble(graph, workflow.input_schema), predict, workflow


def reference_recommend(model, workflow, item_ids: np.ndarray, sessions: Sequence[Sequence[str]], k: int,
                        column: str = INPUT) -> tuple[np.ndarray, np.ndarray]:
    """What the served graph must answer: NVTabular's own `Workflow.transform` on the raw sessions,
    then the in-process model's `recommend` on the right-padded [B L] histories (pads 0), mapped to
    raw IDs with `item_ids` (index -> str, e.g. `catalog_ids`): (str object [B k], scores float32 [B k]).
    Slots with no candidate left (every item seen, or fewer than k items) hold "" and -inf.
    Empty sessions are answered by popularity in serving (see predict.py), not by this function."""
    import pandas as pd
    import torch

    encoded = workflow.transform(pd.DataFrame({column: [list(s) for s in sessions]}))[column]
    L = model.config.max_length
    hist = np.zeros((len(encoded), L), dtype=np.int64)
    for i, v in enumerate(encoded):
        v = np.asarray(v, dtype=np.int64)[-L:]
        hist[i, : len(v)] = v
    with torch.inference_mode():
        scores, idx = model.recommend(torch.from_numpy(hist), k=k)
    scores, idx = scores.numpy(), idx.numpy()
    found = np.isfinite(scores)
    ids = np.full((len(hist), k), "", dtype=object)
    padded = np.full((len(hist), k), -np.inf, dtype=np.float32)
    ids[:, : idx.shape[1]] = np.where(found, np.asarray(item_ids, dtype=object)[idx], "")
    padded[:, : idx.shape[1]] = np.where(found, scores, -np.inf)
    return ids, padded


def edge_sessions(vocab: Sequence[str], max_length: int) -> list[list[str]]:
    """Sessions that exercise the request transform and small catalogs: unknown IDs, empty, long,
    repeated, odd strings, and the last `max_length` catalog items (every item of a small catalog,
    so no candidate is left). Works from a one-item vocabulary up."""
    known = [v for v in vocab if v]
    pick = lambda i: known[i % len(known)]  # noqa: E731 - small catalogs repeat items
    long = [pick(i) for i in range(3 * max_length + 1)]
    return [
        ["__unknown__"],
        [pick(0), "__unknown__", pick(1)],
        [],
        long,
        [pick(2)] * 3,
        ["", " ", pick(0).lower(), pick(0) + " ", "nan", "None", "0"],
        [known[-1]],
        ["日本語", pick(3)],
        known[-max_length:],
    ]


def check_in_process(ensemble, predict, workflow, sessions: Sequence[Sequence[str]], atol: float = 1e-4) -> dict:
    """Runs the ensemble graph in-process on `sessions` and compares it with `reference_recommend` on
    an independently loaded (eager) copy of the model, and, for the fast transform, the encoding with
    `Workflow.transform` on every session. Raises AssertionError on any difference."""
    import pandas as pd
    from merlin.table import TensorTable

    from odmt_t4r.model import OdmtRecommender

    from triton_models.client import encode_sessions
    from triton_models.vocab_lookup import VocabularyLookup

    column = predict.input_column
    values, offsets = encode_sessions(sessions)
    values = np.array([v.decode("utf-8") for v in values], dtype=object)  # in-process: str, served: bytes
    out = ensemble.transform(TensorTable({f"{column}__values": values, f"{column}__offsets": offsets}))
    got_ids = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(out["item_ids"].values)
    got_scores = out["scores"].values
    reference = OdmtRecommender.from_pretrained(predict.run_dir, data_dir=predict.data_dir)
    want_ids, want_scores = reference_recommend(reference, workflow, catalog_ids(predict.data_dir), sessions,
                                                predict.k, column)
    nonempty = np.array([len(s) > 0 for s in sessions])
    mismatched = [i for i in np.flatnonzero(nonempty) if list(got_ids[i]) != list(want_ids[i])]
    if mismatched:
        i = mismatched[0]
        raise AssertionError(f"{len(mismatched)} sessions differ from the in-process model, e.g. session {i}: "
                             f"{got_ids[i][:5].tolist()} vs {want_ids[i][:5].tolist()}")
    got, want = got_scores[nonempty], want_scores[nonempty]
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        raise AssertionError("the served graph pads other slots (-inf scores) than the in-process model")
    finite = np.isfinite(want)
    diff = float(np.max(np.abs(got[finite] - want[finite]))) if finite.any() else 0.0
    if not diff <= atol:
        raise AssertionError(f"scores differ from the in-process model by up to {diff:.3g} (> {atol})")
    encode_checked = 0
    lookups = [n.op for n in _chain(ensemble) if isinstance(n.op, VocabularyLookup)]
    if lookups:
        expected = workflow.transform(pd.DataFrame({column: [list(s) for s in sessions]}))[column]
        codes, new_offsets = lookups[0].encode(values, offsets)
        for i, want in enumerate(expected):
            got = codes[new_offsets[i]:new_offsets[i + 1]]
            if not np.array_equal(got, np.asarray(want, dtype=np.int64)):
                raise AssertionError(f"fast transform != Workflow.transform on session {i}: {got} vs {list(want)}")
            encode_checked += 1
    return {"sessions": len(sessions), "max_abs_score_diff": diff, "encodings_checked": encode_checked,
            "sequence_encoders": predict.jit_status}


# -- writing the repository ------------------------------------------------------------------------

def _set_instances(config, count: int) -> None:
    import tritonclient.grpc.model_config_pb2 as mc

    del config.instance_group[:]
    config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.Kind.KIND_CPU, count=count))


def _rewrite_config(path: Path, edit) -> None:
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    edit(config)
    path.write_text(text_format.MessageToString(config))


def _tune_executor(config, cfg: ServingConfig) -> None:
    import tritonclient.grpc.model_config_pb2 as mc

    # merlin writes KIND_AUTO and no batching (runtimes/triton/runtime.py `_executor_model_export`)
    _set_instances(config, cfg.instances)
    config.parameters["max_sessions_per_run"].string_value = str(cfg.max_sessions_per_run)
    if cfg.max_batch_size > 0:
        config.max_batch_size = cfg.max_batch_size
        for tensor in config.input:
            tensor.allow_ragged_batch = True  # requests hold different numbers of items/sessions
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(max_queue_delay_microseconds=cfg.max_queue_delay_us))


def wire_contract(cfg: ServingConfig) -> dict:
    lead = "1, " if cfg.max_batch_size > 0 else ""  # one batch entry per request when Triton batches
    return {"model": MODEL_NAME, "max_batch_size": cfg.max_batch_size,
            "inputs": {f"{INPUT}__values": f"BYTES [{lead}N] raw item IDs, UTF-8",
                       f"{INPUT}__offsets": f"INT32 [{lead}B+1] session b = values[offsets[b]:offsets[b+1]]"},
            "outputs": {"item_ids": f"BYTES [{lead}B, {cfg.k}] best first, b'' pads",
                        "scores": f"FP32 [{lead}B, {cfg.k}] descending, -inf where the ID is b''"}}


@contextlib.contextmanager
def _operators_pickled_by_value():
    """ensemble.pkl carries our operators' code (cloudpickle by value), so the server's Python needs
    merlin, torch and odmt_t4r (the model classes) but not this checkout's triton_models package."""
    import cloudpickle

    from triton_models import predict, vocab_lookup

    modules = (predict, vocab_lookup)
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("odmt-t4r", "merlin-systems", "merlin-core", "nvtabular", "torch", "transformers4rec",
                 "numpy", "pandas", "tritonclient", "nvidia-pytriton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def export(run: str | Path, out: str | Path, cfg: ServingConfig | None = None, data_dir: str | Path | None = None,
           check_sessions: int = 100, log=None, force: bool = False) -> dict:
    """Builds, checks in-process, and writes the model repository `out`; returns its manifest.
    `out` is built next to it and swapped in only when everything succeeded (see OutputFolder); an
    existing `out` is replaced only when odmt wrote it, `force` moves any other folder aside."""
    from odmt_t4r.output_folder import OutputFolder

    say = log or (lambda msg: print(f"[export] {msg}", file=sys.stderr, flush=True))
    with OutputFolder(out, FORMAT, force=force, what="model repository", log=say) as folder:
        manifest = _export(Path(run).resolve(), folder.stage, cfg or ServingConfig(), data_dir, check_sessions, say)
        folder.commit()
    say(f"wrote {folder.out} ({', '.join(manifest['models'])})")
    return manifest


def _export(run: Path, stage: Path, cfg: ServingConfig, data_dir, check_sessions: int, say) -> dict:
    from odmt_t4r.trust import write_manifest

    t0 = time.perf_counter()
    ensemble, predict, workflow = build_ensemble(run, data_dir, cfg)
    data_dir = Path(predict.data_dir)
    run_config = json.loads((run / "config.json").read_text())
    trained_on = run_config.get("data", {}).get("manifest_sha256")
    if trained_on and trained_on != hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest():
        say(f"warning: {run} was trained on a prepared DIR whose manifest differs from {data_dir}/manifest.json "
            "(re-prepared?); the vocabulary is checked below, the rest is up to you")
    say(f"graph: {' >> '.join(type(n.op).__name__ for n in _chain(ensemble))} (transform={cfg.transform}, k={cfg.k})")

    sessions = example_sessions(data_dir, check_sessions) + edge_sessions(vocabulary_ids(workflow),
                                                                          predict.model.config.max_length)
    check = check_in_process(ensemble, predict, workflow, sessions)
    say(f"in-process check: {check['sessions']} sessions match Workflow.transform + the model "
        f"(max |score diff| {check['max_abs_score_diff']:.2g}, {check['encodings_checked']} encodings compared; "
        f"encoders {check['sequence_encoders']})")

    with _operators_pickled_by_value():
        ensemble.export(str(stage), name=MODEL_NAME)  # swaps TransformWorkflow for TransformWorkflowTriton
    executor = stage / MODEL_NAME
    _rewrite_config(executor / "config.pbtxt", lambda c: _tune_executor(c, cfg))
    here = Path(__file__).parent
    shutil.copyfile(here / "executor_model.py", executor / "1" / "model.py")
    models = sorted(p.name for p in stage.iterdir() if (p / "config.pbtxt").is_file())
    for name in models:
        if name != MODEL_NAME:  # the NVTabular workflow model (workflow transform)
            _rewrite_config(stage / name / "config.pbtxt", lambda c: _set_instances(c, cfg.workflow_instances))
            shutil.copyfile(here / "workflow_model.py", stage / name / "1" / "model.py")

    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": str(run),
        "model": run_config.get("model", {}).get("name"),
        "data_dir": str(data_dir),
        "data_manifest_sha256": run_config.get("data", {}).get("manifest_sha256"),
        "workflow": str(data_dir / "workflows" / "inference"),
        "k": cfg.k,
        "transform": cfg.transform,
        "serving": asdict(cfg),
        "entry_model": MODEL_NAME,
        "models": models,
        "max_length": predict.model.config.max_length,
        "n_items": len(predict.item_ids) - 3,
        "wire": wire_contract(cfg),
        "check": check,
        "versions": _versions(),
    }
    manifest = write_manifest(stage, manifest)  # last: every file's sha256, signed when a key is set
    say(f"built in {time.perf_counter() - t0:.1f}s")
    return manifest


def _chain(ensemble) -> list:
    from merlin.dag import postorder_iter_nodes

    return [n for n in postorder_iter_nodes(ensemble.graph.output_node) if n.op is not None
            and type(n.op).__name__ != "SelectionOp"]


# -- CLI ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServingConfig()
    parser.add_argument("--run", required=True, help="a trained RUN folder (config.json, model.pt)")
    parser.add_argument("--out", required=True, help="the model repository to write (replaced on success, and "
                                                     "only if odmt wrote it)")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out folder odmt did not write: it is moved aside to "
                             "REPO.backup-<time>, never deleted")
    parser.add_argument("--k", type=int, default=d.k, help="recommendations per session")
    parser.add_argument("--transform", choices=TRANSFORMS, default=d.transform,
                        help="fast: vocabulary lookup in the executor; workflow: the saved NVTabular workflow")
    parser.add_argument("--data", default=None, help="prepared DIR (default: the one recorded in the RUN)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                        help="requests Triton may merge per executor call (0: no dynamic batching)")
    parser.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us)
    parser.add_argument("--instances", type=int, default=d.instances, help="CPU instances of the executor model")
    parser.add_argument("--check-sessions", type=int, default=100,
                        help="test sessions compared in-process with the model before writing")


def run(args: argparse.Namespace) -> int:
    from triton_models.vocab_lookup import FastPathUnsupported

    cfg = ServingConfig(k=args.k, transform=args.transform, max_batch_size=args.max_batch_size,
                        max_queue_delay_us=args.max_queue_delay_us, instances=args.instances)
    try:
        manifest = export(args.run, args.out, cfg, data_dir=args.data, check_sessions=args.check_sessions,
                          force=args.force)
    except FastPathUnsupported as exc:
        print(f"odmt export: error: the fast transform cannot reproduce this workflow ({exc}); "
              f"use --transform workflow", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, AssertionError) as exc:
        print(f"odmt export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {manifest['model']} ({manifest['transform']} transform, k={manifest['k']}) to {args.out}")
    return 0
