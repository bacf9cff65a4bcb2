"""`odmt` command line. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`, so stages stay independent (prepare, train, evaluate, export, serve, recommend).

Errors: whatever a stage raises ends as one last stderr line `odmt <command>: error: ...` and exit code
2 (a message's further lines, such as a sample of offending rows, come before it); `--debug` adds the
traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

from odmt_t4r.errors import headline  # what a user error is, and how it reads

# name -> (module, one-line help)
COMMANDS = {
    "prepare": ("odmt_t4r.prepare", "load a source, build item features, run the NVTabular workflows, write DIR"),
    "train": ("odmt_t4r.training.command", "train odmt / sasrec / late-fusion or a model selection on a prepared DIR into RUN"),
    "evaluate": ("odmt_t4r.training.evaluate", "full-ranking HR/NDCG of a RUN on the valid or test split"),
    "add-items": ("odmt_t4r.catalog_update", "add new catalog items to a trained RUN from their content (no retraining)"),
    "update": ("odmt_t4r.training.update_command", "warm-start a trained RUN on a newer prepared DIR (new items, new interactions) into RUN2"),
    "promote": ("odmt_t4r.promote", "publish an updated RUN2 to a live model repository only if it wins on validation"),
    "export": ("triton_models.export", "export a RUN as a Triton model repository (merlin-systems ensemble)"),
    "serve": ("triton_models.server", "start a real Triton server on a model repository"),
    "recommend": ("triton_models.client", "ask a running server for recommendations"),
    "availability": ("triton_models.availability", "change which items a live model repository may serve (no restart, no reload)"),
    "run": ("odmt_t4r.pipeline", "the main job: prepare, train ODMT and a baseline, evaluate, serve on Triton, report"),
    "sign": ("odmt_t4r.trust", "sign a RUN you trust with ODMT_SIGNING_KEY (its files hashed into its manifest)"),
    "report": ("odmt_t4r.report", "write the HTML report (figures, metrics, example sessions) of a finished RUN"),
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
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the command; SUPPRESS keeps a `odmt --debug <command>` from being reset
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an error")
        if name == chosen:  # import only the chosen stage: torch and Merlin imports take seconds
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_error(args.command, exc, debug=args.debug)


def report_error(command: str, exc: BaseException, debug: bool = False) -> int:
    """Prints `exc` so that stderr ends with one line `odmt <command>: error: ...`; returns exit code 2."""
    if debug:
        traceback.print_exc()
    first, details = headline(exc, debug)
    if details:
        print(details, file=sys.stderr)
    print(f"odmt {command}: error: {first}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
