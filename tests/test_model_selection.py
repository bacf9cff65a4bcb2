"""`odmt train --candidates`: every candidate trained as on its own, the best on validation kept whole."""

import json

import pytest
import torch

from odmt_t4r.model import OdmtRecommender
from odmt_t4r.training import train
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.evaluate import evaluate_model
from odmt_t4r.training.selection import CANDIDATES, SELECTION, choose, read_selection
from tests.test_training import FAST, cli, data_dir, interrupted_then_resumed  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAIR = ["odmt", "odmt-no-imt"]


def quiet(*_):
    return None


def test_choose_takes_the_best_score_and_the_first_listed_on_a_tie():
    assert choose({"odmt": 0.10, "odmt-no-imt": 0.12}) == "odmt-no-imt"
    assert choose({"odmt": 0.12, "odmt-no-imt": 0.12, "sasrec": 0.11}) == "odmt"
    assert choose({"odmt-no-imt": 0.12, "odmt": 0.12}) == "odmt-no-imt"
    with pytest.raises(ValueError):
        choose({})


def test_selection_trains_each_candidate_as_alone_and_keeps_the_best_on_validation(data_dir, tmp_path):
    cfg = dict(FAST, epochs=2, candidates=PAIR)
    summary = train.train_run(train.TrainConfig.from_dict(cfg), data_dir, tmp_path / "sel", log=quiet)
    alone = {m: train.train_run(train.TrainConfig.from_dict(dict(FAST, epochs=2, model=m)), data_dir,
                                tmp_path / m, log=quiet) for m in PAIR}
    scores = {m: alone[m]["fusion"]["valid_NDCG@10"] for m in PAIR}
    assert summary["candidates"] == pytest.approx(scores)  # the same training as each preset on its own
    chosen = max(PAIR, key=lambda m: (scores[m], m == "odmt"))
    assert summary["chosen"] == chosen
    saved = read_selection(tmp_path / "sel")
    assert saved["chosen"] == chosen and saved["train"]["candidates"] == PAIR
    # RUN is a whole RUN of the chosen preset: same weights, same served answers, same validation score
    assert json.loads((tmp_path / "sel" / "config.json").read_text())["train"]["model"] == chosen
    a = torch.load(tmp_path / "sel" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / chosen / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = evaluate_model(OdmtRecommender.from_pretrained(tmp_path / "sel", data_dir=data_dir),
                             PreparedData(data_dir), "valid")
    assert metrics["NDCG@10"] == pytest.approx(scores[chosen])
    assert sorted(p.name for p in (tmp_path / "sel" / CANDIDATES).iterdir()) == sorted(PAIR)


def test_a_killed_selection_resumes_to_the_same_choice(data_dir, tmp_path):
    cfg = dict(FAST, epochs=3, candidates=PAIR)
    straight = train.train_run(train.TrainConfig.from_dict(cfg), data_dir, tmp_path / "a", log=quiet)
    resumed = interrupted_then_resumed(cfg, data_dir, tmp_path / "b")  # killed in the first candidate
    assert resumed["candidates"] == straight["candidates"] and resumed["chosen"] == straight["chosen"]
    # a finished selection resumes to itself, also without repeating --candidates
    again = train.train_run(train.TrainConfig.from_dict(dict(FAST, epochs=3)), data_dir, tmp_path / "b",
                            resume=True, log=quiet)
    assert again["chosen"] == straight["chosen"]


def test_a_selection_folder_is_not_overwritten_and_bad_candidates_are_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli(train, ["--data", data_dir, "--out", out, "--epochs", 1, "--no-progress", "--d-model", 16,
                       "--modalities", "id", "text", "--candidates", "odmt", "odmt-no-imt"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] in PAIR
    assert cli(train, ["--data", data_dir, "--out", out, "--epochs", 1, "--candidates", "odmt", "sasrec"]) == 2
    assert "already holds a model selection; pass --resume" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli(train, ["--data", data_dir, "--out", tmp_path / "mine", "--candidates", "odmt", "sasrec"]) == 2
    assert "is not empty and holds no resumable model selection" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    for bad in (["odmt"], ["odmt", "odmt"], ["odmt", "gru"]):
        assert cli(train, ["--data", data_dir, "--out", tmp_path / "x", "--candidates", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("odmt train: error: candidates must be at least two different presets"), err
    assert not (tmp_path / "x").exists()
    assert (out / SELECTION).is_file()
