"""The model repository on disk: writing it, versioning it, and its manifest.

    REPO/manifest.json                    format FORMAT; run, data DIR, serving config, checks, versions,
                                          the sha256 of every file (signed when ODMT_SIGNING_KEY is set)
    REPO/executor_model/config.pbtxt      the merlin executor (python backend), tuned (instances, batching)
    REPO/executor_model/<v>/model.py      our executor (triton_models/executor_model.py)
    REPO/executor_model/<v>/ensemble/     the pickled graph and its artifacts (the RUN's model files)
    REPO/<workflow model>/                only with the `workflow` transform

`odmt export` writes version 1 of a new repository. `odmt add-items --repo` adds version v+1 (a RUN with
more items) next to the ones there: Triton's default version policy (latest 1) serves the newest, and a
running `odmt serve` loads it without a restart (server.py) once the manifest records it. The new version
is staged next to REPO, moved into place and only then recorded in the manifest; an error before that
removes it again, so the previous version keeps serving. (A SIGKILL between the move and the manifest
leaves an unrecorded version folder, which `odmt serve` refuses by name; remove it and add again.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from odmt_t4r.contract import RunFolder
from odmt_t4r.output_folder import fault_point
from triton_models.graph import MODEL_NAME, ServingConfig, declare_rule_inputs, wire_contract

FORMAT = "odmt-triton-repo/1"
# what the served executor of this odmt does beyond the wire contract; a writer that needs one checks for it
CAPABILITIES = ("availability",)  # reads REPO/availability.json on every request (availability.py)


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
    declare_rule_inputs(config)  # optional inputs outside the merlin graph (executor_model.py reads them)
    config.parameters["max_sessions_per_run"].string_value = str(cfg.max_sessions_per_run)
    if cfg.max_batch_size > 0:
        config.max_batch_size = cfg.max_batch_size
        for tensor in config.input:
            tensor.allow_ragged_batch = True  # requests hold different numbers of items/sessions
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(max_queue_delay_microseconds=cfg.max_queue_delay_us))


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


def write_models(ensemble, stage: Path, cfg: ServingConfig) -> list[str]:
    """Exports `ensemble` into the empty folder `stage` as Triton models (version 1); returns their names."""
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
    return models


def describe(run: Path, predict, cfg: ServingConfig, check: dict, models: list[str], version: int) -> dict:
    """The manifest's description of what a version serves (file hashes are added by write_manifest)."""
    run_config = RunFolder(run).config()
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": str(run),
        "model": run_config.get("model", {}).get("name"),
        "data_dir": str(predict.data_dir),
        "data_manifest_sha256": _data_sha256(predict.data_dir) or run_config.get("data", {}).get("manifest_sha256"),
        "workflow": str(Path(predict.data_dir) / "workflows" / "inference"),
        "k": cfg.k,
        "transform": cfg.transform,
        "serving": asdict(cfg),
        "entry_model": MODEL_NAME,
        "models": models,
        "version": version,
        "max_length": predict.model.config.max_length,
        "n_items": len(predict.item_ids) - 3,
        "wire": wire_contract(cfg),
        "check": check,
        "versions": _versions(),
        "capabilities": list(CAPABILITIES),
    }


def _data_sha256(data_dir) -> str | None:
    """sha256 of a prepared DIR's manifest.json: which prepared data a version is built on (its lineage)."""
    import hashlib

    path = Path(data_dir or "") / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if data_dir and path.is_file() else None


