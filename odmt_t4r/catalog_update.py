"""`odmt add-items`: new catalog items into a trained model, from their content, without retraining.

    odmt add-items --run RUN --items new.csv [--out NEWRUN] [--repo REPO]

new.csv has the catalog format (`item_id`, optional `text`, optional `image`: a path, relative to the CSV,
and catalog attributes such as a category or a price: data/attributes.py). The command
  1. checks the file: IDs new to the RUN, every content modality the model reads present on every row,
     every image readable (a cold item has nothing but its content, so a gap is an error here);
  2. computes their frozen features with the prepared DIR's feature settings and encoders (and cache);
  3. runs the trained item tower on them: text and image vectors from their content, the ID vector from
     the content-initialised ID embedding, the rule at training start (an ID-only model gets an
     untrained random ID vector: the floor a cold item has there), then the branch MLPs. A new item has
     no interactions yet; the popularity prior counts it as a typical item (`--assumed-count median`:
     the median train count of the prepared catalog), since with 0 every trained item outranks it;
  4. writes NEWRUN (default `RUN.v2`, `.v3`, ...): a whole RUN whose item matrices and serving vocabulary
     end with the new items (contract.ADDED_ITEMS, with their attributes and a `since`: the file's, else the
     time add-items ran), usable by evaluate, export and recommend;
  5. with --repo, checks the new graph in-process and adds it to the model repository as the next
     version, which a running `odmt serve` loads without a restart (triton_models/repository.py).
Any failure before the last step of 5 leaves the repository, and so what is served, as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from odmt_t4r.contract import (ADDED_ITEMS, RESERVED_ROWS, RUN_FORMAT, RunFolder, catalog_item_ids, run_data_dir,
                               run_item_ids)

RUN_SIDE_FILES = ("fusion.json",)  # the parent's choices that still describe the new version


def read_new_items(path: str | Path, content: list[str], existing: set[str], kinds: dict[str, str] | None = None,
                   now: pd.Timestamp | None = None) -> pd.DataFrame:
    """The validated new items (item_id, the `content` columns with image paths resolved, then their catalog
    attributes in the served catalog's `kinds`, and `since`: the file's, else `now`, the time add-items runs)."""
    from odmt_t4r.data.attributes import SINCE, attribute_columns, normalize_attributes
    from odmt_t4r.data.base import validate_items
    from odmt_t4r.data.sources import _read_table

    notes: dict = {}
    items = validate_items(_read_table(path, "csv"), str(path), check_images=True, notes=notes)
    items = normalize_attributes(items.assign(**({} if SINCE in items else {SINCE: None})), str(path),
                                 {**(kinds or {}), SINCE: "date"})
    items[SINCE] = items[SINCE].fillna(now if now is not None else pd.Timestamp.now(tz="UTC").floor("ms"))  # arrived now
    if notes.get("unreadable_images"):
        raise ValueError(f"{path}: {notes['unreadable_images']} images cannot be read "
                         f"(e.g. {notes['unreadable_image_sample'][:3]}); a new item is scored from its content, "
                         "so fix or remove them")
    clash = items["item_id"][items["item_id"].isin(existing)]
    if len(clash):
        raise ValueError(f"{path}: {len(clash)} item IDs are already in the model (e.g. {clash.head(3).tolist()}); "
                         "add-items only adds new items")
    for m in content:
        if m not in items.columns:
            raise ValueError(f"{path}: the model reads '{m}' but the file has no '{m}' column")
        missing = items["item_id"][items[m].isna() | (items[m].astype(str).str.strip() == "")]
        if len(missing):
            raise ValueError(f"{path}: {len(missing)} items have no {m} (e.g. {missing.head(3).tolist()}); the "
                             f"model scores new items from their {'/'.join(content)}")
    return items[["item_id", *content, *attribute_columns(items)]]


def new_item_features(items: pd.DataFrame, data_dir: Path, layout, work: Path) -> dict:
    """Their features with the prepared DIR's settings, looked up in the model's token layout."""
    import torch

    from odmt_t4r.features import FeatureConfig, build_item_features, load_item_features
    from odmt_t4r.model.modality_store import ModalityStore

    content = [c for c in items.columns if c != "item_id"]
    recorded = load_item_features(data_dir / "features").manifest["config"]
    fcfg = FeatureConfig(**{**recorded, "modalities": tuple(content)})
    frame = items.assign(item_idx=np.arange(RESERVED_ROWS, RESERVED_ROWS + len(items), dtype=np.int64))
    build_item_features(frame, RESERVED_ROWS + len(items), work / "features", fcfg)
    store = ModalityStore.load(work / "features", content, layout=layout)
    return store.lookup(torch.arange(RESERVED_ROWS, RESERVED_ROWS + len(items)))


def served_kinds(run: Path, data_dir: Path) -> dict[str, str]:
    """{attribute: kind} of the RUN's catalog: the prepared DIR's items, then the items added before."""
    from odmt_t4r.contract import PreparedDir
    from odmt_t4r.data.attributes import attribute_kinds

    kinds = attribute_kinds(PreparedDir(data_dir).items())
    if (run / ADDED_ITEMS).is_file():
        kinds = {**attribute_kinds(pd.read_parquet(run / ADDED_ITEMS)), **kinds}
    return kinds


def next_run_path(run: Path) -> Path:
    """RUN.v2, RUN.v3, ...: the first free version next to the RUN (of its base name)."""
    base = re.sub(r"\.v\d+$", "", run.name)
    n = 2
    while (run.parent / f"{base}.v{n}").exists():
        n += 1
    return run.parent / f"{base}.v{n}"


def assumed_train_count(spec: str | float, train_count: np.ndarray) -> float:
    """--assumed-count: "median" (of the prepared catalog's train counts) or a finite number from 0 to the
    catalog's largest train count (a new item is never assumed more popular than the most popular one)."""
    top = float(np.max(train_count)) if len(train_count) else 0.0
    if spec == "median":
        return float(np.median(train_count)) if len(train_count) else 0.0
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and 0 <= value <= max(top, 1.0)):
        raise ValueError(f"--assumed-count must be 'median' or a finite number from 0 to {max(top, 1.0):g} (the "
                         f"largest train count in the catalog), not {spec!r}")
    return value


