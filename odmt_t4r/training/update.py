"""`odmt update`: a trained RUN warm-started on a newer prepared DIR2 (its items plus new items, its interactions
plus new ones), fine-tuned into a new RUN2. RUN is only read, never written.

    odmt update --run RUN --data DIR2 --out RUN2 [--epochs N] [--lr X] [--resume] [--<training setting> ...]

DIR2 comes from `odmt prepare --append-to DIR` (RUN's items keep their indices) or from a fresh prepare of all
the data (the indices reordered): every item is matched through its raw ID (contract.run_item_ids for RUN,
catalog_item_ids for DIR2), never through its index. The update
  1. checks that DIR2 keeps every item RUN scores (those of RUN's DIR and any `odmt add-items` added) and RUN's
     DIR's modalities, history length and feature settings (encoder, token shapes), since RUN's weights are
     carried over: any of them differing is refused with one error line;
  2. builds the model RUN's training settings give on DIR2 (its shapes, its features, its popularity counts,
     so the prior and the logQ correction follow DIR2's train split) and carries RUN's weights into it: every
     weight as it is, the ID table row by row through the raw IDs; a new item's ID vector follows the rule
     `odmt add-items` uses (the content init through RUN's trained projections, or a seeded random vector
     for an xavier-init model: item_tower.new_id_vectors). Before fine-tuning, this model scores RUN's items
     exactly as RUN does, up to the refreshed popularity counts;
  3. fine-tunes it with train.train_run (the same loop as `odmt train`, warm-started: train.WarmStart) on
     DIR2's train split, with early stopping on DIR2's validation split, then chooses the fusion again;
  4. writes RUN2, a whole RUN (evaluate, export, add-items read it as any other) whose config.json records
     `parent_run` (RUN's path) and `update` (RUN's manifest hash, its DIR, the counts of carried and new items,
     the update's settings).
A killed update continues with the same command and `--resume`, exactly as `odmt train --resume` does.

Defaults (UpdateConfig): a shorter budget and patience than a training from scratch, since the model starts near
a good point; RUN's own learning rate, every user's rows. benchmarks/continual.py chose them on validation
(docs/benchmarks/continual.md): x1 beat x0.3 and x2, the recent window lost to replaying every user, and a
ceiling of 6 epochs lost to 10.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from odmt_t4r.contract import (RESERVED_ROWS, RUN_FORMAT, PreparedDir, RunFolder, catalog_item_ids, run_data_dir,
                               run_item_ids)
from odmt_t4r.flags import add_flags, flag, given, typed
from odmt_t4r.model import OdmtConfig, OdmtRecommender
from odmt_t4r.model.prepared import PreparedInfo, read_prepared

from .train import TrainConfig, WarmStart, _log_to_stderr, fresh_model, train_run

ID_TABLE = "item_tower.id_embedding.weight"  # the learned per-item weights: one row per item index
COUNTS = ("train_count", "log_popularity")  # per-item buffers, refreshed from DIR2's train counts
# training settings an update may change (RUN's are kept otherwise; the model's settings always are)
WINDOWS = ("all", "recent")  # UpdateConfig.window
TRAIN_FIELDS = ("seed", "batch_size", "eval_batch_size", "weight_decay", "grad_clip", "stop_on", "fusion_every",
                "fusion_step", "average_epochs", "average_select", "threads", "nproc", "device", "amp")


@dataclass
class UpdateConfig:
    """How RUN is fine-tuned on DIR2; every other setting is RUN's (TRAIN_FIELDS may be given too)."""

    epochs: int = field(default=10, metadata=flag("the fine-tune's epoch ceiling (early stopping on DIR2's "
                                                  "validation split may end it sooner)"))
    patience: int = field(default=3, metadata=flag("epochs without a better valid score before the fine-tune stops"))
    lr: float | None = field(default=None, metadata=flag("the fine-tune's learning rate",
                                                         none="RUN's learning rate x --lr-factor"))
    lr_factor: float = field(default=1.0, metadata=flag("with no --lr: RUN's learning rate times this"))
    window: str = field(default="all", metadata=flag(
        "which train rows the fine-tune replays: all (every user's) or recent (only the users with interactions "
        "that are new in DIR2: cheaper per epoch)", choices=WINDOWS))

    def validate(self) -> "UpdateConfig":
        if self.window not in WINDOWS:
            raise ValueError(f"--window must be one of {list(WINDOWS)}, not {self.window!r}")
        for name in ("epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0 or not self.lr_factor > 0:
            raise ValueError(f"--lr and --lr-factor must be > 0, got {self.lr} and {self.lr_factor}")
        return self

    @classmethod
    def split(cls, settings: dict) -> tuple["UpdateConfig", dict]:
        """{setting: value} -> (the UpdateConfig, the TRAIN_FIELDS given, "progress" included); values type-checked."""
        own = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - own - set(TRAIN_FIELDS) - {"progress"})
        if unknown:
            raise ValueError(f"unknown update settings {unknown}; known: {sorted(own | set(TRAIN_FIELDS))}")
        config = cls(**{k: typed(cls, k, v) for k, v in settings.items() if k in own}).validate()
        return config, {k: typed(TrainConfig, k, v) for k, v in settings.items() if k not in own}


