"""`odmt availability`: which items a live model repository may serve, changed without a restart or a reload.

    odmt availability --repo REPO --unavailable IDS.csv [--replace]   these items may no longer be served
    odmt availability --repo REPO --available IDS.csv                 these items may be served again
    odmt availability --repo REPO --show                              print the current state

IDS.csv: a CSV with an `item_id` column (raw item IDs, kept exactly as written), or a one-column file of IDs
with that header. The state is one file, REPO/availability.json (AVAILABILITY_FORMAT): the sorted raw IDs that
may not be served, a sequence number and when it changed. It is recorded in the repository's manifest like
every other file (signed when ODMT_SIGNING_KEY is set), so `odmt serve` checks it at start.

A running server picks a change up on its next request: the executor model looks at the file's stamp (one
stat) on every execute and reloads it when it changed; nothing else reloads (VersionWatcher in server.py tells
an availability change from a new version and does not reload the model). When the command has returned, no
request executed afterwards returns an unavailable item: the unavailable items are excluded before the top-k,
like a request's own `exclude_ids`, on the exact scan and on HNSW.

Refused with one error line, the state unchanged: an ID the served version does not hold (a typo would
otherwise silently hide nothing), an empty or unreadable file, a repository that fails its check. The
repository's writer lock covers the change, so it never interleaves with `add-items --repo` or a promotion.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

AVAILABILITY = "availability.json"  # REPO/availability.json; the executor model reads it (executor_model.py)
AVAILABILITY_FORMAT = "odmt-availability/1"


def read_availability(repo: str | Path) -> dict:
    """The repository's availability state: {"format", "unavailable": sorted raw IDs, "sequence", "changed_at"}
    (every item available, sequence 0, when the file is absent)."""
    path = Path(repo) / AVAILABILITY
    if not path.is_file():
        return {"format": AVAILABILITY_FORMAT, "unavailable": [], "sequence": 0, "changed_at": None}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); restore it from the repository's manifest or remove "
                         "it with --available on every item") from None
    if not isinstance(state, dict) or state.get("format") != AVAILABILITY_FORMAT \
            or not isinstance(state.get("unavailable"), list):
        raise ValueError(f"{path} is not an availability file ({AVAILABILITY_FORMAT})")
    return state


def read_ids(path: str | Path) -> list[str]:
    """IDS.csv's raw item IDs (column `item_id`), as written; refused when the file is missing, empty, has no
    item_id column or an empty ID."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (a CSV with an item_id column)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: give a CSV with an item_id column and one row per item") from None
    except Exception as exc:  # a corrupt file: say which one
        raise ValueError(f"{path} cannot be read as CSV: {exc}") from None
    if "item_id" not in frame:
        raise ValueError(f"{path} has no item_id column (columns: {list(frame.columns)[:5]})")
    ids = frame["item_id"].tolist()
    if not ids:
        raise ValueError(f"{path} lists no items")
    if any(i == "" for i in ids):
        raise ValueError(f"{path}: row {ids.index('') + 2} has an empty item_id")
    return list(dict.fromkeys(ids))


def set_availability(repo: str | Path, unavailable: list[str] | None = None, available: list[str] | None = None,
                     replace: bool = False, log=None) -> dict:
    """Change which items REPO may serve (module docstring): `unavailable` IDs are added to the unavailable set
    (with `replace`, the set becomes exactly them), `available` IDs are taken out of it. Returns a summary."""
    from odmt_t4r.output_folder import FolderLock, atomic_write
    from odmt_t4r.trust import write_manifest
    from triton_models.repository import checked_repository, served_item_ids

    say = log or (lambda m: print(m, file=sys.stderr))
    if (unavailable is None) == (available is None):
        raise ValueError("give exactly one of --unavailable IDS.csv and --available IDS.csv")
    if replace and unavailable is None:
        raise ValueError("--replace goes with --unavailable (the unavailable set becomes exactly its items)")
    repo = Path(repo).resolve()
    with FolderLock(repo):
        manifest = checked_repository(repo)
        if "availability" not in (manifest.get("capabilities") or []):
            raise ValueError(f"{repo} serves version {manifest.get('version', 1)}, exported by an odmt whose executor "
                             "does not read an availability file: export the RUN again with this odmt (or add a "
                             "version with `odmt add-items --repo`), then set the availability")
        state = read_availability(repo)
        served = served_item_ids(repo, manifest)
        if served is None:
            raise ValueError(f"{repo}: the served catalog cannot be read, so the IDs cannot be checked; export the "
                             "repository again with `odmt export`")
        given = unavailable if unavailable is not None else available
        known = set(served)
        unknown = [i for i in given if i not in known]
        if unknown:
            raise ValueError(f"{len(unknown):,} of the {len(given):,} IDs are not served by {repo} (version "
                             f"{manifest.get('version', 1)}, {len(served):,} items), e.g. {unknown[:3]}; nothing "
                             "changed: fix the file and run the command again")
        before = set(state["unavailable"])
        after = set(given) if replace else before | set(given) if unavailable is not None else before - set(given)
        new = {"format": AVAILABILITY_FORMAT, "unavailable": sorted(after), "sequence": int(state["sequence"]) + 1,
               "changed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write(repo / AVAILABILITY, json.dumps(new, indent=1) + "\n")  # what the executor reads
        write_manifest(repo, {k: v for k, v in manifest.items() if k not in ("files", "signature")})
    summary = {"repo": str(repo), "unavailable": len(after), "made_unavailable": len(after - before),
               "made_available": len(before - after), "served_items": len(served), "sequence": new["sequence"]}
    say(f"{repo}: {summary['unavailable']:,} of {len(served):,} items unavailable (+{summary['made_unavailable']:,} "
        f"-{summary['made_available']:,}); a running `odmt serve` applies it from its next request")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, help="the live model repository (odmt export)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--unavailable", metavar="IDS.csv", help="items that may no longer be served (CSV, item_id)")
    which.add_argument("--available", metavar="IDS.csv", help="items that may be served again (CSV, item_id)")
    which.add_argument("--show", action="store_true", help="print the current state (JSON) and change nothing")
    p.add_argument("--replace", action="store_true",
                   help="with --unavailable: the unavailable set becomes exactly these items")


def run(args: argparse.Namespace) -> int:
    if args.show:
        if not Path(args.repo).is_dir():
            raise FileNotFoundError(f"--repo {args.repo}: no such model repository")
        state = read_availability(args.repo)
        print(json.dumps({**state, "unavailable_count": len(state["unavailable"])}, indent=2))
        return 0
    summary = set_availability(args.repo, read_ids(args.unavailable) if args.unavailable else None,
                               read_ids(args.available) if args.available else None, replace=args.replace)
    print(json.dumps(summary, indent=2))
    return 0
