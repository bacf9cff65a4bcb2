"""`odmt update`'s command line: the update (training/update.py) and, with --repo, the promotion of RUN2 to a live
repository only if it wins on validation (odmt_t4r/promote.py: the same as `odmt promote --run RUN2 --repo REPO`).
Exit codes: 0 (updated; with --repo also published), promote.KEPT_EXIT (updated, the served version kept), 2 (an
error; with --repo, an error after the update leaves RUN2 written and the repository as it was)."""

from __future__ import annotations

import argparse

from odmt_t4r.flags import add_flags, given
from odmt_t4r.promote import PromoteConfig, report, promote

from . import update


def add_arguments(p: argparse.ArgumentParser) -> None:
    update.add_arguments(p)
    group = p.add_argument_group("promotion (with --repo; as `odmt promote --run RUN2 --repo REPO`)")
    group.add_argument("--repo", default=None, help="then publish RUN2 to this live model repository, only if its "
                                                    "validation NDCG@10 on DIR2 is at least the served version's")
    add_flags(group, PromoteConfig)


def run(args: argparse.Namespace) -> int:
    if args.repo is None:
        return update.run(args)
    summary = update.update_from_args(args)
    promotion = promote(summary["run"], args.repo, PromoteConfig(**given(args, PromoteConfig)))
    return report({**promotion, "update": summary})