def update_run(run: str | Path, data_dir: str | Path, out: str | Path, settings: dict | None = None,
               resume: bool = False, log=_log_to_stderr) -> dict:
    """Warm-start RUN on DIR2 and fine-tune it into `out` (the module docstring); returns train_run's summary with
    "run", "parent_run", "items_kept" and "items_new". `settings`: UpdateConfig and TRAIN_FIELDS values, and
    "progress". With `resume`, RUN2's saved settings are used (only epochs and progress may change)."""
    from odmt_t4r.trust import verify_prepared, verify_run

    run, out = Path(run).resolve(), Path(out).resolve()
    _check_out(run, out, resume)
    settings = dict(settings or {})
    upd, overrides = UpdateConfig.split(settings)
    if not RunFolder(run).has_model():
        raise FileNotFoundError(f"--run {run} holds no trained model (config.json, model.pt); give a RUN of `odmt train` "
                                "or `odmt add-items`")
    verify_run(run)  # before its config, weights or added items are read
    try:
        parent_dir = run_data_dir(run)
    except FileNotFoundError:
        raise FileNotFoundError(f"--run {run}: its prepared DIR ({RunFolder(run).recorded_data().get('dir')!r}) is "
                                "gone; the update maps RUN's items through its catalog: restore that DIR") from None
    verify_prepared(parent_dir)
    info = read_prepared(data_dir)  # verifies DIR2
    check_same_settings(parent_dir, info.root, run)
    parent = OdmtRecommender.from_pretrained(run, data_dir=parent_dir)
    cfg = fine_tune_config(run, parent, upd, overrides)
    if resume:  # the window RUN2 started with (the training settings are restored by train_run)
        started = ((RunFolder(out).config_or_none() or {}).get("update") or {}).get("settings") or {}
        upd = replace(upd, window=started.get("window", upd.window))
    record = _lineage(run, parent_dir, upd)
    if resume:
        _check_resumed(out, run, record)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        model, kept, new = warm_start_model(run, parent, info, cfg)
    finally:
        torch.set_num_threads(threads_before)
    record["update"].update(items_kept=kept, items_new=new)
    log(f"update of {run} ({cfg.model}): {kept:,} items carried over, {new:,} new ones initialised from their "
        f"{'content' if model.config.id_init == 'content' and model.item_tower.content else 'seeded random ID'}"
        + ("" if resume else f"; fine-tuning on {info.root} for up to {cfg.epochs} epochs at lr {cfg.lr:g}"))
    users = None
    if upd.window == "recent":
        users = torch.from_numpy(recent_users(parent_dir, info.root))
        log(f"recent window: training on the rows of the {len(users):,} users with new interactions")
    summary = train_run(cfg, info.root, out, resume=resume, epochs=settings.get("epochs") if resume else None,
                        log=log, warm_start=WarmStart({k: v.detach().clone() for k, v in model.state_dict().items()},
                                                      record, users))
    return {**(summary or {}), "run": str(out), "parent_run": str(run), "items_kept": kept, "items_new": new}


