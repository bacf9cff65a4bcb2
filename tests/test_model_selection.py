"""`odmt train --candidates`: every candidate trained as on its own, the best on validation kept whole."""

import json
import shutil

import pytest
import torch

from odmt_t4r.model import OdmtRecommender
from odmt_t4r.training import command
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.evaluate import evaluate_model
from odmt_t4r.training.selection import (CANDIDATES, SELECTION, choose, read_selection, recorded_settings, resolve,
                                         train_model)
from tests.test_training import FAST, cli, data_dir, interrupted_then_resumed  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAIR = ["odmt", "odmt-imt"]


def quiet(*_):
    return None


def test_choose_takes_the_best_score_and_the_first_listed_on_a_tie():
    assert choose({"odmt": 0.10, "odmt-imt": 0.12}) == "odmt-imt"
    assert choose({"odmt": 0.12, "odmt-imt": 0.12, "sasrec": 0.11}) == "odmt"
    assert choose({"odmt-imt": 0.12, "odmt": 0.12}) == "odmt-imt"
    with pytest.raises(ValueError):
        choose({})


def test_selection_trains_each_candidate_as_alone_and_keeps_the_best_on_validation(data_dir, tmp_path):
    cfg = dict(FAST, epochs=2, candidates=PAIR)
    summary = train_model(cfg, data_dir, tmp_path / "sel", log=quiet)
    alone = {m: train_model(dict(FAST, epochs=2, model=m), data_dir,
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


def test_successive_halving_stops_the_loser_after_a_rung_and_trains_the_winner_as_alone(data_dir, tmp_path):
    cfg = dict(FAST, epochs=4, candidates=PAIR, selection_rung=1)
    summary = train_model(cfg, data_dir, tmp_path / "sel", log=quiet)
    saved = read_selection(tmp_path / "sel")
    (rung,) = saved["rungs"]  # two candidates: one rung, then the winner alone
    assert rung["epochs"] == 1 and set(rung["scores"]) == set(PAIR)
    winner = max(PAIR, key=lambda m: (rung["scores"][m], m == PAIR[0]))
    loser = next(m for m in PAIR if m != winner)
    assert rung["kept"] == [winner] and summary["chosen"] == saved["chosen"] == winner
    epochs = {m: len((tmp_path / "sel" / CANDIDATES / m / "log.jsonl").read_text().splitlines()) for m in PAIR}
    assert epochs == {loser: 1, winner: 4}  # the loser cost one epoch
    assert summary["candidates"][loser] == pytest.approx(rung["scores"][loser])
    # the winner paused after the rung and resumed is the same model as trained straight through alone
    alone = train_model(dict(FAST, epochs=4, model=winner), data_dir,
                            tmp_path / winner, log=quiet)
    assert summary["candidates"][winner] == pytest.approx(alone["fusion"]["valid_NDCG@10"])
    a = torch.load(tmp_path / "sel" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / winner / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_selection_resumes_to_the_same_choice(data_dir, tmp_path):
    cfg = dict(FAST, epochs=3, candidates=PAIR)
    straight = train_model(cfg, data_dir, tmp_path / "a", log=quiet)
    resumed = interrupted_then_resumed(cfg, data_dir, tmp_path / "b")  # killed in the first candidate
    assert resumed["candidates"] == straight["candidates"] and resumed["chosen"] == straight["chosen"]
    # a finished selection resumes to itself, also without repeating --candidates
    again = train_model(dict(FAST, epochs=3), data_dir, tmp_path / "b",
                            resume=True, log=quiet)
    assert again["chosen"] == straight["chosen"]


def test_a_selection_folder_is_not_overwritten_and_bad_candidates_are_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "sel"
    assert cli(command, ["--data", data_dir, "--out", out, "--epochs", 1, "--no-progress", "--d-model", 16,
                       "--modalities", "id", "text", "--candidates", "odmt", "odmt-imt"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] in PAIR
    assert cli(command, ["--data", data_dir, "--out", out, "--epochs", 1, "--candidates", "odmt", "sasrec"]) == 2
    assert "already holds a model selection; pass --resume" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli(command, ["--data", data_dir, "--out", tmp_path / "mine", "--candidates", "odmt", "sasrec"]) == 2
    assert "is not empty and holds no resumable model selection" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    for bad in (["odmt"], ["odmt", "odmt"], ["odmt", "gru"]):
        assert cli(command, ["--data", data_dir, "--out", tmp_path / "x", "--candidates", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("odmt train: error: candidates must be at least two different presets"), err
    assert not (tmp_path / "x").exists()
    assert (out / SELECTION).is_file()


def test_odmt_auto_is_a_named_selection_whose_settings_win(data_dir, tmp_path):
    settings = dict(FAST, model="odmt-auto", epochs=2, candidates=["odmt", "sasrec"], lr=2e-3)
    cfg, selection = resolve(settings)
    assert selection.candidates == ["odmt", "odmt-imt"] and selection.name == "odmt-auto" and cfg.lr == 2e-3
    summary = train_model(settings, data_dir, tmp_path / "auto", log=quiet)
    assert summary["chosen"] in PAIR and set(summary["candidates"]) == set(PAIR)
    for name in PAIR:  # each candidate trained with the caller's other settings
        trained = json.loads((tmp_path / "auto" / CANDIDATES / name / "config.json").read_text())["train"]
        assert trained["model"] == name and trained["lr"] == 2e-3 and "candidates" not in trained
    assert read_selection(tmp_path / "auto")["train"]["model"] == "odmt-auto"


def test_a_selection_on_other_data_is_not_resumed(data_dir, tmp_path):
    from tests.synthetic import make_synthetic_prepared

    cfg = dict(FAST, epochs=1, candidates=PAIR)
    train_model(cfg, data_dir, tmp_path / "sel", log=quiet)
    other = make_synthetic_prepared(tmp_path / "other", n_users=30, n_items=18, max_length=6, text_tokens=5,
                                    image_tokens=4, text_dim=24, image_dim=32, jump=0.05)
    with pytest.raises(ValueError, match="other prepared data"):
        train_model(cfg, other, tmp_path / "sel", resume=True, log=quiet)


def test_odmt_run_resumes_a_selection_with_the_same_settings_and_clears_one_killed_early(data_dir, tmp_path):
    from odmt_t4r import pipeline
    from odmt_t4r.model.prepared import read_prepared

    settings = dict(FAST, model="odmt-auto", epochs=1)
    record = recorded_settings(*resolve(settings))
    sha = read_prepared(data_dir).manifest_sha256
    run = tmp_path / "runs" / "odmt-auto"
    train_model(settings, data_dir, run, log=quiet)
    assert pipeline._resumable(run, record, sha)
    assert not pipeline._resumable(run, recorded_settings(*resolve(dict(settings, seed=7))), sha)
    assert not pipeline._resumable(run, record, "another manifest")
    for f in [p for p in run.iterdir() if p.name != SELECTION]:  # as if killed before the first candidate
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    pipeline._remove_run(run)  # a selection folder is the project's own: cleared, not refused
    assert not run.exists()


def test_the_report_names_the_chosen_model_and_every_candidate_score(data_dir, tmp_path):
    from odmt_t4r.report import RunView, facts_html

    summary = train_model(dict(FAST, epochs=1, candidates=PAIR), data_dir,
                              tmp_path / "sel", log=quiet)
    page = facts_html(RunView(tmp_path / "sel"), None, None)
    scores = ", ".join(f"{n} {s:.4f}" for n, s in summary["candidates"].items())
    assert f"{summary['chosen']} of {scores} (valid NDCG@10)" in page


def test_candidates_trained_side_by_side_match_one_after_another(data_dir, tmp_path):
    cfg = dict(FAST, epochs=2, candidates=PAIR)
    lines = []
    side = train_model(dict(cfg, candidate_jobs=2), data_dir, tmp_path / "side",
                           log=lines.append)
    one = train_model(dict(cfg, candidate_jobs=1), data_dir, tmp_path / "one",
                          log=quiet)
    assert side["candidates"] == one["candidates"] and side["chosen"] == one["chosen"]
    for name in PAIR:  # each process trains exactly what the caller's would
        a = torch.load(tmp_path / "side" / CANDIDATES / name / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "one" / CANDIDATES / name / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lines[0] == f"training 2 candidates, 2 at once (one process each): {', '.join(PAIR)}"
    for name in PAIR:  # their epoch lines reach the caller's log, named
        assert any(line.startswith(f"[{name}] epoch   2/2") for line in lines), lines
    assert lines[-1].startswith(f"chose {side['chosen']} on validation")


def sleeps(log):
    import time
    log("started")
    time.sleep(120)


def fails(log):
    raise FileExistsError("candidate folder is not ours")


def vanishes(log):
    import os
    os._exit(3)


def test_a_failing_job_raises_its_error_and_stops_the_others():
    import time

    from odmt_t4r.parallel import run_jobs
    lines = []
    start = time.perf_counter()
    with pytest.raises(FileExistsError, match="candidate folder is not ours"):
        run_jobs({"slow": (sleeps, ()), "bad": (fails, ())}, 2, lines.append)
    assert time.perf_counter() - start < 60  # the sleeper was stopped, not waited for
    with pytest.raises(RuntimeError, match="gone: its training process stopped with exit code 3"):
        run_jobs({"gone": (vanishes, ())}, 2, lines.append)


def test_candidate_jobs_must_not_be_negative(data_dir, tmp_path, capsys):
    assert cli(command, ["--data", data_dir, "--out", tmp_path / "x", "--candidates", *PAIR,
                       "--candidate-jobs", -1]) == 2
    assert capsys.readouterr().err.startswith("odmt train: error: candidate_jobs must be >= 0")


def test_a_finished_run_and_a_finished_selection_carry_their_file_hashes(data_dir, tmp_path):
    from odmt_t4r.trust import TrustError, verify_run

    train_model(dict(FAST, epochs=1, candidates=PAIR), data_dir, tmp_path / "sel", log=quiet)
    for run in (tmp_path / "sel", tmp_path / "sel" / CANDIDATES / PAIR[0]):
        manifest = verify_run(run)
        assert manifest is not None and {"model.pt", "config.json", "fusion.json"} <= set(manifest["files"])
    assert SELECTION in verify_run(tmp_path / "sel")["files"]
    weights = tmp_path / "sel" / "model.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte changes one weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(TrustError, match="model.pt"):
        verify_run(tmp_path / "sel")
    # a run paused by successive halving is unfinished: no manifest until it ends
    train_model(dict(FAST, epochs=4, candidates=PAIR, selection_rung=1), data_dir, tmp_path / "halving", log=quiet)
    loser = next(p for p in (tmp_path / "halving" / CANDIDATES).iterdir() if p.name != read_selection(tmp_path / "halving")["chosen"])
    assert not (loser / "manifest.json").exists()
