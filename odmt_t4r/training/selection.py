"""Choosing the model on the validation split: `odmt train --candidates odmt odmt-imt`.

Each candidate preset is trained with the same settings (seed, budget, every field) into
RUN/candidates/<preset>/, a whole RUN of its own that resumes like any other. Successive halving: all
candidates train `selection_rung` epochs (side by side where the cores allow), the better half on
validation goes on for twice as many, and so on; the last one left trains to the end of its budget (early
stopping), so a losing candidate costs a rung, not a whole run. The candidate whose fused validation NDCG@10
is best at the last rung it reached is copied into RUN (ties go to the earlier candidate), so RUN is a whole
RUN of the chosen preset and every later command reads it as usual. At a rung candidates are compared by
the best fused valid NDCG@10 of their epochs so far (log.jsonl); at the end by the final fusion's. `selection_rung 0` trains every
candidate to the end (the exhaustive choice). RUN/selection.json records the settings, every rung's scores
and the choice; it is written before training (so a killed selection resumes with `--resume`) and holds
the choice only once the copy is complete.

Selection is a layer above training: it calls `train.train_run` for each candidate and train never calls
back. `train_model` is the one entry that trains what the settings ask for: one model, or a selection
(`candidates`, a named selection such as `--model odmt-auto`, or a RUN that already holds a selection).

Why: the ID-aware multi-modal transformer (the paper's item tower) leads on some catalogs and independent
per-modality projections on others (docs/benchmarks/quality.md); the validation split can tell which, per catalog.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from odmt_t4r.contract import CANDIDATES, RUN_CONFIG, RUN_WEIGHTS, SELECTION, SELECTION_FORMAT, read_selection
from odmt_t4r.flags import typed
from odmt_t4r.model import model_registry
from odmt_t4r.model.prepared import read_prepared
from odmt_t4r.output_folder import atomic_write
from odmt_t4r.parallel import run_jobs, usable_cores
from odmt_t4r.trust import write_run_manifest

from . import distributed
from .train import MODEL_CHOICES as PRESETS
from .train import TrainConfig, _log_to_stderr, train_run

CHOSEN_FILES = (RUN_CONFIG, *RUN_WEIGHTS, "fusion.json", "log.jsonl")


@dataclass
class SelectionConfig:
    """Which presets compete and how; the training settings are one TrainConfig shared by all of them."""

    # presets trained with the same settings into RUN/candidates/; RUN keeps the best on validation
    candidates: list[str]
    # candidates trained side by side, one process each; 0 = as many as the CPU cores allow at `threads`
    # each (one after another with nproc > 1 or on a GPU); 1 = one after another. Results do not change.
    candidate_jobs: int = 0
    # successive halving: every candidate trains this many epochs, the better half on validation twice as
    # many, and so on, the last one to the end; 0 = every candidate trains to the end
    selection_rung: int = 5
    name: str | None = None  # the named selection (`--model odmt-auto`), if it is one

    def validate(self) -> "SelectionConfig":
        c = self.candidates
        if not isinstance(c, list) or any(x not in model_registry for x in c) or len(set(c)) != len(c) or len(c) < 2:
            raise ValueError(f"candidates must be at least two different presets of {sorted(model_registry)}, got {c}")
        if self.candidate_jobs < 0:
            raise ValueError(f"candidate_jobs must be >= 0 (0 = as many as the cores allow), got {self.candidate_jobs}")
        if self.selection_rung < 0:
            raise ValueError(f"selection_rung must be >= 0 (0 = every candidate to the end), got {self.selection_rung}")
        return self


SELECTION_FIELDS = tuple(f.name for f in fields(SelectionConfig) if f.name != "name")
# named selections, `--model NAME`: the settings that define them win over the user's (as a preset's do)
SELECTION_PRESETS: dict[str, dict] = {
    # the item tower chosen on validation (docs/benchmarks/quality.md)
    "odmt-auto": dict(candidates=["odmt", "odmt-imt"]),
}
MODEL_CHOICES = sorted([*PRESETS, *SELECTION_PRESETS])  # a preset, or a named model selection


def resolve(settings: dict) -> tuple[TrainConfig, SelectionConfig | None]:
    """Settings (TrainConfig fields, model fields, selection fields, `model` a preset or a named selection)
    -> the training config and the selection they ask for (None: one model)."""
    settings = dict(settings)
    name = settings.get("model") if settings.get("model") in SELECTION_PRESETS else None
    settings.update(SELECTION_PRESETS.get(name, {}))
    chosen = {k: typed(SelectionConfig, k, settings.pop(k)) for k in SELECTION_FIELDS
              if k in settings and settings[k] is not None}
    if name is not None or "candidates" in chosen:
        selection = SelectionConfig(**chosen, name=name).validate()
        settings["model"] = selection.candidates[0]  # each candidate sets its own preset
        return TrainConfig.from_dict(settings).validate(), selection
    return TrainConfig.from_dict(settings).validate(), None


def recorded_settings(cfg: TrainConfig, selection: SelectionConfig | None) -> dict:
    """What a RUN records as its training settings: the TrainConfig, and a selection's fields and name."""
    if selection is None:
        return cfg.to_dict()
    return {**cfg.to_dict(), **{k: getattr(selection, k) for k in SELECTION_FIELDS},
            "model": selection.name or cfg.model}