def _check_out(run: Path, out: Path, resume: bool) -> None:
    """RUN2 is a new folder (or, with --resume, an update started there), neither RUN nor inside or around it."""
    if out == run or run in out.parents or out in run.parents:
        where = "is" if out == run else "is inside" if run in out.parents else "holds"
        raise ValueError(f"--out {out} {where} the --run {run}: an update writes a new RUN and never modifies RUN; "
                         f"choose an --out beside it (e.g. {run.name}.updated)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; pass --resume to continue an update there, or choose "
                              "another --out (update never overwrites a folder)")


def _check_resumed(out: Path, run: Path, record: dict) -> None:
    """A RUN2 resumed with --resume continues an update of this very RUN."""
    saved = RunFolder(out).config_or_none()
    if saved is None or saved.get("format") != RUN_FORMAT:
        return  # nothing saved yet (killed before it wrote config.json): train_run starts it again or refuses
    if saved.get("parent_run") != record["parent_run"]:
        what = f"an update of {saved['parent_run']}" if saved.get("parent_run") else "a run of `odmt train`"
        raise ValueError(f"--out {out} holds {what}, not an update of --run {run}; resume it with its own --run, "
                         "or choose another --out")
    was = (saved.get("update") or {}).get("parent_manifest_sha256")
    if was != record["update"]["parent_manifest_sha256"]:
        raise ValueError(f"--run {run} changed since the update in {out} started from it (its manifest.json differs); "
                         "start the update again into a new --out")


def _lineage(run: Path, parent_dir: Path, upd: UpdateConfig) -> dict:
    """The config.json keys RUN2 records: where its weights came from."""
    from odmt_t4r.output_folder import MANIFEST
    from odmt_t4r.trust import sha256_file

    manifest = run / MANIFEST
    sha = sha256_file(manifest) if manifest.is_file() else None
    return {"parent_run": str(run), "update": {"parent_manifest_sha256": sha, "parent_data": str(parent_dir),
                                               "settings": asdict(upd)}}


def prepared_settings(data_dir: str | Path) -> dict:
    """What a model's weights depend on in a prepared DIR besides its catalog: the modalities, the history length
    and how each modality's frozen features were made (encoder, its setting, the per-item token shapes)."""
    from odmt_t4r.features.store import built_modalities, load_item_features

    prepared = PreparedDir(data_dir)
    manifest = prepared.manifest()
    settings = {"modalities": list(manifest.get("modalities") or ["id"]), "max_length": manifest.get("max_length")}
    if not built_modalities(prepared.features):
        return settings
    features = load_item_features(prepared.features).manifest
    recorded = features.get("config") or {}
    setting = {"text": "max_text_tokens", "image": "image_size"}
    for m, meta in sorted((features.get("modalities") or {}).items()):
        if meta.get("built"):
            settings[f"{m} features"] = {
                "encoder": meta.get("encoder"), setting.get(m, m): recorded.get(setting.get(m, m)),
                "tokens": {name: [*f["shape"][1:], f["dtype"]] for name, f in sorted(meta["files"].items())}}
    return settings


def check_same_settings(parent_dir: Path, data_dir: Path, run: Path) -> None:
    """DIR2 has RUN's DIR's modalities, history length and feature settings (RUN's weights are carried over)."""
    theirs, mine = prepared_settings(parent_dir), prepared_settings(data_dir)
    for key in [*theirs, *(k for k in mine if k not in theirs)]:  # the modalities first
        if theirs.get(key) != mine.get(key):
            raise ValueError(f"--data {data_dir}: {key} {mine.get(key)!r} differs from {theirs.get(key)!r} in "
                             f"{parent_dir}, the prepared DIR of --run {run}; an update carries RUN's weights over, so "
                             f"DIR2 needs DIR's settings: prepare it with `odmt prepare --append-to {parent_dir}`, or "
                             "train a new model with `odmt train`")


