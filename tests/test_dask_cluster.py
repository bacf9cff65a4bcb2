"""`odmt prepare` on a Dask cluster (`--dask-workers N`, `--dask-scheduler ADDRESS`): the same prepared
folder as one process, row for row, and no worker process left behind."""

import sys
import time
import types
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import nvtabular as nvt
import pandas as pd
import psutil
import pytest
from distributed import LocalCluster
from merlin.core.utils import global_dask_client

from odmt_t4r.cli import main
from odmt_t4r.prepare import PrepareConfig, dask_cluster, read_split
from workflows import sessions as W

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> list[str]:
    """60 users with 1 to 14 interactions (some below 3, some cut into training windows), many equal
    timestamps (the input row order decides), 25 catalog items of which a few are never seen."""
    folder = tmp_path_factory.mktemp("dask-src")
    rng = np.random.default_rng(7)
    rows = [(f"user{u:02d}", f"item{rng.integers(0, 22)}", int(1_700_000_000 + rng.integers(0, 6)))
            for u in range(60) for _ in range(rng.integers(1, 15))]
    order = rng.permutation(len(rows))  # users interleaved through the file
    pd.DataFrame([rows[i] for i in order], columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"item{k}" for k in range(25)]}).to_csv(folder / "items.csv", index=False)
    return ["--source", "csv", "--interactions", str(folder / "inter.csv"), "--items", str(folder / "items.csv"),
            "--no-features", "--max-length", "4"]


@pytest.fixture(scope="module")
def single_process(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "data"
    assert main(["prepare", *source, "--out", str(out)]) == 0
    return out


def _processes_below_us() -> set[int]:
    resource_tracker.ensure_running()  # multiprocessing's helper: one per interpreter, lives until it exits
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _assert_no_new_processes(before: set[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := _processes_below_us() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"worker processes left behind: {sorted(left)}"


def _assert_same_prepared(want: Path, got: Path) -> None:
    for split in SPLITS:
        pd.testing.assert_frame_equal(read_split(got / split), read_split(want / split))  # row for row
    vocabularies = sorted(p.relative_to(want) for p in (want / "categories").rglob("*.parquet"))
    assert vocabularies and vocabularies == sorted(p.relative_to(got) for p in (got / "categories").rglob("*.parquet"))
    for path in vocabularies:
        pd.testing.assert_frame_equal(pd.read_parquet(got / path), pd.read_parquet(want / path))
    pd.testing.assert_frame_equal(pd.read_parquet(got / "items.parquet"), pd.read_parquet(want / "items.parquet"))


def test_partition_by_user_keeps_every_history_whole_and_in_user_order():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": rng.choice([f"u{i:02d}" for i in range(30)], 400), "item_id": "x",
                       W.ROW_COL: np.arange(400)})
    ds = nvt.Dataset(df, npartitions=3)
    before = [set(p.compute()["user_id"]) for p in ds.to_ddf().partitions]
    assert len(before[0] & before[1]) > 0  # the input does split users across partitions

    parts = [p.compute() for p in W.partition_by_user(ds, 3).to_ddf().partitions]
    assert len(parts) == 3 and all(len(p) > 80 for p in parts)  # about equal row counts
    users = [set(p["user_id"]) for p in parts]
    assert all(not (a & b) for i, a in enumerate(users) for b in users[i + 1:])  # each user in one partition
    assert [max(u) < min(v) for u, v in zip(users, users[1:])] == [True, True]  # contiguous ranges, in order
    together = pd.concat(parts).sort_values(W.ROW_COL).reset_index(drop=True)
    pd.testing.assert_frame_equal(together[df.columns], df)  # every row kept, none changed


def test_two_worker_cluster_gives_the_single_process_folder(source, single_process, tmp_path, capsys):
    before = _processes_below_us()
    out = tmp_path / "data"
    assert main(["prepare", *source, "--dask-workers", "2", "--partitions", "3", "--out", str(out)]) == 0
    assert "on Dask: 2 workers at tcp://127.0.0.1:" in capsys.readouterr().err
    assert len(list((out / "test").glob("*.parquet"))) == 3  # more partitions than workers
    _assert_same_prepared(single_process, out)
    assert global_dask_client() is None  # merlin does not keep the closed client
    _assert_no_new_processes(before)


def test_a_failed_prepare_closes_its_cluster(source, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        assert global_dask_client() is not None  # it did run on the cluster
        raise RuntimeError("workflow failed on the cluster")

    monkeypatch.setattr(W, "run_session_workflows", fail)
    before = _processes_below_us()
    assert main(["prepare", *source, "--dask-workers", "2", "--out", str(tmp_path / "data")]) == 2
    assert "workflow failed on the cluster" in capsys.readouterr().err
    assert global_dask_client() is None
    _assert_no_new_processes(before)


def test_dask_scheduler_runs_on_a_running_cluster_and_leaves_it_running(source, single_process, tmp_path, capsys):
    out = tmp_path / "data"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        transitions = cluster.scheduler.transition_counter
        assert main(["prepare", *source, "--dask-scheduler", cluster.scheduler_address, "--out", str(out)]) == 0
        assert cluster.scheduler.transition_counter > transitions + 50  # its workers ran the workflows
        assert len(cluster.scheduler.workers) == 2 and cluster.status.name == "running"
    assert f"on Dask: 2 workers at {cluster.scheduler_address}" in capsys.readouterr().err
    _assert_same_prepared(single_process, out)
    assert global_dask_client() is None


def test_dask_workers_and_dask_scheduler_exclude_each_other(source, tmp_path, capsys):
    args = ["prepare", *source, "--dask-workers", "2", "--dask-scheduler", "tcp://127.0.0.1:8786", "--out", str(tmp_path / "d")]
    assert main(args) == 2
    assert "give one of them" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_gpus_get_a_local_cuda_cluster_bound_to_localhost(monkeypatch):
    started = {}

    def local_cuda_cluster(**options):  # stands in for dask-cuda's cluster: one in-process worker
        started.update(options)
        return LocalCluster(n_workers=1, processes=False, dashboard_address=None)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=local_cuda_cluster))
    monkeypatch.setattr(W, "on_gpu", lambda: True)
    with dask_cluster(PrepareConfig(dask_workers=2)) as client:
        assert client is not None and global_dask_client() is client
    assert started == {"n_workers": 2, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
    assert global_dask_client() is None
