"""One tiny `odmt run` (fashion, 120 items, 1 epoch, d_model 16), made once per test session and shared by
tests/test_run_pipeline.py and tests/test_report.py: about a minute on 2 cores, a real Triton server included."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TINY_MODEL = {"d_model": 16, "n_heads": 2, "seq_layers": 1, "imt_layers": 1}
N_ITEMS, SESSIONS, K = 120, 4, 10


@dataclass
class TinyRun:
    work: Path
    args: list[str]  # the `odmt run` arguments; running them again resumes / skips
    stdout: str
    stderr: str


_made: dict[str, TinyRun] = {}


def odmt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`odmt ARGS` in a child process, output captured (so stderr is not a terminal, as in CI logs)."""
    return subprocess.run([sys.executable, "-m", "odmt_t4r.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def tiny_run(tmp_path_factory) -> TinyRun:
    if "run" not in _made:
        root = tmp_path_factory.mktemp("tiny_run")
        (root / "model.json").write_text(json.dumps(TINY_MODEL))
        args = ["run", "--out", str(root / "work"), "--n-items", str(N_ITEMS), "--epochs", "1",
                "--config", str(root / "model.json"), "--sessions", str(SESSIONS), "--k", str(K)]
        done = odmt(*args)
        assert done.returncode == 0, f"odmt run failed:\n{done.stderr[-4000:]}"
        _made["run"] = TinyRun(root / "work", args, done.stdout, done.stderr)
    return _made["run"]
