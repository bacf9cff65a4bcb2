"""`odmt export`: a trained RUN -> a Triton model repository (a merlin-systems Ensemble, python backend).

    odmt export --run RUN --out REPO [--k 10] [--transform fast|workflow] [--data DIR]

Three steps, each in its own module: build the served graph (graph.py: the request transform and
OdmtPredict, and the wire contract), check it in-process against NVTabular's `Workflow.transform` + the
model (checks.py; merlin's export swaps TransformWorkflow for its Triton twin, so the check cannot run
afterwards), and write the repository (repository.py: Triton configs, the manifest, versions).

REPO/manifest.json records the run, data DIR, workflow, k, transform, batching, versions, checks and the
sha256 of every file (signed when ODMT_SIGNING_KEY is set); `odmt serve` checks them before Triton loads
anything. The repository is built next to REPO and swapped in whole (odmt_t4r/output_folder.py).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from odmt_t4r.contract import RunFolder
from triton_models.checks import check_in_process, edge_sessions, example_sessions
from odmt_t4r.flags import add_flags, given
from triton_models.graph import ServingConfig, build_ensemble, graph_chain

EXPORT_FLAGS = ("k", "transform", "max_batch_size", "max_queue_delay_us", "instances")  # ServingConfig fields
from triton_models.repository import FORMAT, describe, write_models

__all__ = ["FORMAT", "ServingConfig", "export", "checked_ensemble", "add_run_version"]


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


def checked_ensemble(run: Path, data_dir, cfg: ServingConfig, check_sessions: int, say):
    """(ensemble, its OdmtPredict, the check's summary): the graph for `run`, checked in-process."""
    from odmt_t4r.trust import verify_run

    verify_run(run)  # before model.pt, item_vectors.pt or the added items are read (the DIR: load_inference_workflow)
    ensemble, predict, workflow = build_ensemble(run, data_dir, cfg)
    data_dir = Path(predict.data_dir)
    trained_on = RunFolder(run).recorded_data().get("manifest_sha256")
    if trained_on and trained_on != hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest():
        say(f"warning: {run} was trained on a prepared DIR whose manifest differs from {data_dir}/manifest.json "
            "(re-prepared?); the vocabulary is checked below, the rest is up to you")
    say(f"graph: {' >> '.join(type(n.op).__name__ for n in graph_chain(ensemble))} (transform={cfg.transform}, k={cfg.k})")
    served_ids = [i.decode("utf-8") for i in predict.item_ids]  # the vocabulary, then any added items
    sessions = example_sessions(data_dir, check_sessions) + edge_sessions(served_ids, predict.model.config.max_length)
    check = check_in_process(ensemble, predict, workflow, sessions)
    say(f"in-process check: {check['sessions']} sessions match Workflow.transform + the model "
        f"(max |score diff| {check['max_abs_score_diff']:.2g}, {check['encodings_checked']} encodings compared; "
        f"encoders {check['sequence_encoders']})")
    return ensemble, predict, check


def _export(run: Path, stage: Path, cfg: ServingConfig, data_dir, check_sessions: int, say) -> dict:
    from odmt_t4r.trust import write_manifest

    t0 = time.perf_counter()
    ensemble, predict, check = checked_ensemble(run, data_dir, cfg, check_sessions, say)
    models = write_models(ensemble, stage, cfg)
    manifest = write_manifest(stage, describe(run, predict, cfg, check, models, version=1))  # last: hashes, signed
    say(f"built in {time.perf_counter() - t0:.1f}s")
    return manifest


def add_run_version(repo: Path, manifest: dict, run: Path, check_sessions: int, say, lock) -> int:
    """Checks `run`'s graph in-process and adds it as the next version of the live repository `repo` (whose
    `manifest` passed its full check, under the held writer `lock`); returns the version. Add-items and promote
    publish through it; on failure the repository serves what it served."""
    from triton_models.repository import add_version, serving_config

    try:
        cfg = serving_config(manifest)
        ensemble, predict, check = checked_ensemble(run, None, cfg, check_sessions, say)
        return add_version(repo, ensemble, predict, run, check, say, lock=lock)["version"]
    except (ValueError, OSError) as exc:  # the base type: subclasses (DataValidationError, ...) take other args
        kind = OSError if isinstance(exc, OSError) else ValueError
        raise kind(f"{exc} (the new RUN {run} is written; {repo} is unchanged and serves what it served)") from exc


# -- CLI ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a trained RUN folder (config.json, model.pt)")
    parser.add_argument("--out", required=True, help="the model repository to write (replaced on success, and "
                                                     "only if odmt wrote it)")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out folder odmt did not write: it is moved aside to "
                             "REPO.backup-<time>, never deleted")
    parser.add_argument("--data", default=None, help="prepared DIR (default: the one recorded in the RUN)")
    add_flags(parser, ServingConfig, only=EXPORT_FLAGS)
    parser.add_argument("--check-sessions", type=int, default=100,
                        help="test sessions compared in-process with the model before writing")


def run(args: argparse.Namespace) -> int:
    from triton_models.vocab_lookup import FastPathUnsupported

    cfg = ServingConfig(**given(args, ServingConfig, only=EXPORT_FLAGS))
    try:
        manifest = export(args.run, args.out, cfg, data_dir=args.data, check_sessions=args.check_sessions,
                          force=args.force)
    except FastPathUnsupported as exc:
        raise FastPathUnsupported(f"the fast transform cannot reproduce this workflow ({exc}); "
                                  "use --transform workflow") from exc
    print(f"exported {manifest['model']} ({manifest['transform']} transform, k={manifest['k']}) to {args.out}")
    return 0
