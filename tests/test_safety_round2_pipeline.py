"""Production safety, round 2 (issue 20), `odmt run`'s work folder: a stage's inputs include the photos its
items file points to; a user's file in WORK is moved aside, never deleted; SIGTERM ends with a last line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from odmt_t4r.prepare import PrepareConfig
from odmt_t4r.pipeline import RunOptions, _digest, _remove_run, prepare_stage


def test_a_changed_photo_changes_the_prepare_stage_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "photos").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(src / "photos" / f"{i}.png")
    pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"],
                  "image": [f"photos/{i}.png" for i in range(3)]}).to_csv(src / "items.csv", index=False)
    pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3]}).to_csv(
        src / "inter.csv", index=False)
    options = RunOptions(out=str(tmp_path / "work"), prepare=PrepareConfig(
        source="csv", interactions=str(src / "inter.csv"), items=str(src / "items.csv")))
    before = _digest(prepare_stage(options, tmp_path / "work").inputs)
    assert _digest(prepare_stage(options, tmp_path / "work").inputs) == before  # nothing changed: skipped
    Image.new("L", (8, 8), color=255).save(src / "photos" / "1.png")  # same path, new photo
    assert _digest(prepare_stage(options, tmp_path / "work").inputs) != before


def test_retraining_moves_a_run_holding_a_users_file_aside(tmp_path, capsys):
    run = tmp_path / "runs" / "odmt"
    (run / "candidates" / "odmt").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format": "odmt-run/1"}))
    (run / "model.pt").write_bytes(b"weights")
    (run / "metrics-test.json").write_text("{}")
    (run / "candidates" / "odmt" / "model.pt").write_bytes(b"w")
    (run / "my-notes.txt").write_text("keep me")
    _remove_run(run)
    assert not run.exists()
    (backup,) = (tmp_path / "runs").glob("odmt.backup-*")
    assert (backup / "my-notes.txt").read_text() == "keep me"
    assert "my-notes.txt" in capsys.readouterr().err
    # a RUN of odmt's own files only is cleared as before
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"format": "odmt-run/1"}))
    (run / "checkpoint.pt").write_bytes(b"c")
    _remove_run(run)
    assert not run.exists() and len(list((tmp_path / "runs").glob("odmt.backup-*"))) == 1


def test_odmt_run_under_sigterm_ends_with_a_line_that_says_how_to_resume(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"d_model": 16, "n_heads": 2, "seq_layers": 1, "imt_layers": 1}))
    proc = subprocess.Popen([sys.executable, "-m", "odmt_t4r.cli", "run", "--out", str(tmp_path / "work"),
                             "--n-items", "60", "--epochs", "500", "--config", str(tmp_path / "model.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any("train-odmt: running" in line for line in lines):
        time.sleep(0.2)
    assert any("train-odmt: running" in line for line in lines), "".join(lines)[-3000:]
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    reader.join(10)
    assert "run the same `odmt run` command again to resume" in lines[-1], "".join(lines)[-2000:]
    assert any("interrupted in stage 'train-odmt'" in line for line in lines)
