"""A real tritonserver (CPU) serving a toy python-backend model: client, CLI, errors and cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.triton_fixtures import TOY_K, expected, triton_available, write_toy_repo
from tests.triton_fixtures import toy_repo, triton_server  # noqa: F401  (fixtures, until conftest imports them)
from triton_models.client import RecommenderClient, encode_sessions
from triton_models.server import SHM_DIR, SHM_PREFIX, TritonServer, TritonServerError, free_port, group_pids

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_available(), reason="no tritonserver")]
ROOT = Path(__file__).resolve().parents[1]


def _url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


def _shm(prefix: str) -> list[str]:
    # Only this server's regions: other test sessions may run servers at the same time.
    return [p.name for p in SHM_DIR.glob(f"{prefix}*")]


def _shm_prefix(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return next(a.split("shm-region-prefix-name=")[1] for a in cmdline if "shm-region-prefix-name=" in a)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_round_trip_raw_ids(triton_server, protocol):
    session = ["item-1", "ü/42", "a b,c", "x" * 100]  # raw IDs: unicode, spaces, commas survive
    with RecommenderClient(_url(triton_server, protocol), protocol) as client:
        assert client.is_ready()
        recs = client.recommend([session], k=3)
    assert [i for i, _ in recs[0]] == [i for i, _ in expected(session, 3)]
    assert [s for _, s in recs[0]] == pytest.approx([s for _, s in expected(session, 3)])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batch_of_sessions(triton_server, protocol):
    sessions = [["a"], ["b", "c", "d"], [f"i{n}" for n in range(12)], ["a", "a"]]
    with RecommenderClient(_url(triton_server, protocol), protocol) as client:
        recs = client.recommend(sessions, k=10)  # more than the model's K: returns K
    assert len(recs) == len(sessions)
    for session, got in zip(sessions, recs):
        assert len(got) == TOY_K
        assert [i for i, _ in got] == [i for i, _ in expected(session)]
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def test_recommend_validates_arguments(triton_server):
    with RecommenderClient(triton_server.http_url) as client:
        assert client.recommend([]) == []
        with pytest.raises(ValueError):
            client.recommend([["a"]], k=0)
        with pytest.raises(TypeError):
            client.recommend(["a", "b"])  # a flat list is not a batch of sessions


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_recommend(triton_server, protocol, capsys):
    from odmt_t4r.cli import main

    rc = main(["recommend", "--url", _url(triton_server, protocol), "--protocol", protocol,
               "--items", "a,b,c", "--k", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[0].split() == ["rank", "item_id", "score"]
    rows = [line.split() for line in out[1:]]
    assert [(int(r), i) for r, i, _ in rows] == [(1, "c"), (2, "b"), (3, "a"), (4, "pad0")]
    assert [float(s) for _, _, s in rows] == pytest.approx([1.0, 0.9, 0.8, 0.7])


def test_cli_explain_refuses_a_model_without_per_branch_outputs(triton_server, capsys):
    from odmt_t4r.cli import main

    rc = main(["recommend", "--url", triton_server.http_url, "--items", "a", "--explain"])
    assert rc == 2
    assert "serves no per-branch outputs: export the RUN again" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_unreachable_server(protocol, capsys):
    from odmt_t4r.cli import main

    rc = main(["recommend", "--url", f"127.0.0.1:{free_port()}", "--protocol", protocol, "--items", "a",
               "--timeout", "3"])
    assert rc != 0
    assert "cannot reach a Triton server" in capsys.readouterr().err


def test_keeps_serving_after_bad_requests(triton_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    values, offsets = encode_sessions([["a", "b"]])

    def infer(name_v="item_id-list__values", arr_v=values, dtype_v="BYTES", arr_o=offsets):
        inputs = [httpclient.InferInput(name_v, list(arr_v.shape), dtype_v),
                  httpclient.InferInput("item_id-list__offsets", list(arr_o.shape), "INT32")]
        inputs[0].set_data_from_numpy(arr_v)
        inputs[1].set_data_from_numpy(arr_o)
        return client.infer("executor_model", inputs)

    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        with pytest.raises(InferenceServerException, match="item_id-list__values|wrong_name"):
            infer(name_v="wrong_name")  # unknown input name
        with pytest.raises(InferenceServerException, match="(?i)type|datatype"):
            infer(arr_v=np.array([1, 2], dtype=np.int64), dtype_v="INT64")  # wrong dtype
        with pytest.raises(InferenceServerException, match="bad offsets"):
            infer(arr_o=np.array([0, 5], dtype=np.int32))  # the model's own error
        with pytest.raises(InferenceServerException):
            client.infer("no_such_model", [])
        assert infer().as_numpy("item_ids")[0, :2].tolist() == [b"b", b"a"]
    finally:
        client.close()
    with RecommenderClient(triton_server.grpc_url, "grpc") as grpc_client:
        assert grpc_client.recommend([["z"]], k=1) == [[("z", 1.0)]]


def test_stop_leaves_no_processes_or_shm(toy_repo):
    server = TritonServer(toy_repo).start()
    pgid = server.process.pid
    assert server.shm_prefix.startswith(SHM_PREFIX) and _shm_prefix(pgid) == server.shm_prefix
    stubs = [p for p in group_pids(pgid) if p != pgid]
    assert stubs, "the python backend stub should run in the server's process group"
    assert _shm(server.shm_prefix), "the python backend should hold a shm region while serving"
    with RecommenderClient(server.http_url) as client:
        assert client.recommend([["a"]], k=1) == [[("a", 1.0)]]
    assert server.stop() == 0
    assert group_pids(pgid) == []
    assert _shm(server.shm_prefix) == []
    assert server.stop() == 0  # idempotent


def test_stop_after_kill_cleans_orphans(toy_repo):
    server = TritonServer(toy_repo).start()
    pgid = server.process.pid
    assert _shm(server.shm_prefix)
    os.kill(pgid, signal.SIGKILL)  # a crashed server: its stubs and shm region stay behind
    server.process.wait()
    server.stop()
    assert group_pids(pgid) == []
    assert _shm(server.shm_prefix) == []


def test_bad_repo_fails_fast_with_log_tail(tmp_path):
    repo = write_toy_repo(tmp_path / "repo", init="raise ValueError('boom-in-initialize')")
    t0 = time.monotonic()
    with pytest.raises(TritonServerError, match="exited with code") as info:
        TritonServer(repo, timeout=60).start()
    assert "tritonserver errors ---\n" in str(info.value)
    assert "boom-in-initialize" in str(info.value).split("log (tail)")[0]  # the error lines explain why
    assert time.monotonic() - t0 < 30
    with pytest.raises(FileNotFoundError):
        TritonServer(tmp_path / "missing").start()


def test_readiness_timeout_with_log_tail(tmp_path):
    repo = write_toy_repo(tmp_path / "repo", init="time.sleep(120)")
    server = TritonServer(repo, timeout=3)
    with pytest.raises(TritonServerError, match="not ready after 3 s") as info:
        server.start()
    assert "tritonserver log (tail)" in str(info.value) and "executor_model" in str(info.value)
    assert group_pids(server.process.pid) == []
    assert _shm(server.shm_prefix) == []


@pytest.mark.parametrize("entry, sig", [(["odmt_t4r.cli", "serve"], signal.SIGTERM),
                                        (["triton_models.server"], signal.SIGINT)],
                         ids=["odmt-SIGTERM", "module-SIGINT"])
def test_cli_serve_stops_cleanly(toy_repo, entry, sig):
    port = free_port()
    cmd = [sys.executable, "-m", *entry, "--repo", str(toy_repo), "--http-port", str(port),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()  # printed once the server is ready
        assert first.split() == ["HTTP", f"127.0.0.1:{port}"]
        (triton_pid,) = _children(proc.pid, "tritonserver")  # it leads its own process group
        assert len(group_pids(triton_pid)) >= 2  # the server and its python backend stub
        prefix = _shm_prefix(triton_pid)
        assert _shm(prefix)
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            assert client.recommend([["q"]], k=1) == [[("q", 1.0)]]
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert group_pids(triton_pid) == [] and _shm(prefix) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children(pid: int, command: str = "") -> list[int]:
    """Live children of `pid` whose command line contains `command`."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_text()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and command in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("victim", ["launcher", "launcher-group"])