def served_item_ids(repo: Path, manifest: dict) -> list[str] | None:
    """The raw item IDs the recorded version serves (its artifact; for a repository exported before it was
    written, the catalog of the RUN the manifest names); None when neither can be read."""
    from odmt_t4r.contract import RESERVED_ROWS, run_item_ids
    from triton_models.predict import ARTIFACT_DIR, SERVED_ITEMS

    version = manifest.get("version", 1)
    path = Path(repo) / MODEL_NAME / str(version) / "ensemble" / ARTIFACT_DIR / SERVED_ITEMS
    if path.is_file():
        return [str(i) for i in json.loads(path.read_text())]
    try:
        return [str(i) for i in run_item_ids(manifest["run"], manifest.get("data_dir"))[RESERVED_ROWS:]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


ADD_ITEMS_HINT = ("Add the items to the RUN the repository serves (--run its run), or pass --force to replace what "
                  "it serves on purpose")


def check_lineage(repo: Path, manifest: dict, run: Path, model: str | None, data_dir: Path,
                  new_ids: list[str], descendant: bool = False, hint: str = ADD_ITEMS_HINT) -> None:
    """A live repository only moves forward along its own lineage: the next version must be built on the
    same prepared data (with `descendant`: on it or on a DIR appended to it, descends_from), by the same
    model, with a catalog holding every item served now. Raises ValueError saying what is served and what
    was offered (`--force` of add-items and promote replaces the lineage on purpose)."""
    served = (f"{repo} serves version {manifest.get('version', 1)} ({manifest.get('model')}, "
              f"{manifest.get('n_items')} items, run {manifest.get('run')}, data {manifest.get('data_dir')})")
    offered = (f"the offered RUN {run} ({model}, {len(new_ids)} items{'' if descendant else ' with the new ones'}, "
               f"data {data_dir})")
    if manifest.get("model") and model != manifest.get("model"):
        raise ValueError(f"{served}; {offered} is another model family: refusing it. {hint}")
    want = manifest.get("data_manifest_sha256")
    same = (want == _data_sha256(data_dir) or descendant and descends_from(data_dir, want)) if want else (
        str(Path(manifest.get("data_dir", data_dir)).resolve()) == str(Path(data_dir).resolve()))
    if not same:
        rule = "neither that data nor an append to it (odmt prepare --append-to)" if descendant else "other prepared data"
        raise ValueError(f"{served}; {offered} is built on {rule}: refusing it. {hint}")
    served_ids = served_item_ids(repo, manifest)
    if served_ids is None:
        raise ValueError(f"{served}, but its catalog cannot be read to check that {offered} keeps it: refusing it. "
                         f"Pass --force to replace what it serves on purpose")
    lost = sorted(set(served_ids) - set(new_ids))
    if lost:
        raise ValueError(f"{served}; {offered} lacks {len(lost)} served items (e.g. {', '.join(lost[:3])}): "
                         f"refusing to drop them. {hint}")


def descends_from(data_dir: Path, sha256: str) -> bool:
    """Whether the prepared DIR is the one whose manifest.json hashes to `sha256`, or its `parent` chain (odmt
    prepare --append-to records DIR and its manifest's sha256) reaches it; a parent changed since is a break."""
    folder, seen = Path(data_dir), set()
    sha = _data_sha256(folder)
    while sha and sha not in seen:
        if sha == sha256:
            return True
        seen.add(sha)
        parent = json.loads((folder / "manifest.json").read_text()).get("parent") or {}
        if parent.get("manifest_sha256") == sha256:
            return True
        folder = Path(parent.get("dir") or "")
        sha = _data_sha256(folder) if parent.get("dir") else None
        if sha != parent.get("manifest_sha256"):
            return False
    return False


def checked_repository(repo: Path) -> dict:
    """The repository's manifest, after its full check (what `odmt serve` checks before loading); every writer
    of a live repository (add-items, promote, availability) checks it first."""
    from odmt_t4r.trust import clear_bytecode_caches, verify_folder

    if not repo.is_dir():
        raise FileNotFoundError(f"--repo {repo}: no such model repository (write one with `odmt export`)")
    clear_bytecode_caches(repo)  # a running server's stubs write them; they are never recorded
    return verify_folder(repo, FORMAT, "model repository (from odmt export)", strict=True)


def served_versions(repo: str | Path) -> list[int]:
    """The executor model's version folders, ascending."""
    folder = Path(repo) / MODEL_NAME
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def serving_config(manifest: dict) -> ServingConfig:
    """The ServingConfig a repository was written with (its manifest), so a new version fits its config.pbtxt."""
    known = {f.name for f in fields(ServingConfig)}
    return ServingConfig(**{k: v for k, v in (manifest.get("serving") or {}).items() if k in known})


def add_version(repo: str | Path, ensemble, predict, run: Path, check: dict, say, lock=None) -> dict:
    """Writes `ensemble` as the repository's next executor version and records it; returns the new manifest.
    The repository must have passed its manifest check (the caller's); it stays as it was on any failure.
    The repository's writer lock (`lock`, a held FolderLock; taken here when None) covers the whole update:
    two writers never interleave, so the manifest always describes exactly what is served."""
    from odmt_t4r.output_folder import FolderLock, read_manifest
    from odmt_t4r.trust import clear_bytecode_caches, write_manifest

    repo = Path(repo).resolve()
    with contextlib.ExitStack() as held:
        if lock is None:
            held.enter_context(FolderLock(repo))
        remove_stale_stages(repo)
        manifest = read_manifest(repo) or {}
        cfg = serving_config(manifest)
        if manifest.get("models") != [MODEL_NAME]:
            raise ValueError(f"{repo} serves {manifest.get('models')}: only a repository exported with the fast "
                             "transform (one executor model) can take a new version")
        version = max(served_versions(repo), default=0) + 1
        # next to REPO (never a stray file in it), and this writer's own name
        stage = repo.with_name(f".{repo.name}.version-{version}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        target = repo / MODEL_NAME / str(version)
        stage.mkdir()
        placed = False
        try:
            write_models(ensemble, stage, cfg)
            fault_point("add-items-before-version")
            (stage / MODEL_NAME / "1").rename(target)
            placed = True
            fault_point("add-items-before-manifest")
            clear_bytecode_caches(repo)  # the running server's stubs write them; they are never recorded
            history = [*manifest.get("history", [{"version": manifest.get("version", 1), "run": manifest.get("run"),
                                                   "n_items": manifest.get("n_items")}])]
            history.append({"version": version, "run": str(run), "n_items": len(predict.item_ids) - 3})
            new = {**describe(run, predict, cfg, check, manifest.get("models", [MODEL_NAME]), version),
                   "history": history}
            new = write_manifest(repo, new)
        except BaseException:
            if placed:
                shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    say(f"{repo}: version {version} written ({new['n_items']:,} items); a running `odmt serve` loads it now")
    return new


def remove_stale_stages(repo: Path) -> list[Path]:
    """Staging folders a killed `add-items` left next to REPO (ours by name; call with the lock held)."""
    stale = [p for p in repo.parent.glob(f".{repo.name}.version-*.partial") if p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p)
    return stale