def train_model(settings: dict, data_dir, out, resume: bool = False, epochs: int | None = None,
                log=_log_to_stderr) -> dict | None:
    """`odmt train`: one model, or a model selection when the settings ask for one or `out` holds one
    (resumed with its own settings)."""
    cfg, selection = resolve(settings)
    out = Path(out)
    if selection is None and resume and read_selection(out) is not None:
        cfg, selection = _saved(out, cfg, None)
    if selection is None:
        return train_run(cfg, data_dir, out, resume=resume, epochs=epochs, log=log)
    return train_selection(cfg, selection, data_dir, out, resume, epochs, log)


def _saved(out: Path, cfg: TrainConfig, selection: SelectionConfig | None) -> tuple[TrainConfig, SelectionConfig]:
    """A saved selection's settings; how this call runs (progress bars, jobs at once) stays the caller's."""
    saved_cfg, saved_sel = resolve(read_selection(out)["train"])
    saved_cfg.progress = cfg.progress
    if selection is not None:
        saved_sel.candidate_jobs = selection.candidate_jobs
    return saved_cfg, saved_sel


def choose(scores: dict[str, float]) -> str:
    """The candidate with the best validation score; ties go to the one listed first."""
    if not scores:
        raise ValueError("no candidates to choose from")
    return max(scores, key=scores.get)  # max keeps the first of equal scores


