"""`--lr-plateau N`: the learning rate drops by `lr_decay` each time N epochs pass without a valid gain."""

import json

import pytest
import torch

from odmt_t4r.training import command, train
from tests.test_training import FAST, cli, data_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_learning_rate_decays_at_each_plateau_and_the_checkpoint_keeps_it(data_dir, tmp_path):
    # a rate too small to change any ranking: every epoch after the first is without a gain
    cfg = dict(FAST, model="sasrec", epochs=6, lr=1e-9, lr_plateau=2, lr_decay=0.5)
    messages = []
    train.train_run(train.TrainConfig.from_dict(cfg), data_dir, tmp_path / "run", log=messages.append)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    bad, decays = 0, 0
    for record in log:
        bad = 0 if record["improved"] else bad + 1
        decays += bad == 2
    assert decays == 1  # epochs 2-6 without a gain: the counter passes 2 once (patience 100 never ends it)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([0.5e-9, 0.5e-9])
    assert sum("learning rate x0.5" in m for m in messages) == 1


def test_without_lr_plateau_the_rate_is_constant_and_bad_settings_are_refused(data_dir, tmp_path, capsys):
    cfg = dict(FAST, model="sasrec", epochs=3, lr=1e-9)
    train.train_run(train.TrainConfig.from_dict(cfg), data_dir, tmp_path / "run", log=lambda *_: None)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([1e-9, 1e-9])
    for flags in (["--lr-plateau", "-1"], ["--lr-decay", "0"], ["--lr-decay", "1.5"]):
        assert cli(command, ["--data", data_dir, "--out", tmp_path / "x", *flags]) == 2
        assert "need lr_plateau >= 0 and 0 < lr_decay <= 1" in capsys.readouterr().err
