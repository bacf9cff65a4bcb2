"""How an error reads: the one rule shared by the CLI entry (odmt_t4r/cli.py) and `odmt run`'s stage
failures (pipeline.py). Bad input, missing or misplaced files (ValueError, OSError) are the user's: the
message is the whole story. Anything else is a bug: it says so and points to --debug."""

from __future__ import annotations

USER_ERRORS = (ValueError, OSError)


def headline(exc: BaseException, debug: bool = False) -> tuple[str, str]:
    """(the one-line headline, the message's further lines) of `exc`."""
    first, _, details = (str(exc).strip() or type(exc).__name__).partition("\n")
    if not isinstance(exc, USER_ERRORS):
        first = f"unexpected {type(exc).__name__}: {first}" + ("" if debug else " (rerun with --debug for the traceback)")
    return first, details