def add_items(run: str | Path, items_csv: str | Path, out: str | Path | None = None, repo: str | Path | None = None,
              seed: int = 0, check_sessions: int = 20, log=None, assumed_count: str | float = "median",
              force: bool = False) -> dict:
    """Adds the items of `items_csv` to `run` (see the module docstring); returns a summary. With `repo`, the
    repository's writer lock is held from its check to its new manifest, and the new version must descend
    from the served one (repository.check_lineage) unless `force`."""
    from odmt_t4r.output_folder import FolderLock

    if repo is not None and not Path(repo).is_dir():
        raise FileNotFoundError(f"--repo {repo}: no such model repository (write one with `odmt export`)")
    with contextlib.ExitStack() as held:
        lock = held.enter_context(FolderLock(repo)) if repo is not None else None
        return _add_items(Path(run).resolve(), items_csv, out, repo, seed, check_sessions, log, assumed_count,
                          force, lock)


def _add_items(run: Path, items_csv, out, repo, seed, check_sessions, log, assumed_count, force, lock) -> dict:
    import torch

    from odmt_t4r.data.attributes import attribute_kinds, normalize_attributes
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.output_folder import OutputFolder
    from odmt_t4r.trust import verify_prepared, verify_run, write_run_manifest

    say = log or (lambda msg: print(f"[add-items] {msg}", file=sys.stderr, flush=True))
    out = Path(out).resolve() if out else next_run_path(run)
    if out == run:
        raise ValueError(f"--out {out} is the RUN new items are added to; add-items writes a new RUN (omit --out "
                         "for the next free RUN.vN)")
    verify_run(run)  # before model.pt, item_vectors.pt or the added items are read
    data_dir = run_data_dir(run)
    verify_prepared(data_dir)  # its features and catalog are read below
    model = OdmtRecommender.from_pretrained(run, data_dir=data_dir)
    ids = run_item_ids(run, data_dir)
    if len(ids) != model.config.n_index:
        raise ValueError(f"{run} indexes {model.config.n_index} rows but its catalog lists {len(ids)}")
    content = [m for m in model.config.modalities if m != "id"]
    kinds = served_kinds(run, data_dir)
    items = read_new_items(items_csv, content, set(ids[RESERVED_ROWS:].tolist()), kinds)
    first = model.config.n_index
    n_trained = len(catalog_item_ids(data_dir))  # the prepared catalog: items with observed train counts
    count = assumed_train_count(assumed_count, model.train_count[RESERVED_ROWS:n_trained].numpy())
    if repo is not None:
        from triton_models.repository import check_lineage, checked_repository

        repo_manifest = checked_repository(Path(repo))
        new_ids = [str(i) for i in ids[RESERVED_ROWS:]] + items["item_id"].astype(str).tolist()
        try:
            check_lineage(Path(repo).resolve(), repo_manifest, out, model.config.name, data_dir, new_ids)
        except ValueError as exc:
            if not force:
                raise
            say(f"--force: {exc}; replacing it anyway")
    say(f"{len(items):,} new items for {run.name} ({model.config.name}: {', '.join(model.branch_names)}); "
        f"indices {first}..{first + len(items) - 1}")
    with tempfile.TemporaryDirectory(prefix="odmt-add-items-") as tmp:
        feats = new_item_features(items[["item_id", *content]], data_dir, model.config.token_layout(),
                                  Path(tmp)) if content else {}
        with torch.inference_mode(False):
            grown = model.with_added_items(feats, len(items), seed=seed, assumed_count=count)
    parent_added = pd.read_parquet(run / ADDED_ITEMS) if (run / ADDED_ITEMS).is_file() else None
    added = pd.concat([parent_added, items.assign(item_idx=np.arange(first, first + len(items)), assumed_count=count)],
                      ignore_index=True)
    added = normalize_attributes(added, str(items_csv), {**attribute_kinds(items), **kinds})  # one dtype per column
    config = RunFolder(run).config()
    with OutputFolder(out, RUN_FORMAT, what="RUN", log=say, refuse_hint=(
            "Choose another --out, or leave --out out: add-items then writes the next free RUN.vN")) as folder:
        stage = folder.stage
        (stage / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model"}))
        grown.save_pretrained(stage, extra={"parent_run": str(run), "added_items": len(added),
                                            "assumed_count": count})
        added.to_parquet(stage / ADDED_ITEMS, index=False)
        for name in RUN_SIDE_FILES:
            if (run / name).is_file():
                shutil.copyfile(run / name, stage / name)
        write_run_manifest(stage, {"parent_run": str(run), "added_items": len(added)})  # last: hashes, signed
        folder.commit()
    say(f"wrote {out} ({grown.config.n_index - RESERVED_ROWS:,} items)")
    summary = {"run": str(out), "parent_run": str(run), "added": len(items), "n_items": grown.config.n_index - RESERVED_ROWS,
               "first_index": first, "assumed_count": count}
    if repo is not None:
        summary["repo"] = str(Path(repo).resolve())
        from triton_models.export import add_run_version

        summary["repo_version"] = add_run_version(Path(repo), repo_manifest, out, check_sessions, say, lock)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a trained RUN (or one written by add-items)")
    p.add_argument("--items", required=True, help="CSV of new items: item_id, text, image, attributes (the catalog "
                                                  "format); without a since column they arrive now")
    p.add_argument("--out", default=None, help="the new RUN (default: RUN.v2, .v3, ... next to RUN)")
    p.add_argument("--repo", default=None, help="also add the new version to this model repository "
                                                "(a running `odmt serve` on it loads it without a restart)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ID vectors of an xavier-init model")
    p.add_argument("--assumed-count", default="median",
                   help="train count the popularity prior assumes for the new items: 'median' (of the prepared "
                        "catalog: a typical item) or a number; 0 ranks every trained item above them")
    p.add_argument("--force", action="store_true",
                   help="with --repo: publish the new RUN even if it does not descend from the served version "
                        "(other prepared data, another model, or a catalog without some served items)")
    p.add_argument("--check-sessions", type=int, default=20,
                   help="test sessions compared in-process with the model before the repository changes")


def run(args: argparse.Namespace) -> int:
    summary = add_items(args.run, args.items, out=args.out, repo=args.repo, seed=args.seed,
                        check_sessions=args.check_sessions, assumed_count=args.assumed_count, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0
