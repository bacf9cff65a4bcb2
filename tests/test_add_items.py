"""`odmt add-items`: new items scored from their content, the grown RUN, its checks and errors, and the new
version of a model repository swapped into a running `odmt serve` under load."""

from __future__ import annotations

import contextlib
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

from odmt_t4r.catalog_update import add_items
from odmt_t4r.contract import ADDED_ITEMS, run_item_ids

N_ITEMS, K = 60, 80  # K > the catalog: every unseen item is in each answer, new ones included


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from odmt_t4r.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("add_items") / "fashion"
    prepare(PrepareConfig(source="fashion", n_items=N_ITEMS, out=str(out)))
    return out


def _saved(model, data_dir, out):
    model.save_pretrained(out, extra={"data": {"dir": str(data_dir)}})
    return out


@pytest.fixture(scope="module")
def odmt_run(data_dir, tmp_path_factory):
    from odmt_t4r.model import build_model

    torch.manual_seed(0)
    model = build_model("odmt", data_dir, d_model=16, n_heads=2, seq_layers=1, imt_layers=1)
    with torch.no_grad():  # as training would: the ID rows move away from their content init
        model.item_tower.id_embedding.weight[3:] += 0.1 * torch.randn_like(model.item_tower.id_embedding.weight[3:])
    model.set_fusion({"id": 0.5, "text": 0.3, "image": 0.2}, "log_softmax")
    return _saved(model, data_dir, tmp_path_factory.mktemp("add_items") / "odmt")


@pytest.fixture(scope="module")
def catalog(data_dir):
    items = pd.read_parquet(data_dir / "items.parquet")
    items["image"] = [str(data_dir / p) if not os.path.isabs(p) else p for p in items["image"]]
    return items


