"""Issue 9, training side: every bad input to `odmt train` / `odmt evaluate` is one line
`odmt <command>: error: ...` with exit code 2, results on stdout, and RUN folders are never clobbered."""

import json
import pytest

from tests.synthetic import make_synthetic_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 32, "eval_batch_size": 64,
        "modalities": ["id", "text"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared"), n_users=24, n_items=16, max_length=5,
                                   text_tokens=4, image_tokens=4, text_dim=16, image_dim=16)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "fast.json"
    path.write_text(json.dumps(FAST))
    return path


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def odmt(*args):
    """`odmt ARGS` in this process (the CLI's own entry point), its exit code and captured streams."""
    import contextlib
    import io

    from odmt_t4r.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, command, *phrases):
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"odmt {command}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in last, last


@pytest.fixture(scope="module")
def trained(data_dir, config, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    result = odmt("train", "--data", data_dir, "--out", run, "--config", config, "--epochs", 2, "--no-progress")
    assert result.returncode == 0, result.stderr
    return run, result


def test_train_prints_only_its_json_summary_on_stdout(trained):
    _, result = trained
    summary = json.loads(result.stdout)  # logs went to stderr
    assert summary["epochs_run"] == 2 and "fusion" in summary
    assert "epoch   1/2" in result.stderr


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ('{"d_modle": 8}', "unknown training config keys"),
    ('{"d_model": "sixty-four"}', "'d_model' must be"),
    ('{"kd_mode": "sideways"}', "kd_mode"),
])
def test_a_bad_config_file_is_one_clear_error(data_dir, tmp_path, content, phrase):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", tmp_path / "run", "--config", bad), "train", phrase)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_missing_config_file_and_zero_epochs_are_refused(data_dir, config, tmp_path):
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", tmp_path / "r", "--config", tmp_path / "nope.json"),
                          "train", "does not exist")
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", tmp_path / "r", "--config", config, "--epochs", 0),
                          "train", "--epochs must be >= 1")


def test_train_refuses_a_folder_that_is_not_its_own_resumable_run(data_dir, config, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.pt").write_bytes(b"someone else's")
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", busy, "--config", config, "--epochs", 1),
                          "train", "not empty")
    assert (busy / "model.pt").read_bytes() == b"someone else's"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", a_file, "--config", config), "train", "is a file")


def test_a_prepared_folder_with_only_a_manifest_is_named_as_incomplete(data_dir, config, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_text((data_dir / "manifest.json").read_text())
    assert_one_line_error(odmt("train", "--data", partial, "--out", tmp_path / "r", "--config", config),
                          "train", "not a complete prepared DIR")


def test_a_corrupted_checkpoint_on_resume_is_a_clear_error(trained, data_dir, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])  # truncated
    assert_one_line_error(odmt("train", "--data", data_dir, "--out", run, "--resume"), "train", "checkpoint.pt", "corrupted")


def test_a_truncated_model_in_evaluate_is_a_clear_error(trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:200])
    assert_one_line_error(odmt("evaluate", "--run", run, "--split", "valid", "--no-progress"), "evaluate",
                          "model.pt", "truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(odmt("evaluate", "--run", empty), "evaluate", "no trained model")
