"""Production safety, round 2 (issue 20): a live repository moves only along its own lineage, one writer at a
time; RUNs and prepared DIRs are checked (hashes, signature) before they are loaded; numbers that break
scoring are refused; errors point the right way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from odmt_t4r.catalog_update import add_items, assumed_train_count
from odmt_t4r.cli import main
from odmt_t4r.trust import SIGNING_KEY_ENV, TrustError, clear_bytecode_caches, verify_folder
from tests.test_add_items import N_ITEMS, _saved, _serve, new_items_csv
from tests.tiny_data import prepare_tiny, untrained_run

K = 80


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"odmt {command}: error: "), err[-2000:]
    return line


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "odmt_t4r.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_for(log: Path, text: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and text not in log.read_text():
        time.sleep(0.5)
    assert text in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from odmt_t4r.prepare import PrepareConfig, prepare

    os.environ.pop(SIGNING_KEY_ENV, None)
    out = tmp_path_factory.mktemp("safety2") / "fashion"
    prepare(PrepareConfig(source="fashion", n_items=N_ITEMS, out=str(out)))
    return out


@pytest.fixture(scope="module")
def odmt_run(data_dir, tmp_path_factory):
    from odmt_t4r.model import build_model

    torch.manual_seed(0)
    model = build_model("odmt", data_dir, d_model=16, n_heads=2, seq_layers=1, imt_layers=1)
    return _saved(model, data_dir, tmp_path_factory.mktemp("safety2") / "odmt")


@pytest.fixture(scope="module")
def catalog(data_dir):
    items = pd.read_parquet(data_dir / "items.parquet")
    items["image"] = [str(data_dir / p) if not os.path.isabs(p) else p for p in items["image"]]
    return items


# -- 1 + 2: lineage and one writer, against a running server --------------------------------------------

@pytest.mark.slow
def test_a_live_repository_takes_one_writer_and_only_versions_of_its_own_lineage(
        odmt_run, data_dir, catalog, tmp_path, capsys):
    from odmt_t4r.model import build_model
    from odmt_t4r.prepare import PrepareConfig, prepare
    from tests.triton_fixtures import triton_available
    from triton_models import repository
    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export

    if not triton_available():
        pytest.fail("tritonserver is not installed: the live repository cannot be tested")
    repo = tmp_path / "repo"
    export(odmt_run, repo, ServingConfig(k=K), check_sessions=5)
    proc, url = _serve(repo, tmp_path / "serve.log")
    try:
        # 2. two writers at once (the README's command, two item files): one version, never a mix
        writers = {name: _cli("add-items", "--run", str(odmt_run), "--items",
                              str(new_items_csv(tmp_path / name, catalog, [2, 4], prefix=name)),
                              "--out", str(tmp_path / f"run-{name}"), "--repo", str(repo), "--check-sessions", "3")
                   for name in ("A", "B")}
        done = {name: (p.wait(600), p.stderr.read()) for name, p in writers.items()}
        winners = [n for n, (rc, _) in done.items() if rc == 0]
        assert len(winners) == 1, {n: err[-800:] for n, (_, err) in done.items()}
        (loser,) = set(done) - set(winners)
        loser_line = done[loser][1].strip().splitlines()[-1]
        assert loser_line.startswith("odmt add-items: error:")
        assert "another odmt process is writing" in loser_line or "lacks 2 served items" in loser_line, loser_line
        clear_bytecode_caches(repo)  # the server's stubs write them (odmt serve clears them too)
        manifest = verify_folder(repo, repository.FORMAT, "repo", strict=True)
        assert manifest["version"] == 2 == max(repository.served_versions(repo))
        assert manifest["run"] == str(tmp_path / f"run-{winners[0]}")
        assert not list(tmp_path.glob(".repo.version-*")), "a writer's staging folder was left"

        # 1. the same --run again (it lacks the items version 2 added), another model, other prepared data
        before = (repo / "manifest.json").read_bytes()
        offers = {"same run again": (odmt_run, "lacks 2 served items")}
        torch.manual_seed(0)
        sasrec = build_model("sasrec", data_dir, d_model=16, n_heads=2, seq_layers=1)
        offers["sasrec"] = (_saved(sasrec, data_dir, tmp_path / "sasrec"), "is another model family")
        other = tmp_path / "other-data"
        prepare(PrepareConfig(source="fashion", n_items=N_ITEMS - 10, out=str(other)))
        torch.manual_seed(0)
        other_run = _saved(build_model("odmt", other, d_model=16, n_heads=2, seq_layers=1, imt_layers=1), other,
                           tmp_path / "other-run")
        offers["other data"] = (other_run, "is built on other prepared data")
        for name, (run, message) in offers.items():
            csv = new_items_csv(tmp_path / f"offer-{name}", catalog, [7], prefix="LATE")
            assert main(["add-items", "--run", str(run), "--items", str(csv), "--out", str(tmp_path / f"o-{name}"),
                         "--repo", str(repo)]) == 2, name
            line = _error_line(capsys, "add-items")
            assert message in line and f"serves version 2 (odmt" in line and "--force" in line, line
            assert (repo / "manifest.json").read_bytes() == before
        _wait_for(tmp_path / "serve.log", "now serving version 2")
        client = RecommenderClient(url, protocol="http")
        served = {i for answer in client.recommend([["F00001"]], k=K) for i, _ in answer}
        assert {f"{winners[0]}0", f"{winners[0]}1"} <= served

        # --force replaces the lineage on purpose, and the server follows
        csv = new_items_csv(tmp_path / "forced", catalog, [9], prefix="FORCED")
        summary = add_items(odmt_run, csv, out=tmp_path / "forced-run", repo=repo, force=True, check_sessions=3)
        assert summary["repo_version"] == 3
        _wait_for(tmp_path / "serve.log", "now serving version 3")
        served = {i for answer in client.recommend([["F00001"]], k=K) for i, _ in answer}
        assert "FORCED0" in served and f"{winners[0]}0" not in served
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_add_items_waits_for_no_one_while_another_writer_holds_the_repository(odmt_run, catalog, tmp_path):
    from triton_models import repository
    from triton_models.export import ServingConfig, export

    repo = tmp_path / "repo"
    export(odmt_run, repo, ServingConfig(k=K), check_sessions=3)
    before = (repo / "manifest.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / '.repo.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'pid 1: odmt export', 0)\n"
        "print('held', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another odmt process is writing .*repo"):
            add_items(odmt_run, new_items_csv(tmp_path, catalog, [1]), out=tmp_path / "v2", repo=repo)
    finally:
        holder.kill()
        holder.wait()
    assert (repo / "manifest.json").read_bytes() == before and repository.served_versions(repo) == [1]
    # writers stage under names of their own; a staging folder a killed writer left is cleared under the lock
    (tmp_path / ".repo.version-2.999-dead.partial").mkdir()
    add_items(odmt_run, new_items_csv(tmp_path / "b", catalog, [1]), out=tmp_path / "v2b", repo=repo,
              check_sessions=3)
    assert repository.served_versions(repo) == [1, 2] and not list(tmp_path.glob(".repo.version-*"))


# -- 4: RUNs and DIRs are checked before they are loaded -----------------------------------------------

def test_with_a_key_runs_and_dirs_must_match_their_signature_before_they_load(
        data_dir, tmp_path, monkeypatch, capsys):
    from odmt_t4r import trust
    from odmt_t4r.training.data import PreparedData

    monkeypatch.setenv(SIGNING_KEY_ENV, "right-key")
    data = prepare_tiny(tmp_path / "inputs", tmp_path / "prepared")
    run = untrained_run(data, tmp_path / "run")
    export_args = ["export", "--run", str(run), "--out", str(tmp_path / "repo"), "--check-sessions", "3", "--k", "3"]
    assert main(export_args) == 2  # trained before RUNs had a manifest: unsigned
    line = _error_line(capsys, "export")
    assert "has no signed manifest.json" in line and "sign" in line
    assert main(["evaluate", "--run", str(run), "--split", "valid", "--no-progress"]) == 2
    assert "has no signed manifest.json" in _error_line(capsys, "evaluate")

    trust.run(type("Args", (), {"run": str(run)}))  # `odmt sign --run RUN`
    assert main(export_args) == 0
    verify_folder(run, trust.RUN_FORMAT, "RUN")

    flipped = shutil.copytree(run, tmp_path / "flipped")
    blob = bytearray((flipped / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 1
    (flipped / "model.pt").write_bytes(bytes(blob))
    swapped = shutil.copytree(run, tmp_path / "swapped")
    shutil.copyfile(untrained_run(data, tmp_path / "another", seed=1) / "model.pt", swapped / "model.pt")
    for bad in (flipped, swapped):
        for args, command in ((["export", "--run", str(bad), "--out", str(tmp_path / "r2"), "--k", "3"], "export"),
                              (["evaluate", "--run", str(bad), "--split", "valid", "--no-progress"], "evaluate")):
            assert main(args) == 2
            assert "model.pt changed since it was written" in _error_line(capsys, command)
        with pytest.raises(TrustError, match="model.pt changed"):
            add_items(bad, tmp_path / "none.csv", out=tmp_path / "grown")
    assert not (tmp_path / "r2").exists()

    edited = shutil.copytree(data, tmp_path / "edited")  # a signed DIR's manifest edited
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["max_length"] = 2
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrustError, match="changed after it was signed"):
        PreparedData(edited)  # what `odmt train` and `odmt evaluate` read the DIR through
    assert main(["train", "--data", str(edited), "--model", "sasrec", "--out", str(tmp_path / "t"), "--epochs", "1"]) == 2
    assert "changed after it was signed" in _error_line(capsys, "train")


def test_reversed_rows_in_a_feature_file_are_refused(data_dir, tmp_path):
    from odmt_t4r.training.data import PreparedData

    copy = shutil.copytree(data_dir, tmp_path / "prepared")
    feats = np.load(copy / "features" / "text.npy")
    np.save(copy / "features" / "text.npy", feats[::-1].copy())
    with pytest.raises(TrustError, match="features/text.npy changed since it was written"):
        PreparedData(copy)


# -- 6: numbers that break scoring ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["inf", "-inf", "nan", "1e308", "-1", "1e9"])
def test_assumed_counts_that_break_scoring_are_refused(spec):
    counts = np.array([0.0, 1.0, 4.0, 30.0])
    with pytest.raises(ValueError, match="finite number from 0 to 30"):
        assumed_train_count(spec, counts)
    assert assumed_train_count("30", counts) == 30.0 and assumed_train_count("median", counts) == 2.5


def test_add_items_refuses_an_infinite_assumed_count_in_one_line(odmt_run, catalog, tmp_path, capsys):
    csv = new_items_csv(tmp_path, catalog, [0])
    assert main(["add-items", "--run", str(odmt_run), "--items", str(csv), "--out", str(tmp_path / "o"),
                 "--assumed-count", "inf"]) == 2
    assert "--assumed-count must be 'median' or a finite number" in _error_line(capsys, "add-items")
    assert not (tmp_path / "o").exists()


# -- 7: errors that point the right way ----------------------------------------------------------------

def test_a_version_folder_left_by_a_killed_add_items_is_named_with_the_way_out(odmt_run, catalog, tmp_path, capsys):
    from triton_models.export import ServingConfig, export

    repo = tmp_path / "repo"
    export(odmt_run, repo, ServingConfig(k=K), check_sessions=3)
    killed = _cli("add-items", "--run", str(odmt_run), "--items", str(new_items_csv(tmp_path, catalog, [1])),
                  "--out", str(tmp_path / "v2"), "--repo", str(repo), "--check-sessions", "3",
                  env={"ODMT_FAULT_POINT": "add-items-before-manifest"})
    assert killed.wait(600) == -9, killed.stderr.read()[-2000:]
    assert (repo / "executor_model" / "2").is_dir()
    assert main(["serve", "--repo", str(repo)]) == 2
    line = _error_line(capsys, "serve")
    assert "executor_model/2 is a version folder the manifest does not record" in line
    assert f"rm -r {repo / 'executor_model' / '2'}" in line and "model.py is not recorded" not in line
    shutil.rmtree(repo / "executor_model" / "2")  # as the message says; the next add-items clears its staging
    add_items(odmt_run, new_items_csv(tmp_path / "b", catalog, [1]), out=tmp_path / "v2b", repo=repo, check_sessions=3)
    assert not list(tmp_path.glob(".repo.version-*"))


def test_add_items_to_an_existing_folder_suggests_no_flag_it_lacks(odmt_run, catalog, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    csv = new_items_csv(tmp_path, catalog, [0])
    assert main(["add-items", "--run", str(odmt_run), "--items", str(csv), "--out", str(tmp_path / "taken")]) == 2
    line = _error_line(capsys, "add-items")
    assert "refusing to replace it" in line and "--force" not in line and "RUN.vN" in line
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["add-items", "--run", str(odmt_run), "--items", str(csv), "--out", str(odmt_run)]) == 2
    assert "is the RUN new items are added to" in _error_line(capsys, "add-items")


# -- 8: silent surprises -------------------------------------------------------------------------------

from tests.triton_fixtures import TOY_K, toy_repo, triton_server  # noqa: E402,F401  (a real server, toy model)


def test_recommend_says_when_k_is_more_than_the_repository_answers(triton_server, capsys):
    assert main(["recommend", "--url", triton_server.http_url, "--items", "a,b", "--k", str(TOY_K + 3)]) == 0
    err = capsys.readouterr().err
    assert f"answers at most {TOY_K} items per session" in err and f"--k {TOY_K + 3}" in err
    assert main(["recommend", "--url", triton_server.http_url, "--items", "a,b", "--k", str(TOY_K)]) == 0
    assert "answers at most" not in capsys.readouterr().err


def test_verification_at_load_hashes_a_folder_once_per_process_until_a_file_changes(data_dir, tmp_path, monkeypatch):
    """What verification costs at load: printed for the fashion fixture DIR (a fashion-size DIR, 203 MB, takes
    about 170 ms on 2 cores; see the report); a second load in the same process re-hashes nothing."""
    from odmt_t4r import trust

    copy = shutil.copytree(data_dir, tmp_path / "prepared")
    t = time.perf_counter()
    trust.verify_prepared(copy)
    print(f"verify {copy}: {(time.perf_counter() - t) * 1e3:.0f} ms")
    hashed = []
    monkeypatch.setattr(trust, "sha256_file", lambda p: hashed.append(p) or trust.hashlib.sha256(Path(p).read_bytes()).hexdigest())
    trust.verify_prepared(copy)
    assert hashed == []
    feats = np.load(copy / "features" / "text.npy")
    np.save(copy / "features" / "text.npy", feats[::-1].copy())  # same size, new content
    with pytest.raises(TrustError, match="features/text.npy changed"):
        trust.verify_prepared(copy)


def test_explaining_a_model_outside_no_grad_warns_nothing(odmt_run, data_dir):
    import warnings

    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.model.explain import BranchExplainer

    model = OdmtRecommender.from_pretrained(odmt_run, data_dir=data_dir)  # as export's check builds it
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        BranchExplainer(model).contributions(torch.tensor([[3, 4, 0]]), torch.tensor([[5, 6]]))
