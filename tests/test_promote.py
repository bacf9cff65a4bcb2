"""`odmt promote` / `odmt update --repo`: an updated RUN2 becomes the live repository's next version only if its
validation NDCG@10 on DIR2 is at least the served version's (scored on DIR2 as it serves). A winner is swapped
into a running `odmt serve` under load with no failed request; a loser, a RUN2 off the served lineage and a kill
at any point leave the repository serving what it served."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from odmt_t4r.cli import main
from odmt_t4r.output_folder import FAULT_ENV
from odmt_t4r.promote import KEPT_EXIT, score_run, score_served

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

OLD_ITEMS = [f"i{k}" for k in range(40)]
NEW_ITEMS = [f"n{k}" for k in range(10)]
K = 60  # more than the catalog: every unseen item is in each answer
FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 16, "eval_batch_size": 64,
        "progress": False}


def quiet(*_):
    pass


def walks(users: list[str], items: list[str], t0: int, rng) -> pd.DataFrame:
    """Each user walks the item list (the next item 9 times in 10): a sequence model learns it quickly."""
    rows, t = [], t0
    for user in users:
        k = int(rng.integers(len(items)))
        for _ in range(int(rng.integers(5, 9))):
            rows.append((user, items[k], t))
            t += 1
            k = (k + 1) % len(items) if rng.random() < 0.9 else int(rng.integers(len(items)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DIR (200 users on 40 items), DIR2 = DIR + 100 users walking 10 new items (an append), RUN trained on DIR,
    RUN2 its update on DIR2 (learns the new items' walk: the winner), and the exported repository of RUN."""
    from odmt_t4r.training import train
    from odmt_t4r.training.update import update_run
    from triton_models.export import ServingConfig, export

    root = tmp_path_factory.mktemp("promote")
    rng = np.random.default_rng(0)
    old = walks([f"u{k}" for k in range(200)], OLD_ITEMS, 1_700_000_000, rng)
    new = walks([f"v{k}" for k in range(100)], NEW_ITEMS, 1_700_100_000, rng)
    for name, frame, items in (("old", old, OLD_ITEMS), ("new", new, NEW_ITEMS), ("all", pd.concat([old, new]),
                                                                                    OLD_ITEMS + NEW_ITEMS)):
        frame.to_csv(root / f"{name}.csv", index=False)
        pd.DataFrame({"item_id": items}).to_csv(root / f"{name}-items.csv", index=False)

    def csv(name):
        return ["--interactions", str(root / f"{name}.csv"), "--items", str(root / f"{name}-items.csv")]

    assert main(["prepare", "--source", "csv", *csv("old"), "--no-features", "--max-length", "6",
                 "--out", str(root / "dir")]) == 0
    assert main(["prepare", "--source", "csv", *csv("new"), "--append-to", str(root / "dir"), "--out",
                 str(root / "dir2")]) == 0
    train.train_run(train.TrainConfig.from_dict({**FAST, "epochs": 8}), root / "dir", root / "run", log=quiet)
    update_run(root / "run", root / "dir2", root / "run2", {"epochs": 6, "progress": False}, log=quiet)
    export(root / "run", root / "repo", ServingConfig(k=K), check_sessions=5, log=quiet)
    return SimpleNamespace(root=root, csv=csv, dir=root / "dir", dir2=root / "dir2", run=root / "run",
                           run2=root / "run2", repo=root / "repo")