def recent_users(parent_dir: Path, data_dir: Path) -> np.ndarray:
    """DIR2's user indices (int64) of the users with an interaction DIR does not have: the rows the recent window
    trains on. Interactions are compared as (user, item, timestamp) multisets, so a fresh prepare of all the data
    works as well as an append."""
    import pandas as pd

    from odmt_t4r.contract import PREPARED_INTERACTIONS
    from workflows.sessions import USER_COL, fitted_vocabulary

    key = ["user_id", "item_id", "timestamp"]
    theirs, mine = (pd.read_parquet(Path(d) / PREPARED_INTERACTIONS, columns=key).astype(str).value_counts()
                    for d in (parent_dir, data_dir))
    grown = mine.sub(theirs, fill_value=0)
    users = set(grown[grown > 0].index.get_level_values("user_id"))
    vocab = fitted_vocabulary(PreparedDir(data_dir).workflow("train"), USER_COL).astype(str)
    rows = np.flatnonzero(vocab.isin(users).to_numpy()) + RESERVED_ROWS
    if not len(rows):
        raise ValueError(f"--data {data_dir} has no interaction that {parent_dir} lacks (or none of its users with new "
                         f"ones has enough interactions to train on): nothing for --window recent to train on; "
                         "use --window all")
    return rows.astype(np.int64)


def fine_tune_config(run: Path, parent: OdmtRecommender, upd: UpdateConfig, overrides: dict) -> TrainConfig:
    """RUN's training settings (its model's preset and modalities), with the update's budget, patience and
    learning rate and the TRAIN_FIELDS given."""
    recorded = RunFolder(run).train_settings()
    base = {k: v for k, v in recorded.items() if k in {f.name for f in fields(TrainConfig)}}  # a removed option: gone
    model_keys = {f.name for f in fields(OdmtConfig)} - set(OdmtConfig.DERIVED)
    model_config = recorded.get("model_config") or asdict(parent.config)
    base["model_config"] = {**{k: v for k, v in model_config.items() if k in model_keys},
                            "modalities": list(parent.config.modalities)}
    base.update(model=parent.config.name, epochs=upd.epochs, patience=upd.patience, **overrides)
    cfg = TrainConfig.from_dict(base)
    cfg.lr = upd.lr if upd.lr is not None else cfg.lr * upd.lr_factor
    return cfg.validate()


def item_rows(run: Path, parent_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RUN's items in DIR2, through their raw IDs: (their RUN rows, their DIR2 rows, the DIR2 rows of the items
    RUN does not have). A DIR2 without some of RUN's items is refused."""
    theirs, mine = run_item_ids(run, parent_dir), catalog_item_ids(data_dir)
    where = {item: row for row, item in enumerate(mine) if item}
    src = np.array([row for row, item in enumerate(theirs) if item], dtype=np.int64)
    missing = [theirs[row] for row in src if theirs[row] not in where]
    if missing:
        raise ValueError(f"--data {data_dir} lacks {len(missing):,} of the {len(src):,} items --run {run} scores "
                         f"(e.g. {missing[:3]}); an update keeps every item: prepare DIR2 with `odmt prepare "
                         f"--append-to {parent_dir}` (it keeps them all), or train a new model with `odmt train`")
    known = set(theirs[src])
    new = np.array([row for row, item in enumerate(mine) if item and item not in known], dtype=np.int64)
    return src, np.array([where[theirs[row]] for row in src], dtype=np.int64), new