def new_items_csv(folder: Path, catalog: pd.DataFrame, copies: list[int], prefix: str = "NEW") -> Path:
    """New items whose text and image are those of catalog rows `copies`: same content, new IDs."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = catalog.iloc[copies]
    frame = pd.DataFrame({"item_id": [f"{prefix}{i}" for i in range(len(rows))], "text": rows["text"].to_numpy(),
                          "image": rows["image"].to_numpy()})
    path = folder / "new.csv"
    frame.to_csv(path, index=False)
    return path


def test_new_items_get_the_content_vectors_of_their_content(odmt_run, data_dir, catalog, tmp_path):
    from odmt_t4r.model import OdmtRecommender

    csv = new_items_csv(tmp_path, catalog, [0, 5, 9])
    summary = add_items(odmt_run, csv, out=tmp_path / "grown")
    grown_dir = Path(summary["run"])
    old = OdmtRecommender.from_pretrained(odmt_run, data_dir=data_dir)
    grown = OdmtRecommender.from_pretrained(grown_dir)
    n = old.config.n_index
    assert grown.config.n_index == n + 3 and summary["first_index"] == n
    ids = run_item_ids(grown_dir)
    assert ids[n:].tolist() == ["NEW0", "NEW1", "NEW2"]
    old_cat, new_cat = old.catalog_vectors(), grown.catalog_vectors()
    src = catalog["item_idx"].to_numpy()[[0, 5, 9]]
    for b in ("text", "image"):  # content tokens never see the ID token: same content, same vector
        torch.testing.assert_close(new_cat[b][n:], old_cat[b][src], atol=1e-5, rtol=0)
        torch.testing.assert_close(new_cat[b][:n], old_cat[b])
    torch.testing.assert_close(new_cat["id"][:n], old_cat["id"])
    assert not torch.allclose(new_cat["id"][n:], old_cat["id"][src])  # the content init, not the trained ID row
    # a grown RUN scores histories holding the new items, and can recommend them
    history = torch.tensor([[n, n + 1, 0, 0]])
    scores = grown.score(history)
    assert scores["fused"].shape == (1, n + 3) and torch.isfinite(scores["fused"][0, n + 2])
    assert (n + 2) in grown.recommend(history, k=n)[1][0].tolist()
    # chained: a second add keeps the first one's items and indices
    again = add_items(grown_dir, new_items_csv(tmp_path / "b", catalog, [1], prefix="MORE"))
    assert Path(again["run"]).name == "odmt.v2" or Path(again["run"]).name.endswith(".v2")
    assert run_item_ids(again["run"])[n:].tolist() == ["NEW0", "NEW1", "NEW2", "MORE0"]
    assert len(pd.read_parquet(Path(again["run"]) / ADDED_ITEMS)) == 4


def test_new_items_count_as_a_typical_item_in_the_popularity_prior(odmt_run, data_dir, catalog, tmp_path):
    from odmt_t4r.model import OdmtRecommender

    old = OdmtRecommender.from_pretrained(odmt_run, data_dir=data_dir)
    n = old.config.n_index
    median = float(np.median(old.train_count[3:n].numpy()))
    assert median > 0
    csv = new_items_csv(tmp_path, catalog, [0, 5])
    grown = OdmtRecommender.from_pretrained(add_items(odmt_run, csv, out=tmp_path / "median")["run"])
    zero = OdmtRecommender.from_pretrained(add_items(odmt_run, csv, out=tmp_path / "zero", assumed_count=0)["run"])
    assert grown.train_count[n:].tolist() == [median, median] and zero.train_count[n:].tolist() == [0.0, 0.0]
    history = torch.tensor([[3, 4, 0, 0]])
    gap = grown.score(history)["id"][0, n:] - zero.score(history)["id"][0, n:]
    torch.testing.assert_close(gap, (grown.popularity_weight[0] * np.log1p(median)).expand(2))
    with pytest.raises(ValueError, match="assumed-count"):
        add_items(odmt_run, csv, out=tmp_path / "bad", assumed_count="typical")


def test_an_id_only_model_gives_new_items_an_untrained_random_vector(data_dir, catalog, tmp_path):
    from odmt_t4r.model import OdmtRecommender, build_model

    torch.manual_seed(0)
    run = _saved(build_model("sasrec", data_dir, d_model=16, n_heads=2, seq_layers=1), data_dir, tmp_path / "sasrec")
    csv = new_items_csv(tmp_path, catalog, [0, 1]).read_text()
    (tmp_path / "ids.csv").write_text("\n".join(line.split(",")[0] for line in csv.splitlines()) + "\n")
    grown = OdmtRecommender.from_pretrained(add_items(run, tmp_path / "ids.csv")["run"])
    vecs = grown.catalog_vectors()["id"][-2:]
    assert vecs.abs().sum() > 0 and not torch.allclose(vecs[0], vecs[1])


@pytest.mark.parametrize("problem, edit, message", [
    ("duplicate", lambda f, c: f.assign(item_id=[c["item_id"].iloc[3], "X1"]), "already in the model"),
    ("no text column", lambda f, c: f.drop(columns=["text"]), "has no 'text' column"),
    ("empty text", lambda f, c: f.assign(text=["a shirt", ""]), "have no text"),
    ("bad image", lambda f, c: f.assign(image=["broken.png", f["image"].iloc[1]]), "cannot be read"),
])
def test_bad_new_items_are_refused_with_one_line(odmt_run, catalog, tmp_path, problem, edit, message):
    csv = new_items_csv(tmp_path, catalog, [0, 1], prefix="X")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    edit(pd.read_csv(csv), catalog).to_csv(csv, index=False)
    done = subprocess.run([sys.executable, "-m", "odmt_t4r.cli", "add-items", "--run", str(odmt_run), "--items",
                           str(csv), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("odmt add-items: error:")
    assert message in done.stderr and not (tmp_path / "out").exists()


# -- a live deployment -----------------------------------------------------------------------------

def _serve(repo: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from triton_models.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "odmt_t4r.cli", "serve", "--repo", str(repo), "--http-port",
                             ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--watch-seconds", "0.5"],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()  # "HTTP  http://..." once every model is ready
    assert line.startswith("HTTP"), log.read_text()[-3000:]
    return proc, f"127.0.0.1:{ports[0]}"


@contextlib.contextmanager
def serving(repo: Path, log: Path):
    """`odmt serve` on `repo` for the block; yields its HTTP address."""
    proc, url = _serve(repo, log)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_add_items_swaps_a_new_version_into_a_running_server_under_load(odmt_run, data_dir, catalog, tmp_path):
    from tests.triton_fixtures import triton_available, under_load
    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export
    from triton_models.checks import example_sessions

    if not triton_available():
        pytest.fail("tritonserver is not installed: the hot update cannot be tested")
    repo = tmp_path / "repo"
    export(odmt_run, repo, ServingConfig(k=K), check_sessions=10)
    sessions = example_sessions(data_dir, 8)
    with serving(repo, tmp_path / "serve.log") as url:
        with under_load(url, lambda client: client.recommend(sessions[:2]), clients=4) as load:
            before = load.answered
            summary = add_items(odmt_run, new_items_csv(tmp_path, catalog, [2, 4, 6]), out=tmp_path / "v2", repo=repo)
            assert summary["repo_version"] == 2
            new_ids = {"NEW0", "NEW1", "NEW2"}
            client = RecommenderClient(url, protocol="http")
            deadline, seen = time.monotonic() + 180, set()
            while time.monotonic() < deadline and not new_ids <= seen:
                seen = {i for answer in client.recommend([sessions[0]], k=K) for i, _ in answer}
                time.sleep(0.2)
            assert new_ids <= seen, (tmp_path / "serve.log").read_text()[-3000:]
            # a session of new items is understood (not OOV): the answer equals the grown RUN's in-process one
            from odmt_t4r.model import OdmtRecommender
            from triton_models.checks import reference_recommend
            from triton_models.graph import load_inference_workflow

            grown = OdmtRecommender.from_pretrained(tmp_path / "v2")
            want, _ = reference_recommend(grown, load_inference_workflow(data_dir), run_item_ids(tmp_path / "v2"),
                                          [["NEW0", "NEW1"]], K)
            got = [i for i, _ in client.recommend([["NEW0", "NEW1"]], k=K)[0]]
            assert got == [i for i in want[0] if i]
            time.sleep(1)
    assert load.answered > before > 0
    assert load.failures == [], load.failures[:3]
    assert "now serving version 2" in (tmp_path / "serve.log").read_text()


def test_a_failed_add_leaves_the_repository_as_it_was(odmt_run, catalog, tmp_path, monkeypatch):
    from odmt_t4r.trust import verify_folder
    from triton_models import repository
    from triton_models.export import ServingConfig, export

    repo = tmp_path / "repo"
    export(odmt_run, repo, ServingConfig(k=K), check_sessions=5)
    before = (repo / "manifest.json").read_bytes()

    def broken(*a, **k):  # fails after the new version folder is in place, before the manifest records it
        raise OSError("disk full")

    monkeypatch.setattr(repository, "describe", broken)
    with pytest.raises(OSError, match="disk full.*unchanged"):
        add_items(odmt_run, new_items_csv(tmp_path, catalog, [1]), out=tmp_path / "v2", repo=repo)
    assert (repo / "manifest.json").read_bytes() == before
    assert repository.served_versions(repo) == [1]
    assert not list(tmp_path.glob(".repo.version-*"))
    verify_folder(repo, repository.FORMAT, "repo", strict=True)
