"""Fault injection: `odmt prepare` and `odmt export` SIGKILLed at random points and around the swap.

After every kill the output folder is either the previous good output, byte for byte, or the new one,
complete: its manifest is there and every file matches its recorded sha256. Never a half-written folder.
The next run cleans up what the killed one left next to the folder. (Training is covered with train.)

Each run kills a few subprocesses at random moments (seeded; set ODMT_FAULT_SEED to replay a failure)
and at the named points of odmt_t4r/output_folder.py (ODMT_FAULT_POINT): before the swap, right
after it, and halfway through deleting the old output.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odmt_t4r.output_folder import FAULT_ENV
from odmt_t4r.trust import SIGNING_KEY_ENV, verify_folder
from tests.tiny_data import prepare_tiny, untrained_run, write_csv_source

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("ODMT_FAULT_SEED") or random.SystemRandom().randrange(10**6))
POINTS = [("before-swap", "old"), ("after-swap", "new"), ("removing-old", "new")]

pytestmark = pytest.mark.slow


def _env(point: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, SIGNING_KEY_ENV)}
    return {**env, FAULT_ENV: point} if point else env


def _run(cmd: list[str], point: str | None = None, kill_after: float | None = None) -> tuple[int, float]:
    """Runs `cmd`; SIGKILLs it after `kill_after` seconds if it is still running. (exit code, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(point), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode, time.monotonic() - t0


def _state(out: Path, fmt: str, strict: bool) -> bytes:
    """The folder's manifest, after checking every recorded file (raises when half written)."""
    verify_folder(out, fmt, "output", strict=strict)
    return (out / "manifest.json").read_bytes()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.odmt-*"))


def _kill_everywhere(out: Path, fmt: str, strict: bool, command, field: str, start: int) -> None:
    """command(value) -> argv writing `out` with manifest[field] == value. Runs it to completion once,
    then killed at the named points and at random moments, then to completion again."""
    import json

    rng = random.Random(SEED)
    rc, full = _run(command(start))
    assert rc == 0
    current = _state(out, fmt, strict)
    trials = [(point, None, expect) for point, expect in POINTS]
    trials += [(None, rng.uniform(0.3, 1.0) * full, None) for _ in range(2)]
    for n, (point, delay, expect) in enumerate(trials, start=1):
        value = start + n
        rc, _ = _run(command(value), point=point, kill_after=delay)
        where = f"seed {SEED}, trial {n}: killed at {point or f'{delay:.2f}s of {full:.2f}s'} (rc {rc})"
        state = _state(out, fmt, strict)  # never half written
        is_new = json.loads(state)[field] == value
        assert state == current or is_new, where
        if expect is not None:
            assert rc == -signal.SIGKILL and ("new" if is_new else "old") == expect, where
        current = state
    rc, _ = _run(command(start + len(trials) + 1))
    assert rc == 0 and json.loads(_state(out, fmt, strict))[field] == start + len(trials) + 1
    assert _leftovers(out) == []


def test_prepare_killed_anywhere_leaves_the_old_or_the_new_folder(tmp_path):
    source = write_csv_source(tmp_path / "inputs", n_items=12, n_users=30, length=8)
    out = tmp_path / "prepared"

    def command(max_length: int) -> list[str]:
        return [sys.executable, "-m", "odmt_t4r.cli", "prepare", *source, "--no-features",
                "--max-length", str(max_length), "--out", str(out)]

    _kill_everywhere(out, "odmt-prepared/1", False, command, "max_length", 2)


def test_export_killed_anywhere_leaves_the_old_or_the_new_repository(tmp_path):
    data = prepare_tiny(tmp_path / "inputs", tmp_path / "prepared")
    run = untrained_run(data, tmp_path / "run")
    out = tmp_path / "repo"

    def command(k: int) -> list[str]:
        return [sys.executable, "-m", "odmt_t4r.cli", "export", "--run", str(run), "--data", str(data),
                "--k", str(k), "--check-sessions", "5", "--out", str(out)]

    _kill_everywhere(out, "odmt-triton-repo/1", True, command, "k", 1)
