"""Choosing the model on the validation split: `odmt train --candidates odmt odmt-imt`.

Each candidate preset is trained with the same settings (seed, budget, every field) into
RUN/candidates/<preset>/, a whole RUN of its own that resumes like any other. Successive halving: all
candidates train `selection_rung` epochs (side by side where the cores allow), the better half on
validation goes on for twice as many, and so on; the last one left trains to the end of its budget (early
stopping), so a losing candidate costs a rung, not a whole run. The candidate whose fused validation NDCG@10
is best at the last rung it reached is copied into RUN (ties go to the earlier candidate), so RUN is a whole
RUN of the chosen preset and every later command reads it as usual. `selection_rung 0` trains every
candidate to the end (the exhaustive choice). RUN/selection.json records the settings, every rung's scores
and the choice; it is written before training (so a killed selection resumes with `--resume`) and holds
the choice only once the copy is complete.

Why: the ID-aware multi-modal transformer (the paper's item tower) leads on some catalogs and independent
per-modality projections on others (README, Quality); the validation split can tell which, per catalog.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from odmt_t4r.contract import CANDIDATES, SELECTION, SELECTION_FORMAT, read_selection
from odmt_t4r.model.prepared import read_prepared
from odmt_t4r.output_folder import atomic_write
from odmt_t4r.parallel import run_jobs, usable_cores

CHOSEN_FILES = ("config.json", "model.pt", "item_vectors.pt", "fusion.json", "log.jsonl")
# named selections, `--model NAME`: the settings that define them win over the user's (as a preset's do)
SELECTION_PRESETS: dict[str, dict] = {
    # the item tower and raw or averaged weights, all chosen on validation (README, Quality)
    "odmt-auto": dict(candidates=["odmt", "odmt-imt"], average_epochs=2.0, average_select=True),
}


def with_preset(settings: dict) -> dict:
    """TrainConfig fields with a named selection's defining settings applied (unchanged for other models)."""
    return {**settings, **SELECTION_PRESETS.get(settings.get("model"), {})}


def choose(scores: dict[str, float]) -> str:
    """The candidate with the best validation score; ties go to the one listed first."""
    if not scores:
        raise ValueError("no candidates to choose from")
    return max(scores, key=scores.get)  # max keeps the first of equal scores


def train_candidates(cfg, data_dir, out: Path, resume: bool, epochs: int | None, log) -> dict | None:
    """Train every candidate of `cfg` (a TrainConfig with `candidates`) into out/candidates/ and keep the best
    on validation. Returns the chosen candidate's summary plus "chosen" and
    "candidates" (name -> valid NDCG@10); None on the ranks of a torchrun group other than 0."""
    from . import distributed
    from .train import TrainConfig

    ranks = distributed.from_environment() or distributed.Ranks()
    saved = read_selection(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if saved is not None:
        if not resume:
            raise FileExistsError(f"{out} already holds a model selection; pass --resume or choose another --out")
        cfg = TrainConfig.from_dict({**saved["train"], "progress": cfg.progress, "candidate_jobs": cfg.candidate_jobs})
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no resumable model selection; choose another --out "
                              "(train never overwrites a folder it cannot resume)")
    if epochs is not None:
        cfg.epochs = epochs
    cfg.validate()
    names = list(cfg.candidates)
    candidate_settings = {k: v for k, v in cfg.to_dict().items()
                          if k not in ("candidates", "candidate_jobs", "selection_rung")}
    data_sha256 = read_prepared(data_dir).manifest_sha256
    if saved is not None and saved.get("data_sha256") != data_sha256:
        raise ValueError(f"{out} was trained on other prepared data (manifest hash differs); cannot resume")
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            atomic_write(out / SELECTION, _payload(cfg, data_sha256, {n: None for n in names}, None, []))
    at_once = jobs_at_once(cfg, ranks)
    quiet_bars = {"progress": False} if at_once > 1 else {}  # side by side, only their epoch lines show
    settings = {name: {**candidate_settings, **quiet_bars, "model": name} for name in names}
    # halving needs every rank's verdict: under torchrun each candidate trains to the end
    alive, rungs, summaries, until = list(names), [], {}, (cfg.selection_rung or None) if ranks.world == 1 else None
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
        scores = {name: float(summaries[name]["fusion"]["valid_NDCG@10"]) for name in alive}
        if last:
            break
        kept = sorted(alive, key=lambda n: (-scores[n], names.index(n)))[: -(-len(alive) // 2)]
        rungs.append({"epochs": pause, "scores": scores, "kept": kept})
        log(f"after {pause} epochs: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + f"; going on: {', '.join(kept)}")
        atomic_write(out / SELECTION, _payload(cfg, data_sha256, _final_scores(names, rungs, {}), None, rungs))
        alive, until = kept, 2 * until
    scores = _final_scores(names, rungs, scores)
    chosen = choose({n: scores[n] for n in alive}) if len(alive) > 1 else alive[0]
    for f in CHOSEN_FILES:  # the chosen RUN's files, then the choice: a reader never sees a half-copied RUN as done
        src = out / CANDIDATES / chosen / f
        atomic_write(out / f, lambda tmp, src=src: shutil.copyfile(src, tmp))
    atomic_write(out / SELECTION, _payload(cfg, data_sha256, scores, chosen, rungs))
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


def jobs_at_once(cfg, ranks) -> int:
    """How many candidates train side by side: `candidate_jobs`, or (0) as many as the cores allow at
    `threads` each. One after another under torchrun, with --nproc or on a GPU (they would share it)."""
    if ranks.world > 1 or cfg.nproc > 1:
        return 1
    if cfg.candidate_jobs:
        return min(cfg.candidate_jobs, len(cfg.candidates))
    if cfg.torch_device().type == "cuda":
        return 1
    return max(1, min(len(cfg.candidates), usable_cores() // max(1, cfg.threads)))


def _train_candidate(settings: dict, data_dir: str, out: str, epochs: int, until: int | None, log) -> dict:
    """One candidate, here or in its own process (parallel.run_jobs): the same training either way."""
    from .train import TrainConfig, train_run
    # our own sub-RUNs: resume a finished, paused or interrupted one, start a new or never-checkpointed one
    return train_run(TrainConfig.from_dict(settings), data_dir, out, resume=True, epochs=epochs, log=log, until=until)


def _payload(cfg, data_sha256: str, scores: dict, chosen: str | None, rungs: list[dict]) -> str:
    return json.dumps({"format": SELECTION_FORMAT, "train": cfg.to_dict(), "data_sha256": data_sha256,
                       "metric": "valid NDCG@10 (fused)", "candidates": scores, "rungs": rungs, "chosen": chosen},
                      indent=2, default=str) + "\n"
