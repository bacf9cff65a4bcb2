"""The trust boundary: `export` and `serve` check a folder's manifest (every file's sha256, and the HMAC
signature when ODMT_SIGNING_KEY is set) before they unpickle anything from it."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from odmt_t4r.cli import main
from odmt_t4r.trust import SIGNING_KEY_ENV, TrustError, verify_folder, write_run_manifest
from tests.tiny_data import prepare_tiny, untrained_run
from triton_models.export import FORMAT as REPO_FORMAT
from triton_models.export import ServingConfig, export

ROOT = Path(__file__).resolve().parents[1]
PREPARED = "odmt-prepared/1"


class _RunsCode:
    """Unpickling this creates `marker`: what a crafted workflow.pkl or ensemble.pkl could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _export(run, repo, data_dir, **kw) -> int:
    return main(["export", "--run", str(run), "--out", str(repo), "--data", str(data_dir), "--check-sessions", "5",
                 *[f"--{k}={v}" for k, v in kw.items()]])


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"odmt {command}: error: ")
    return line


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory):
    """(prepared DIR, RUN, REPO), written without a signing key."""
    os.environ.pop(SIGNING_KEY_ENV, None)
    root = tmp_path_factory.mktemp("trust")
    data = prepare_tiny(root / "inputs", root / "prepared")
    run = untrained_run(data, root / "run")
    export(run, root / "repo", ServingConfig(k=3), data_dir=data, check_sessions=5, log=lambda m: None)
    return data, run, root / "repo"


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """(prepared DIR, RUN, REPO), written with ODMT_SIGNING_KEY=right-key."""
    root = tmp_path_factory.mktemp("trust-signed")
    os.environ[SIGNING_KEY_ENV] = "right-key"
    try:
        data = prepare_tiny(root / "inputs", root / "prepared")
        run = untrained_run(data, root / "run")
        write_run_manifest(run)  # what training does when it finishes (an unsigned RUN is refused)
        export(run, root / "repo", ServingConfig(k=3), data_dir=data, check_sessions=5, log=lambda m: None)
    finally:
        os.environ.pop(SIGNING_KEY_ENV, None)
    return data, run, root / "repo"


def test_manifests_record_the_full_sha256_of_every_pickle(unsigned):
    data, _, repo = unsigned
    files = json.loads((data / "manifest.json").read_text())["files"]
    assert {f"workflows/{w}/workflow.pkl" for w in ("sessions", "train", "valid", "test", "inference")} <= set(files)
    assert all(len(h) == 64 for h in files.values())
    files = json.loads((repo / "manifest.json").read_text())["files"]
    assert {"executor_model/1/ensemble/ensemble.pkl", "executor_model/1/model.py",
            "executor_model/config.pbtxt"} <= set(files)
    assert "signature" not in json.loads((repo / "manifest.json").read_text())


def test_a_crafted_workflow_pickle_is_refused_before_it_runs(unsigned, tmp_path, capsys):
    data, run, _ = unsigned
    copy = shutil.copytree(data, tmp_path / "prepared")
    marker = tmp_path / "code-ran"
    (copy / "workflows" / "inference" / "workflow.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    assert _export(run, tmp_path / "repo", copy) == 2
    line = _error_line(capsys, "export")
    assert "workflows/inference/workflow.pkl changed since it was written" in line
    assert not marker.exists() and not (tmp_path / "repo").exists()


def test_an_unrecorded_pickle_is_refused(unsigned, tmp_path):
    data, _, _ = unsigned
    copy = shutil.copytree(data, tmp_path / "prepared")
    (copy / "workflows" / "extra.pkl").write_bytes(pickle.dumps(1))
    with pytest.raises(TrustError, match="workflows/extra.pkl is not recorded"):
        verify_folder(copy, PREPARED, "prepared folder")


def test_serve_refuses_a_tampered_or_extended_repository_before_starting_triton(unsigned, tmp_path, capsys):
    _, _, repo = unsigned
    tampered = shutil.copytree(repo, tmp_path / "tampered")
    marker = tmp_path / "code-ran"
    (tampered / "executor_model" / "1" / "ensemble" / "ensemble.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    assert main(["serve", "--repo", str(tampered)]) == 2
    assert "ensemble/ensemble.pkl changed since it was written" in _error_line(capsys, "serve")

    extended = shutil.copytree(repo, tmp_path / "extended")  # Triton would load and run any added model
    (extended / "other_model" / "1").mkdir(parents=True)
    (extended / "other_model" / "1" / "model.py").write_text("import os\n")
    assert main(["serve", "--repo", str(extended)]) == 2
    assert "other_model/1/model.py is not recorded" in _error_line(capsys, "serve")

    assert main(["serve", "--repo", str(tmp_path)]) == 2  # no manifest at all
    assert "has no manifest.json" in _error_line(capsys, "serve")
    assert not marker.exists()


def test_signed_manifests_load_with_the_right_key_only(signed, unsigned, tmp_path, monkeypatch, capsys):
    data, run, repo = signed
    for folder in (data, repo):
        assert json.loads((folder / "manifest.json").read_text())["signature"]["algorithm"] == "hmac-sha256"

    monkeypatch.setenv(SIGNING_KEY_ENV, "right-key")
    verify_folder(repo, REPO_FORMAT, "model repository", strict=True)
    assert _export(run, tmp_path / "repo", data) == 0  # the prepared DIR's signature checks out
    verify_folder(tmp_path / "repo", REPO_FORMAT, "model repository", strict=True)  # and the new one is signed

    monkeypatch.setenv(SIGNING_KEY_ENV, "wrong-key")
    assert _export(run, tmp_path / "repo2", data) == 2
    assert "signature does not match ODMT_SIGNING_KEY (it was signed with another key)" in _error_line(capsys, "export")
    assert main(["serve", "--repo", str(repo)]) == 2
    assert "signed with another key" in _error_line(capsys, "serve")

    monkeypatch.setenv(SIGNING_KEY_ENV, "right-key")
    assert main(["serve", "--repo", str(unsigned[2])]) == 2  # a key is set: unsigned folders are refused
    assert "is not signed, but ODMT_SIGNING_KEY is set" in _error_line(capsys, "serve")
    edited = shutil.copytree(repo, tmp_path / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["k"] = 50  # an edit that keeps every file hash valid
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrustError, match="changed after it was signed"):
        verify_folder(edited, REPO_FORMAT, "model repository", strict=True)


@pytest.mark.slow
def test_odmt_serve_loads_a_signed_repository_with_the_right_key(signed):
    from triton_models.client import RecommenderClient
    from triton_models.server import free_port

    _, _, repo = signed
    port = free_port()
    env = {**os.environ, SIGNING_KEY_ENV: "right-key"}
    cmd = [sys.executable, "-m", "odmt_t4r.cli", "serve", "--repo", str(repo), "--http-port", str(port),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().split() == ["HTTP", f"127.0.0.1:{port}"]
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            (answer,) = client.recommend([["i0", "i1"]], k=3)
        assert len(answer) == 3 and not {"i0", "i1"} & {i for i, _ in answer}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