@pytest.fixture
def repo(world, tmp_path):
    """A fresh copy of the exported repository (version 1 serves RUN)."""
    return Path(shutil.copytree(world.repo, tmp_path / "repo"))


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def odmt(*args, point: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update({"OMP_NUM_THREADS": "1", **({FAULT_ENV: point} if point else {})})
    return subprocess.run([sys.executable, "-m", "odmt_t4r.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"odmt {command}: error: "), err[-2000:]
    assert sum(line.startswith("odmt ") and ": error:" in line for line in lines) == 1
    return lines[-1]


def test_the_gate_scores_both_on_dir2s_validation_split(world):
    """The winner of the other tests really wins, and a fine-tune at an absurd learning rate really loses."""
    served = score_served(world.run, world.dir2, False, quiet)
    assert score_run(world.run2, world.dir2) > served + 0.02 > 0.02
    assert score_served(world.run2, world.dir2, False, quiet) == pytest.approx(score_run(world.run2, world.dir2))


def test_a_losing_update_is_not_promoted_and_the_repository_is_byte_identical(world, repo, tmp_path):
    before = hashes(repo)
    done = odmt("update", "--run", world.run, "--data", world.dir2, "--out", tmp_path / "bad", "--epochs", 1,
                "--lr", 5.0, "--no-progress", "--repo", repo, "--check-sessions", 3)
    assert done.returncode == KEPT_EXIT, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["promoted"] is False and summary["served_version"] == 1
    assert summary["run_score"] < summary["served_score"] - 0.02  # both figures, and a real gap
    assert summary["served_score"] == pytest.approx(score_served(world.run, world.dir2, False, quiet))
    assert summary["update"]["run"] == str(tmp_path / "bad") and (tmp_path / "bad" / "model.pt").is_file()
    assert f"{summary['run_score']:.4f}" in done.stderr and f"{summary['served_score']:.4f}" in done.stderr
    assert "keeping version 1" in done.stderr
    assert hashes(repo) == before
    # --force publishes it anyway, still scored and reported
    forced = odmt("promote", "--run", tmp_path / "bad", "--repo", repo, "--check-sessions", 3, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    published = json.loads(forced.stdout)
    assert published["promoted"] and published["forced"] and published["version"] == 2
    assert published["run_score"] == pytest.approx(summary["run_score"]) and published["served_score"] == pytest.approx(
        summary["served_score"])


@pytest.fixture(scope="module")
def offers(world, tmp_path_factory):
    """RUN2s off the served lineage: one on a fresh prepare of all the data (not an append of DIR), a sasrec on
    DIR2, and the winner offered to a repository whose version 2 (add-items) serves an item DIR2 lacks."""
    from odmt_t4r.catalog_update import add_items
    from odmt_t4r.training import train
    from odmt_t4r.training.update import update_run
    from triton_models.export import ServingConfig, export

    root = tmp_path_factory.mktemp("offers")
    assert main(["prepare", "--source", "csv", *world.csv("all"), "--no-features", "--max-length", "6",
                 "--out", str(root / "fresh")]) == 0
    update_run(world.run, root / "fresh", root / "fresh-run", {"epochs": 1, "progress": False}, log=quiet)
    train.train_run(train.TrainConfig.from_dict({**FAST, "model": "sasrec", "epochs": 1}), world.dir2,
                    root / "sasrec", log=quiet)
    grown = root / "grown-repo"
    export(world.run, grown, ServingConfig(k=K), check_sessions=3, log=quiet)
    (root / "x.csv").write_text("item_id\nX0\n")
    add_items(world.run, root / "x.csv", out=root / "run-x", repo=grown, check_sessions=3, log=quiet)
    return {"other data": (root / "fresh-run", None, "neither that data nor an append to it"),
            "other model": (root / "sasrec", None, "is another model family"),
            "served items": (world.run2, grown, "lacks 1 served items (e.g. X0)")}


@pytest.mark.parametrize("offer", ["other data", "other model", "served items"])
def test_a_run_off_the_served_lineage_is_refused_in_one_line(world, repo, offers, offer, capsys):
    run, target, message = offers[offer]
    target = target or repo
    before = hashes(target)
    assert main(["promote", "--run", str(run), "--repo", str(target), "--check-sessions", "3"]) == 2
    out, err = capsys.readouterr()
    line = error_line(err, "promote")
    assert message in line and f"{target} serves version" in line and f"the offered RUN {run}" in line
    assert "--force" in line and out == ""
    assert hashes(target) == before


def test_the_served_run_itself_is_refused(world, repo, capsys):
    assert main(["promote", "--run", str(world.run), "--repo", str(repo)]) == 2
    assert "already serves --run" in error_line(capsys.readouterr().err, "promote")


def test_a_concurrent_writer_cannot_slip_in_between_the_score_and_the_write(world, repo, tmp_path, monkeypatch):
    from odmt_t4r import promote
    from odmt_t4r.catalog_update import add_items
    from odmt_t4r.output_folder import OutputFolderError

    (tmp_path / "z.csv").write_text("item_id\nZ0\n")
    refused, real = [], promote.score_served

    def score_while_another_writes(*args):  # add-items started while the served version is scored
        with pytest.raises(OutputFolderError, match="another odmt process is writing") as caught:
            add_items(world.run, tmp_path / "z.csv", out=tmp_path / "run-z", repo=repo, log=quiet)
        refused.append(caught.value)
        return real(*args)

    monkeypatch.setattr(promote, "score_served", score_while_another_writes)
    summary = promote.promote(world.run2, repo, promote.PromoteConfig(check_sessions=3), log=quiet)
    assert refused and summary["version"] == 2 and not (tmp_path / "run-z").exists()


def test_descent_follows_the_append_parents_and_stops_at_a_changed_one(tmp_path):
    from triton_models.repository import descends_from

    def prepared(name, parent=None):
        folder = tmp_path / name
        folder.mkdir()
        record = {"dir": str(parent), "manifest_sha256": sha(parent)} if parent else None
        (folder / "manifest.json").write_text(json.dumps({"name": name, "parent": record}))
        return folder

    sha = lambda d: hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()  # noqa: E731
    d1 = prepared("d1")
    d2 = prepared("d2", d1)
    d3 = prepared("d3", d2)
    assert descends_from(d1, sha(d1)) and descends_from(d3, sha(d1)) and descends_from(d3, sha(d2))
    assert not descends_from(d2, sha(d3)) and not descends_from(prepared("other"), sha(d1))
    (d2 / "manifest.json").write_text(json.dumps({"name": "d2", "parent": None}))  # DIR2 prepared again since
    assert not descends_from(d3, sha(d1))


# -- a live deployment ----------------------------------------------------------------------------------

def served_new_items(client, session: list[str]) -> tuple[set[str], int | None]:
    """The new items the server returns when asked for only them, and how many of them it does not know."""
    answers, _ = client.recommend_with_unknown([session], k=K, include=NEW_ITEMS)
    return {i for i, _ in answers[0]} if answers else set(), (client.unknown_rule_ids or {}).get("include")


def wait_for_version(client, session, deadline_s: float = 180) -> set[str]:
    deadline, seen = time.monotonic() + deadline_s, set()
    while time.monotonic() < deadline and set(NEW_ITEMS) - seen:
        seen, _ = served_new_items(client, session)
        time.sleep(0.2)
    return seen


def test_a_winning_update_is_swapped_into_a_running_server_under_load(world, repo, tmp_path, capsys):
    from tests.test_add_items import serving
    from tests.triton_fixtures import triton_available, under_load
    from triton_models.client import RecommenderClient

    if not triton_available():
        pytest.fail("tritonserver is not installed: promotion under load cannot be tested")
    session = ["i3", "i4", "i5"]
    with serving(repo, tmp_path / "serve.log") as url:
        client = RecommenderClient(url, protocol="http")
        with under_load(url, lambda c: c.recommend([session, ["i10", "i11"]], k=10)) as load:
            assert served_new_items(client, session) == (set(), len(NEW_ITEMS))  # version 1 knows none of them
            before = load.answered
            assert main(["promote", "--run", str(world.run2), "--repo", str(repo), "--check-sessions", "3"]) == 0
            summary = json.loads(capsys.readouterr().out)
            assert summary["promoted"] is True and summary["version"] == 2
            assert summary["run_score"] >= summary["served_score"]
            assert wait_for_version(client, session) == set(NEW_ITEMS), (tmp_path / "serve.log").read_text()[-3000:]
            assert served_new_items(client, session)[1] == 0
            time.sleep(1)
    assert load.answered > before > 0
    assert load.failures == [], load.failures[:3]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["run"] == str(world.run2) and manifest["data_dir"] == str(world.dir2)
    assert "now serving version 2" in (tmp_path / "serve.log").read_text()


def test_a_kill_at_any_point_of_a_promotion_leaves_the_served_version_answering(world, repo, tmp_path, capsys):
    from tests.test_add_items import serving
    from tests.triton_fixtures import triton_available
    from triton_models.client import RecommenderClient
    from triton_models.repository import served_versions

    if not triton_available():
        pytest.fail("tritonserver is not installed: a kill under a running server cannot be tested")
    session = ["i3", "i4", "i5"]
    with serving(repo, tmp_path / "serve.log") as url:
        client = RecommenderClient(url, protocol="http")
        served = client.recommend([session], k=K)
        manifest = (repo / "manifest.json").read_bytes()
        for point in ("promote-before-write", "add-items-before-version", "add-items-before-manifest"):
            killed = odmt("promote", "--run", world.run2, "--repo", repo, "--check-sessions", 3, point=point)
            assert killed.returncode == -9, killed.stderr[-3000:]
            staged = bool(list(tmp_path.glob(".repo.version-*.partial")))  # the stage a kill in add_version leaves
            assert staged == (point != "promote-before-write"), point
            assert (repo / "manifest.json").read_bytes() == manifest
            time.sleep(1.5)  # the server's watcher looks every 0.5 s
            assert client.recommend([session], k=K) == served  # version 1, unchanged
            assert served_new_items(client, session) == (set(), len(NEW_ITEMS))
        # the kill before the manifest left version folder 2 in place, unrecorded: named with the way out
        assert served_versions(repo) == [1, 2]
        assert main(["promote", "--run", str(world.run2), "--repo", str(repo)]) == 2
        line = error_line(capsys.readouterr().err, "promote")
        assert "executor_model/2 is a version folder the manifest does not record" in line
        shutil.rmtree(repo / "executor_model" / "2")  # as the message says; promote clears the staging folders
        assert main(["promote", "--run", str(world.run2), "--repo", str(repo), "--check-sessions", "3"]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 2
        assert not list(tmp_path.glob(".repo.version-*"))
        assert wait_for_version(client, session) == set(NEW_ITEMS), (tmp_path / "serve.log").read_text()[-3000:]