def train_selection(cfg: TrainConfig, selection: SelectionConfig, data_dir, out: Path, resume: bool = False,
                    epochs: int | None = None, log=_log_to_stderr) -> dict | None:
    """Train the candidates into out/candidates/ by successive halving and keep the best on validation.
    Returns the chosen candidate's summary plus "chosen" and "candidates" (name -> valid NDCG@10); None on
    the ranks of a torchrun group other than 0."""
    ranks = distributed.from_environment() or distributed.Ranks()
    out = Path(out)
    saved = read_selection(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if saved is not None:
        if not resume:
            raise FileExistsError(f"{out} already holds a model selection; pass --resume or choose another --out")
        cfg, selection = _saved(out, cfg, selection)
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no resumable model selection; choose another --out "
                              "(train never overwrites a folder it cannot resume)")
    if epochs is not None:
        cfg.epochs = epochs
    cfg.validate()
    names = list(selection.candidates)
    data_sha256 = read_prepared(data_dir).manifest_sha256
    if saved is not None and saved.get("data_sha256") != data_sha256:
        raise ValueError(f"{out} was trained on other prepared data (manifest hash differs); cannot resume")
    record = recorded_settings(cfg, selection)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            atomic_write(out / SELECTION, _payload(record, data_sha256, {n: None for n in names}, None, []))
    at_once = jobs_at_once(cfg, selection, ranks)
    quiet_bars = {"progress": False} if at_once > 1 else {}  # side by side, only their epoch lines show
    settings = {name: {**cfg.to_dict(), **quiet_bars, "model": name} for name in names}
    # halving needs every rank's verdict: under torchrun each candidate trains to the end
    alive, rungs, summaries = list(names), [], {}
    until = (selection.selection_rung or None) if ranks.world == 1 else None
    while alive:
        last = len(alive) == 1 or until is None or until >= cfg.epochs
        pause = None if last else until
        jobs = {name: (_train_candidate, (settings[name], str(data_dir), str(out / CANDIDATES / name), cfg.epochs,
                                          pause)) for name in alive}
        if pause:
            log(f"successive halving: {', '.join(alive)} train {pause} epochs, the better half goes on")
        summaries.update(_run_candidates(jobs, at_once, log))
        if not ranks.main:
            return None
        if last:  # the final fusion's valid score (its finer grid)
            scores = {name: float(summaries[name]["fusion"]["valid_NDCG@10"]) for name in alive}
            break
        # at a rung: the best fused valid NDCG@10 of the epochs so far (log.jsonl has it, so the choice can be
        # checked against full runs: benchmarks/quality.py)
        scores = {name: float(summaries[name]["best"]["NDCG@10"]) for name in alive}
        kept = sorted(alive, key=lambda n: (-scores[n], names.index(n)))[: -(-len(alive) // 2)]
        rungs.append({"epochs": pause, "scores": scores, "kept": kept})
        log(f"after {pause} epochs: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + f"; going on: {', '.join(kept)}")
        atomic_write(out / SELECTION, _payload(record, data_sha256, _final_scores(names, rungs, {}), None, rungs))
        alive, until = kept, 2 * until
    scores = _final_scores(names, rungs, scores)
    chosen = choose({n: scores[n] for n in alive}) if len(alive) > 1 else alive[0]
    for f in CHOSEN_FILES:  # the chosen RUN's files, then the choice: a reader never sees a half-copied RUN as done
        src = out / CANDIDATES / chosen / f
        atomic_write(out / f, lambda tmp, src=src: shutil.copyfile(src, tmp))
    atomic_write(out / SELECTION, _payload(record, data_sha256, scores, chosen, rungs))
    write_run_manifest(out)  # the chosen files and the choice, as one finished RUN
    log(f"chose {chosen} on validation: " + ", ".join(f"{n} {s:.4f}" for n, s in scores.items()))
    return {**summaries[chosen], "chosen": chosen, "candidates": scores}


def _run_candidates(jobs: dict, at_once: int, log) -> dict:
    """{name: summary} of each job, side by side (one process each) or one after another here."""
    at_once = min(at_once, len(jobs))
    if at_once > 1:
        log(f"training {len(jobs)} candidates, {at_once} at once (one process each): {', '.join(jobs)}")
        return run_jobs(jobs, at_once, log)
    out = {}
    for i, (name, (fn, args)) in enumerate(jobs.items()):
        log(f"candidate {i + 1}/{len(jobs)}: {name}")
        out[name] = fn(*args, log=lambda m, name=name: log(f"[{name}] {m}"))
    return out


def _final_scores(names: list[str], rungs: list[dict], last: dict) -> dict:
    """Each candidate's valid NDCG@10 at the last rung it reached (None: not scored yet)."""
    scores = {n: None for n in names}
    for rung in rungs:
        scores.update(rung["scores"])
    return {**scores, **last}


def jobs_at_once(cfg: TrainConfig, selection: SelectionConfig, ranks) -> int:
    """How many candidates train side by side: `candidate_jobs`, or (0) as many as the cores allow at
    `threads` each. One after another under torchrun, with --nproc or on a GPU (they would share it)."""
    if ranks.world > 1 or cfg.nproc > 1:
        return 1
    if selection.candidate_jobs:
        return min(selection.candidate_jobs, len(selection.candidates))
    if cfg.torch_device().type == "cuda":
        return 1
    return max(1, min(len(selection.candidates), usable_cores() // max(1, cfg.threads)))


def _train_candidate(settings: dict, data_dir: str, out: str, epochs: int, until: int | None, log) -> dict:
    """One candidate, here or in its own process (parallel.run_jobs): the same training either way."""
    # our own sub-RUNs: resume a finished, paused or interrupted one, start a new or never-checkpointed one
    return train_run(TrainConfig.from_dict(settings), data_dir, out, resume=True, epochs=epochs, log=log, until=until)


def _payload(settings: dict, data_sha256: str, scores: dict, chosen: str | None, rungs: list[dict]) -> str:
    return json.dumps({"format": SELECTION_FORMAT, "train": settings, "data_sha256": data_sha256,
                       "metric": "valid NDCG@10 (fused)", "candidates": scores, "rungs": rungs, "chosen": chosen},
                      indent=2, default=str) + "\n"
