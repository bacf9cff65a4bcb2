"""`odmt train`: fit odmt / sasrec / late-fusion / a model selection on a prepared DIR into a RUN folder.

    odmt train --data DIR --model odmt --out RUN [--config FILE.json] [--epochs N] [--seed S] [--resume]
               [--<any TrainConfig, OdmtConfig or SelectionConfig field>, e.g. --d-model 128 --candidates ...]

One model: training/train.py (its docstring describes RUN). A model selection (`--candidates A B`,
`--model odmt-auto`): training/selection.py. Flags are generated from those dataclasses (odmt_t4r/flags.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from odmt_t4r.flags import add_flags, given
from odmt_t4r.model import OdmtConfig

from .selection import MODEL_CHOICES, SelectionConfig, train_model
from .train import TrainConfig

# fields with a hand-written flag below, or not set from the command line
TRAIN_FLAGS_SKIP = ("model", "model_config", "extra", "progress", "epochs", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a prepared DIR (odmt prepare)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="default: odmt; odmt-auto: odmt and odmt-imt by successive halving on validation")
    p.add_argument("--out", required=True, help="the RUN folder")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (model fields flat or "
                                                  "under model_config); flags win over it")
    p.add_argument("--epochs", type=int, default=None, help="the epoch ceiling (early stopping ends runs)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue RUN from its last finished epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    add_flags(p.add_argument_group("training settings (default: TrainConfig)"), TrainConfig, TRAIN_FLAGS_SKIP)
    add_flags(p.add_argument_group("model settings (default: OdmtConfig)"), OdmtConfig, OdmtConfig.DERIVED)
    add_flags(p.add_argument_group("model selection (default: SelectionConfig)"), SelectionConfig, ("name",))


def read_config_file(path: str | None) -> dict:
    """The TrainConfig / OdmtConfig fields of a --config JSON file ({} without one)."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path} is not valid JSON ({exc})") from exc
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path} must hold a JSON object of TrainConfig fields")
    return settings


def settings_from_args(args: argparse.Namespace) -> dict:
    """The --config file, then every flag given on the command line."""
    settings = read_config_file(getattr(args, "config", None))
    for key in ("model", "seed"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    settings.update(given(args, TrainConfig, TRAIN_FLAGS_SKIP))
    settings.update(given(args, OdmtConfig, OdmtConfig.DERIVED))
    settings.update(given(args, SelectionConfig, ("name",)))
    if getattr(args, "no_progress", False):
        settings["progress"] = False
    return settings


def run(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    summary = train_model(settings_from_args(args), args.data, args.out, resume=args.resume, epochs=args.epochs)
    print(json.dumps(summary, indent=2, default=str))
    return 0
