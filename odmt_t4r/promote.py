"""`odmt promote`: publish an updated RUN2 to a live model repository only if it wins on validation.

    odmt promote --run RUN2 --repo REPO [--check-sessions N] [--force]
    odmt update --run RUN --data DIR2 --out RUN2 --repo REPO        (update, then this)

Under the repository's writer lock (a concurrent add-items waits, so nothing moves between the score and the
write), the command
  1. checks the repository (its full check, as `odmt serve` does) and RUN2 (trust.verify_run) before reading them;
  2. checks the promotion lineage: RUN2 is of the served model family, its prepared DIR2 is the served data DIR
     or descends from it through `odmt prepare --append-to` (repository.descends_from), and its catalog holds
     every served item. Anything else is refused with one error line naming what is served and what was
     offered; `--force` replaces what is served on purpose;
  3. scores both on DIR2's validation split (fused NDCG@10, full ranking): RUN2 as it is, and the served RUN as
     it serves (training.update.served_on: its weights and popularity counts, DIR2's new items added by
     add-items' rule), so both rank the same items for the same users;
  4. if RUN2's figure is at least the served one's (or with --force), writes RUN2 as the repository's next
     version (export.add_run_version), which a running `odmt serve` loads without a restart; else the
     repository is left byte for byte as it was.
It prints a JSON summary on stdout (both figures, `promoted`) and exits 0 when promoted, KEPT_EXIT (1) when
the served version is kept; user errors exit 2 as for every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from odmt_t4r.flags import add_flags, flag, given

METRIC, SPLIT = "NDCG@10", "valid"  # the gate: fused NDCG@10 on DIR2's validation split
KEPT_EXIT = 1  # the served version was kept: not an error (2), but a script should see it


@dataclass
class PromoteConfig:
    """How a RUN2 is checked and published (odmt promote, odmt update --repo)."""

    check_sessions: int = field(default=20, metadata=flag(
        "test sessions compared in-process with RUN2 before the repository changes"))
    force: bool = field(default=False, metadata=flag(
        "publish RUN2 whatever its lineage and figures (other prepared data, another model family, a catalog "
        "without some served items, a lower score); both figures are still reported"))


def promote(run: str | Path, repo: str | Path, cfg: PromoteConfig | None = None, log=None) -> dict:
    """Publishes `run` (RUN2) to `repo` if it wins (the module docstring); returns the summary."""
    from odmt_t4r.output_folder import FolderLock

    cfg = cfg or PromoteConfig()
    say = log or (lambda msg: print(f"[promote] {msg}", file=sys.stderr, flush=True))
    run, repo = Path(run).resolve(), Path(repo).resolve()
    if not repo.is_dir():
        raise FileNotFoundError(f"--repo {repo}: no such model repository (write one with `odmt export`)")
    with FolderLock(repo) as lock:  # held from the check to the new manifest: add-items cannot slip in
        return _promote(run, repo, cfg, say, lock)


def _promote(run: Path, repo: Path, cfg: PromoteConfig, say, lock) -> dict:
    from odmt_t4r.output_folder import fault_point
    from triton_models.export import add_run_version
    from triton_models.repository import checked_repository

    manifest = checked_repository(repo)
    data_dir, served_run = checked_offer(run, repo, manifest, cfg.force, say)
    figures = {"candidate": score_run(run, data_dir), "served": score_served(served_run, data_dir, cfg.force, say)}
    wins = figures["served"] is None or figures["candidate"] >= figures["served"]
    summary = {"promoted": bool(wins or cfg.force), "forced": cfg.force, "metric": f"fused {METRIC}", "split": SPLIT,
               "data": str(data_dir), "run": str(run), "run_score": figures["candidate"],
               "served_run": str(served_run), "served_score": figures["served"], "repo": str(repo),
               "served_version": manifest.get("version", 1)}
    verdict = (f"{METRIC} on {data_dir.name}/{SPLIT}: {run.name} {figures['candidate']:.4f}, served {served_run.name} "
               + ("not scored" if figures["served"] is None else f"{figures['served']:.4f}"))
    if not summary["promoted"]:
        say(f"{verdict}: keeping version {summary['served_version']} ({repo} is unchanged)")
        return summary
    say(f"{verdict}: {'--force, ' if cfg.force and not wins else ''}publishing {run.name}")
    fault_point("promote-before-write")
    summary["version"] = add_run_version(repo, manifest, run, cfg.check_sessions, say, lock)
    return summary


def checked_offer(run: Path, repo: Path, manifest: dict, force: bool, say) -> tuple[Path, Path]:
    """(RUN2's DIR2, the served RUN) once RUN2 and DIR2 pass their manifest checks and RUN2 the promotion lineage
    (or `force` says to replace it)."""
    from odmt_t4r.contract import RESERVED_ROWS, RunFolder, run_data_dir, run_item_ids
    from odmt_t4r.trust import verify_prepared, verify_run
    from triton_models.repository import check_lineage

    if not RunFolder(run).has_model():
        raise FileNotFoundError(f"--run {run} holds no trained model (config.json, model.pt); give the RUN2 "
                                "`odmt update` wrote")
    verify_run(run)  # before its config, weights or catalog are read
    data_dir = run_data_dir(run)
    verify_prepared(data_dir)
    served_run = Path(manifest.get("run") or "")
    if served_run == run:
        raise ValueError(f"{repo} already serves --run {run} (version {manifest.get('version', 1)}); promote the "
                         "RUN2 of a newer `odmt update`")
    model = (RunFolder(run).config().get("model") or {}).get("name")
    hint = (f"Update the RUN it serves (odmt update --run {served_run} --data DIR2, DIR2 from odmt prepare --append-to "
            f"{manifest.get('data_dir')}), or pass --force to replace what it serves on purpose")
    try:
        check_lineage(repo, manifest, run, model, data_dir, [str(i) for i in run_item_ids(run)[RESERVED_ROWS:]],
                      descendant=True, hint=hint)
    except ValueError as exc:
        if not force:
            raise
        say(f"--force: {exc}; replacing it anyway")
    return data_dir, served_run


def score_run(run: Path, data_dir: Path) -> float:
    """RUN2's fused validation NDCG@10 on its own DIR2."""
    from odmt_t4r.model import OdmtRecommender

    return _score(OdmtRecommender.from_pretrained(run, data_dir=data_dir), data_dir)


def score_served(served_run: Path, data_dir: Path, force: bool, say) -> float | None:
    """The served RUN as it serves, scored on DIR2 (None, with --force, when it cannot score DIR2's catalog)."""
    from odmt_t4r.training.update import served_on
    from odmt_t4r.trust import verify_run

    verify_run(served_run)  # its weights are read
    try:
        return _score(served_on(served_run, data_dir), data_dir)
    except ValueError as exc:
        if not force:
            raise
        say(f"--force: the served RUN cannot be scored on {data_dir} ({exc})")
        return None


def _score(model, data_dir: Path) -> float:
    import torch

    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_model

    with torch.no_grad():
        return float(evaluate_model(model, PreparedData(data_dir), SPLIT)[METRIC])


def report(summary: dict) -> int:
    """Prints the summary on stdout; returns the exit code: 0 (published) or KEPT_EXIT (the served version kept)."""
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["promoted"] else KEPT_EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="RUN2: the updated RUN to publish (odmt update's --out)")
    p.add_argument("--repo", required=True, help="the live model repository (odmt export; a running `odmt serve` on "
                                                 "it loads the new version without a restart)")
    add_flags(p, PromoteConfig)


def run(args: argparse.Namespace) -> int:
    return report(promote(args.run, args.repo, PromoteConfig(**given(args, PromoteConfig))))