def test_sigkill_of_odmt_serve_takes_the_server_its_stubs_and_their_shm_along(toy_repo, victim):
    """`odmt serve` killed with no chance to clean up (SIGKILL): tritonserver (PDEATHSIG) and the
    watchdog stop the server's whole process group and free its /dev/shm regions within seconds."""
    import socket

    port = free_port()
    cmd = [sys.executable, "-m", "odmt_t4r.cli", "serve", "--repo", str(toy_repo), "--http-port", str(port),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    triton_pid, prefix = None, None
    try:
        assert proc.stdout.readline().split() == ["HTTP", f"127.0.0.1:{port}"]
        (triton_pid,) = _children(proc.pid, "tritonserver")
        watchdogs = _children(proc.pid, "_watchdog")
        stubs = [p for p in group_pids(triton_pid) if p != triton_pid]
        assert stubs, "the python backend stub runs in the server's process group"
        prefix = _shm_prefix(triton_pid)
        assert _shm(prefix)
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            assert client.recommend([["q"]], k=1) == [[("q", 1.0)]]
        if victim == "launcher":
            os.kill(proc.pid, signal.SIGKILL)
        else:  # e.g. a job control kill of the whole command: the watchdog lives in its own session
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while (group_pids(triton_pid) or _shm(prefix)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_pids(triton_pid) == [], "tritonserver or a stub outlived `odmt serve`"
        assert not any(_alive(p) for p in [triton_pid, *stubs])
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in watchdogs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in watchdogs), "the watchdog exits once the server is gone"
        assert _shm(prefix) == []
        with socket.socket() as sock:  # the port is free for the next server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if triton_pid is not None and group_pids(triton_pid):  # the old behaviour: clean up its orphans
            os.killpg(triton_pid, signal.SIGKILL)
        for path in SHM_DIR.glob(f"{prefix}*") if prefix else []:
            path.unlink(missing_ok=True)


def test_port_in_use_is_refused(toy_repo):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(TritonServerError, match="not free"):
            TritonServer(toy_repo, http_port=busy.getsockname()[1]).start()


def test_stub_copy_falls_back_to_cache_when_read_only(tmp_path, monkeypatch):
    from triton_models import _tritonenv

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = tmp_path / "tritonserver"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"so")
    (root / "python_backend_stubs" / version).mkdir(parents=True)
    (root / "python_backend_stubs" / version / _tritonenv.STUB).write_bytes(b"stub")
    assert _tritonenv.ensure_python_stub(root) == root / "backends"  # writable: next to the backend
    assert (root / "backends" / "python" / _tritonenv.STUB).read_bytes() == b"stub"

    (root / "backends" / "python" / _tritonenv.STUB).unlink()
    real_copy = _tritonenv._atomic_copy

    def read_only(src, dst):
        if root in dst.parents:
            raise PermissionError(13, "read-only file system")
        real_copy(src, dst)

    monkeypatch.setattr(_tritonenv, "_atomic_copy", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    backends = _tritonenv.ensure_python_stub(root)
    assert tmp_path / "cache" in backends.parents
    assert (backends / "python" / _tritonenv.STUB).read_bytes() == b"stub"
    assert (backends / "python" / "libtriton_python.so").exists()
    assert _tritonenv.ensure_python_stub(root) == backends  # idempotent


def test_server_env_puts_venv_and_libpython_first():
    import sysconfig

    from triton_models._tritonenv import find_triton, server_env

    env = server_env(find_triton(), {"PATH": "/usr/bin", "PYTHONHOME": "/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert "PYTHONHOME" not in env
