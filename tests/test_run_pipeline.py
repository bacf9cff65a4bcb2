"""`odmt run`: every stage's outputs on a tiny configuration (a real Triton server answers), stage records
that skip finished work and resume a failed stage, and one clear error line for bad settings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from odmt_t4r.pipeline import Stage, StageFailed, StageRecords
from tests.tiny_run import K, N_ITEMS, SESSIONS, TINY_MODEL, odmt, tiny_run

STAGES = ["prepare", "train-odmt", "train-sasrec", "evaluate-odmt", "evaluate-sasrec", "export", "serve", "report"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _records(work: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}


# -- the whole job, once ------------------------------------------------------------------------------

def test_every_stage_is_done_and_recorded(tiny):
    records = _records(tiny.work)
    assert sorted(records) == sorted(STAGES)
    for name, rec in records.items():
        assert rec["status"] == "done" and rec["seconds"] >= 0, name
        assert all(digest for digest in rec["outputs"].values()), f"{name}: an output was missing when it finished"
    assert records["train-odmt"]["inputs"]["data"] == records["prepare"]["outputs"]["data/manifest.json"]


def test_prepared_data_and_trained_runs(tiny):
    from odmt_t4r.prepare import FORMAT
    from odmt_t4r.trust import verify_folder

    manifest = verify_folder(tiny.work / "data", FORMAT, "prepared folder")
    assert manifest["counts"]["items"] == N_ITEMS and manifest["modalities"] == ["id", "text", "image"]
    for model, branches in (("odmt", {"id", "text", "image"}), ("sasrec", {"id"})):
        run = tiny.work / "runs" / model
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1]
        assert branches <= set(log[0]["losses"]) and "NDCG@10" in log[0]["valid"]
        metrics = json.loads((run / "metrics-test.json").read_text())
        assert metrics["split"] == "test" and metrics["n_users"] == manifest["counts"]["users_evaluated"]
        assert 0 < metrics["NDCG@10"] <= metrics["HR@10"] <= metrics["HR@20"] <= 1
        assert all(f"{b}/NDCG@10" in metrics for b in branches - {"id"} or {"id"})
    assert "mean/NDCG@10" in json.loads((tiny.work / "runs" / "odmt" / "metrics-test.json").read_text())


def test_stdout_holds_the_results_and_stderr_the_logs(tiny):
    odmt_m = json.loads((tiny.work / "runs" / "odmt" / "metrics-test.json").read_text())
    sasrec_m = json.loads((tiny.work / "runs" / "sasrec" / "metrics-test.json").read_text())
    out = tiny.stdout
    assert f"prepared fashion: 6,000 users, {N_ITEMS} items" in out
    assert f"{odmt_m['NDCG@10']:10.4f}" in out and f"{sasrec_m['NDCG@10']:10.4f}" in out
    assert "served by Triton" in out and out.count("(served):") == SESSIONS
    assert out.rstrip().endswith(f"report: {tiny.work / 'report.html'}")
    assert "[run]" not in out and "epoch" not in out  # logs stay on stderr
    err = tiny.stderr
    assert "\r" not in err, "a progress bar wrote carriage returns into the log"
    for name in STAGES:
        assert f"[run] {name}: running" in err and f"[run] {name}: done in" in err
    assert "tritonserver ready" in err


def test_served_answers_come_from_the_trained_model_through_triton(tiny):
    assert_served_by_the_run(tiny.work, "odmt", SESSIONS)


def assert_served_by_the_run(work: Path, model_name: str, n_sessions: int) -> None:
    """served.json's answers came through Triton and are RUN's in-process top-k, scores and order."""
    import torch

    from odmt_t4r.model import OdmtRecommender

    served = json.loads((work / "served.json").read_text())
    assert served["served"] and served["grpc_same_answers"] and served["k"] == K
    assert served["server"]["http"].startswith("127.0.0.1:") and served["server"]["grpc"].startswith("127.0.0.1:")
    assert len(served["sessions"]) == n_sessions
    items = pd.read_parquet(work / "data" / "items.parquet", columns=["item_idx", "item_id"])
    index = dict(zip(items["item_id"].astype(str), items["item_idx"]))
    model = OdmtRecommender.from_pretrained(work / "runs" / model_name)
    L = model.config.max_length
    assert served["max_length"] == L
    for s in served["sessions"]:
        ids = [a[0] for a in s["answers"]]
        scores = np.array([a[1] for a in s["answers"]])
        read = s["history"][-L:]  # the server reads the latest L items and leaves them out of its answers
        assert len(ids) == K and not set(ids) & set(read)
        history = torch.tensor([[index[i] for i in read]])
        want_scores, _ = model.recommend(history, k=K)
        np.testing.assert_allclose(scores, want_scores[0].numpy(), atol=1e-3)  # the same top-k, in order
        fused = model.score(history)["fused"][0]
        np.testing.assert_allclose(scores, fused[[index[i] for i in ids]].numpy(), atol=1e-3)
        assert s["target_rank"] == (ids.index(s["target"]) + 1 if s["target"] in ids else None)


def test_the_main_job_with_a_model_selection_serves_and_reports_the_chosen_model(tmp_path):
    from odmt_t4r.contract import read_selection

    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    work = tmp_path / "work"
    done = odmt("run", "--out", str(work), "--n-items", str(N_ITEMS), "--epochs", "1", "--model", "odmt-auto",
                "--config", str(tmp_path / "model.json"), "--sessions", "2", "--k", str(K))
    assert done.returncode == 0, done.stderr[-4000:]
    selection = read_selection(work / "runs" / "odmt-auto")
    assert set(selection["candidates"]) == {"odmt", "odmt-imt"} and selection["chosen"] in selection["candidates"]
    config = json.loads((work / "runs" / "odmt-auto" / "config.json").read_text())
    assert config["train"]["model"] == selection["chosen"]  # RUN is the chosen candidate's, whole
    for name in selection["candidates"]:
        assert f"[{name}] epoch   1/1" in done.stderr  # each candidate's progress reached the job's log
    assert_served_by_the_run(work, "odmt-auto", 2)
    page = (work / "report.html").read_text()
    assert "model (chosen on validation)" in page and f"{selection['chosen']} of " in page


def test_no_server_process_outlives_the_run(tiny):
    repo = str(tiny.work / "repo")
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if repo in cmdline:
            alive.append(cmdline)
    assert alive == []


def test_report_holds_the_runs_numbers(tiny):
    page = (tiny.work / "report.html").read_text()
    for model in ("odmt", "sasrec"):
        m = json.loads((tiny.work / "runs" / model / "metrics-test.json").read_text())
        assert f'data-model="{model}" data-metric="NDCG@10" data-value="{m["NDCG@10"]!r}">{m["NDCG@10"]:.4f}<' in page
    assert page.count('class="session"') == SESSIONS and "served by Triton" in page


# -- stage records: skip, resume, rerun ----------------------------------------------------------------

def test_failed_stage_names_itself_then_resumes_there_and_changed_inputs_rerun_downstream(tiny):
    work = tiny.work
    before = _records(work)
    report = work / "report.html"
    report.unlink()
    report.mkdir()  # the report cannot be written: the last stage fails
    try:
        failed = odmt(*tiny.args)
    finally:
        report.rmdir()
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("odmt run: error: stage 'report' failed: ")
    assert "run the same `odmt run` command again to resume at 'report'" in last
    assert "prepare, train-odmt" in last  # the finished stages stay done
    assert _records(work)["report"]["status"] == "failed"
    assert {n: _records(work)[n]["finished"] for n in STAGES[:-1]} == {n: before[n]["finished"] for n in STAGES[:-1]}, \
        failed.stderr

    # the same command again: it resumes at the report; every other stage is skipped
    resumed = odmt(*tiny.args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [n for n in STAGES if f"[run] {n}: done earlier" in resumed.stderr] == STAGES[:-1]
    assert "[run] report: resuming" in resumed.stderr and report.is_file()

    # fewer example sessions: everything up to export is skipped, serve and report run again
    args = list(tiny.args)
    args[args.index("--sessions") + 1] = "2"
    again = odmt(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [n for n in STAGES if f"[run] {n}: done earlier" in again.stderr] == STAGES[:6]
    assert "[run] serve: running" in again.stderr and "[run] report: running" in again.stderr
    assert len(json.loads((work / "served.json").read_text())["sessions"]) == 2
    assert report.read_text().count('class="session"') == 2

    # and once more: nothing left to do
    idle = odmt(*args)
    assert idle.returncode == 0 and "running" not in idle.stderr and idle.stderr.count("skipped") >= len(STAGES)



def test_a_killed_training_stage_resumes_from_its_last_epoch(tiny):
    import signal
    import subprocess
    import sys
    import time

    import torch

    args = list(tiny.args)
    args[args.index("--epochs") + 1] = "4"  # new training inputs: train-odmt starts afresh
    log = tiny.work / "runs" / "odmt" / "log.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "odmt_t4r.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        def first_epoch_done():  # of the new training (its config.json says 4 epochs), checkpointed:
            try:  # the log line comes before the checkpoint, so a kill between them would redo epoch 1
                config = json.loads((log.parent / "config.json").read_text())
                return (config["train"]["epochs"] == 4 and '"epoch": 1' in log.read_text()
                        and (log.parent / "checkpoint.pt").is_file())
            except (OSError, ValueError, KeyError):
                return False

        while not first_epoch_done() and child.poll() is None:
            assert time.monotonic() < deadline, "training never finished an epoch"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # no clean-up at all, as a power cut
        child.wait()
    record = _records(tiny.work)["train-odmt"]
    assert record["status"] == "running" and record["inputs"]["train"]["epochs"] == 4
    # the epochs the checkpoint holds (the log may have one more line: killed between log and checkpoint)
    epochs_before = torch.load(log.parent / "checkpoint.pt", weights_only=True)["state"]["epoch"] + 1
    assert 1 <= epochs_before < 4 and len(log.read_text().splitlines()) in (epochs_before, epochs_before + 1)

    resumed = odmt(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[run] train-odmt: resuming" in resumed.stderr
    assert f"resuming {tiny.work / 'runs' / 'odmt'} after epoch {epochs_before}" in resumed.stderr
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert all(r["status"] == "done" for r in _records(tiny.work).values())


def _stage(name, inputs, out, calls, fail=False):
    def run(resume):
        calls.append((name, resume))
        if fail:
            raise ValueError("disk on fire\nsecond line of the cause")
        (out).write_text(json.dumps(inputs))
        return {"n": len(calls)}
    return Stage(name, inputs, [out.name], run, resume_note="it picks up where it stopped")


def test_records_skip_unchanged_rerun_changed_inputs_or_outputs(tmp_path):
    records, calls = StageRecords(tmp_path, say=lambda m: None), []
    a = tmp_path / "a.txt"
    records.run(_stage("a", {"x": 1}, a, calls))
    records.run(_stage("a", {"x": 1}, a, calls))
    assert calls == [("a", False)]  # second time: skipped
    records.run(_stage("a", {"x": 2}, a, calls))
    assert calls[-1] == ("a", False) and len(calls) == 2  # inputs changed: ran again
    a.write_text("edited by hand")
    records.run(_stage("a", {"x": 2}, a, calls))
    assert len(calls) == 3  # its output changed since: ran again
    a.unlink()
    records.run(_stage("a", {"x": 2}, a, calls))
    assert len(calls) == 4 and a.is_file()


def test_records_failure_message_and_resume(tmp_path):
    records, calls = StageRecords(tmp_path, say=lambda m: None), []
    records.run(_stage("first", {}, tmp_path / "first.txt", calls))
    with pytest.raises(StageFailed) as info:
        records.run(_stage("second", {"y": 1}, tmp_path / "second.txt", calls, fail=True))
    details, headline = str(info.value).rsplit("\n", 1)
    assert details == "second line of the cause"
    assert headline == ("stage 'second' failed: disk on fire. Fix the cause and run the same `odmt run` command "
                        "again to resume at 'second' (it picks up where it stopped); first stay done and will be skipped")
    assert records.read("second")["status"] == "failed" and "disk on fire" in records.read("second")["error"]
    records.run(_stage("second", {"y": 1}, tmp_path / "second.txt", calls))
    assert calls[-1] == ("second", True)  # the same inputs after a failure: a resume
    assert records.read("second")["status"] == "done"
    records.run(_stage("second", {"y": 2}, tmp_path / "second.txt", calls))
    assert calls[-1] == ("second", False)  # other inputs: a fresh start


# -- bad settings: one line, exit 2, nothing touched ----------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--baseline", "odmt"], "--model and --baseline are both 'odmt'"),
    (["--model", "gpt"], "--model 'gpt' is not a model"),
    (["--n-items", "0"], "--n-items must be at least 1, got 0"),
    (["--interactions", "x.csv"], "apply to the csv and parquet sources, not 'fashion'"),
])
def test_bad_settings_are_one_error_line(tmp_path, capsys, extra, message):
    from odmt_t4r.cli import main

    assert main(["run", "--out", str(tmp_path / "work"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("odmt run: error: ") and message in err[-1]
    assert not (tmp_path / "work").exists()  # refused before anything was written


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from odmt_t4r.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["run", "--out", str(tmp_path / "mine")]) == 2
    assert "is not a folder `odmt run` wrote" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    shutil.rmtree(tmp_path / "mine")


# -- logs off a terminal --------------------------------------------------------------------------------

class _ToyText:
    name, version, dim = "toy-text", "1", 4

    def encode(self, texts):
        return np.ones((len(texts), 2, self.dim), dtype=np.float32), np.ones((len(texts), 2), dtype=bool)


def test_feature_encoding_progress_is_plain_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    import itertools
    import types

    from odmt_t4r.features import FeatureConfig, build_item_features
    from odmt_t4r.training import progress

    clock = itertools.count(0, 11.0)  # every batch takes "11 s": each one is worth a progress line
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    items = pd.DataFrame({"item_idx": [3, 4, 5, 6], "text": ["a", "bb", "ccc", "dddd"]})
    config = FeatureConfig(modalities=("text",), batch_size=1, progress=True)
    build_item_features(items, 7, tmp_path / "out", config, cache_dir=tmp_path / "cache", text_encoder=_ToyText())
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("text features [toy-text], batches of 1 items: ")]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "left)" in lines[0]  # the rate and the time left


def test_a_config_that_asks_for_a_model_selection_is_refused(tmp_path, capsys):
    from odmt_t4r.cli import main

    config = tmp_path / "config.json"
    config.write_text('{"candidates": ["odmt", "odmt-imt"]}')
    assert main(["run", "--out", str(tmp_path / "work"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("odmt run: error: --config sets candidates"), err
    assert not (tmp_path / "work").exists()
