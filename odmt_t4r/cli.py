"""`odmt` command line. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`, so stages stay independent (prepare, train, evaluate, export, serve, recommend)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# name -> (module, one-line help)
COMMANDS = {
    "prepare": ("odmt_t4r.prepare", "load a source, build item features, run the NVTabular workflows, write DIR"),
    "train": ("odmt_t4r.training.train", "train odmt / sasrec / late-fusion on a prepared DIR into RUN"),
    "evaluate": ("odmt_t4r.training.evaluate", "full-ranking HR/NDCG of a RUN on the valid or test split"),
    "export": ("triton_models.export", "export a RUN as a Triton model repository (merlin-systems ensemble)"),
    "serve": ("triton_models.server", "start a real Triton server on a model repository"),
    "recommend": ("triton_models.client", "ask a running server for recommendations"),
}


def _quiet_imports() -> None:
    # Merlin warns at import about TensorFlow and GPU libraries that a CPU install does not have.
    warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="merlin")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="odmt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen stage: torch and Merlin imports take seconds
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
