"""Fault injection for `odmt train`: SIGKILLed at named points and at a random moment, then
`odmt train --resume`; the RUN ends exactly as an uninterrupted run (same summary, same log.jsonl, no
epoch lost or repeated)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from odmt_t4r.output_folder import FAULT_ENV
from odmt_t4r.training import train
from tests.synthetic import make_synthetic_prepared

SEED = int(os.environ.get("ODMT_FAULT_SEED") or random.SystemRandom().randrange(10**6))
FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 16, "eval_batch_size": 64,
        "modalities": ["id", "text"], "epochs": 3, "patience": 100, "progress": False}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_synthetic_prepared(root / "prepared", n_users=40, n_items=20, max_length=6, text_tokens=4,
                                   image_tokens=4, text_dim=16, image_dim=16)
    config = root / "fast.json"
    config.write_text(json.dumps(FAST))
    reference = train.train_run(train.TrainConfig.from_dict(FAST), data, root / "reference", log=lambda *_: None)
    return data, config, root / "reference", reference


def odmt_train(data, config, out, *extra, point=None, kill_after=None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if point:
        env[FAULT_ENV] = point
    cmd = [sys.executable, "-m", "odmt_t4r.cli", "train", "--data", str(data), "--out", str(out), "--config",
           str(config), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out_text, err_text = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out_text, err_text = proc.communicate()
    return proc.returncode, out_text, err_text


def epochs(run):
    return [{k: r[k] for k in ("epoch", "losses", "kd_weight", "valid")}
            for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("point", ["train-before-checkpoint", "train-after-checkpoint", "random"])
def test_a_killed_training_resumes_to_the_uninterrupted_result(setup, tmp_path, point):
    data, config, reference_run, reference = setup
    run = tmp_path / "run"
    if point == "random":
        t0 = time.monotonic()
        code, _, _ = odmt_train(data, config, run, kill_after=random.Random(SEED).uniform(4.0, 14.0))
        print(f"ODMT_FAULT_SEED={SEED}: killed after {time.monotonic() - t0:.1f}s, exit {code}")
    else:
        code, _, err = odmt_train(data, config, run, point=point)
        assert code == -signal.SIGKILL, err
    code, out, err = odmt_train(data, config, run, "--resume")
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(reference, default=str))
    assert epochs(run) == epochs(reference_run)  # every epoch once, the same as without the kill
    assert json.loads((run / "fusion.json").read_text()) == json.loads((reference_run / "fusion.json").read_text())