def warm_start_model(run: Path, parent: OdmtRecommender, info: PreparedInfo, cfg: TrainConfig,
                     keep_counts: bool = False) -> tuple[OdmtRecommender, int, int]:
    """The model `cfg` builds on DIR2 (`info`: its features and popularity counts) holding RUN's weights (the ID
    table mapped through the raw IDs, new items' ID vectors by add-items' rule), in eval mode with RUN's fusion;
    and the counts of carried-over and new items. With `keep_counts` the popularity counts are RUN's too, and
    a new item gets the count `odmt add-items` assumes (the median): RUN as it serves, on DIR2's catalog."""
    src, dst, new = item_rows(run, run_data_dir(run), info.root)
    model = fresh_model(cfg, info)
    fresh, old = model.state_dict(), parent.state_dict()
    if keep_counts:
        fresh = {**fresh, **_served_counts(old, fresh, src, dst, new)}
    if set(fresh) != set(old):
        odd = sorted(set(fresh) ^ set(old))
        raise ValueError(f"--run {run}'s weights do not fit a {cfg.model} model on {info.root} (weights {odd[:3]} "
                         "differ); it was written by another version of odmt: train a new model with `odmt train`")
    weights = {}
    for name, value in fresh.items():
        w = value if name in COUNTS else old[name]
        if name == ID_TABLE:
            w = value.clone()  # rows of unused indices keep the fresh draw
            w[:RESERVED_ROWS] = old[name][:RESERVED_ROWS]
            w[torch.from_numpy(dst)] = old[name][torch.from_numpy(src)]
            if len(new):
                tower = model.item_tower
                feats = tower.store.lookup(torch.from_numpy(new)) if tower.content else {}
                w[torch.from_numpy(new)] = parent.item_tower.new_id_vectors(feats, len(new), len(w), cfg.seed).to(w.dtype)
        if w.shape != value.shape:
            raise ValueError(f"--run {run}'s weight {name} has shape {tuple(w.shape)}, a {cfg.model} model on "
                             f"{info.root} needs {tuple(value.shape)}; train a new model with `odmt train`")
        weights[name] = w.detach().clone()
    model.load_state_dict(weights)
    model.set_fusion(parent.config.fusion_weights, parent.config.fusion_scores)
    model.eval()
    return model, len(src), len(new)


def _served_counts(old: dict, fresh: dict, src: np.ndarray, dst: np.ndarray, new: np.ndarray) -> dict:
    """RUN's popularity buffers laid out on DIR2's rows; new items at add-items' assumed count (the median)."""
    from odmt_t4r.catalog_update import assumed_train_count

    count = torch.zeros_like(fresh["train_count"])
    count[torch.from_numpy(dst)] = old["train_count"][torch.from_numpy(src)]
    count[torch.from_numpy(new)] = assumed_train_count("median", old["train_count"][torch.from_numpy(src)].numpy())
    return {"train_count": count, "log_popularity": torch.log(count.clamp(min=1.0))}


def served_on(run: str | Path, data_dir: str | Path) -> OdmtRecommender:
    """RUN as it serves today, scoring DIR2's catalog (eval mode): its weights, fusion and popularity counts, and
    DIR2's items it lacks added as `odmt add-items` adds them. What an update is compared with on DIR2's
    validation split (promotion, benchmarks/continual.py's stale arm): the same items, the same rows."""
    run = Path(run).resolve()
    parent_dir = run_data_dir(run)
    info = read_prepared(data_dir)
    check_same_settings(parent_dir, info.root, run)
    parent = OdmtRecommender.from_pretrained(run, data_dir=parent_dir)
    cfg = fine_tune_config(run, parent, UpdateConfig(), {})
    return warm_start_model(run, parent, info, cfg, keep_counts=True)[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the trained RUN to start from (odmt train or add-items); only read")
    p.add_argument("--data", required=True, help="DIR2: a prepared DIR with RUN's items and new ones (odmt prepare "
                                                 "--append-to RUN's DIR, or a fresh prepare of all the data)")
    p.add_argument("--out", required=True, help="RUN2, the updated RUN: a new folder")
    p.add_argument("--resume", action="store_true", help="continue the update in RUN2 from its last finished epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    add_flags(p.add_argument_group("fine-tune settings (default: UpdateConfig)"), UpdateConfig)
    add_flags(p.add_argument_group("training settings (RUN's unless given; the defaults shown are odmt train's)"),
              TrainConfig, only=TRAIN_FIELDS)


def update_from_args(args: argparse.Namespace) -> dict:
    """update_run with the parsed flags of add_arguments; its summary."""
    settings = {**given(args, UpdateConfig), **given(args, TrainConfig, only=TRAIN_FIELDS)}
    if args.no_progress:
        settings["progress"] = False
    return update_run(args.run, args.data, args.out, settings, resume=args.resume)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(update_from_args(args), indent=2, default=str))
    return 0
