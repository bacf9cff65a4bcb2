"""Output folders: built next to --out and swapped in whole, replaced only when odmt wrote them, never
deleting the user's files (not even with --force), one writer at a time; and the one atomic-write helper."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from odmt_t4r.cli import main
from odmt_t4r.output_folder import OutputFolder, OutputFolderError, atomic_write
from odmt_t4r.trust import verify_folder, write_manifest
from tests.tiny_data import write_csv_source

FMT = "odmt-prepared/1"


def _write_output(folder: OutputFolder, payload: str) -> None:
    (folder.stage / "sub").mkdir()
    (folder.stage / "sub" / "data.txt").write_text(payload)
    write_manifest(folder.stage, {"format": FMT})
    folder.commit()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != f".{path.name}.lock")


# -- atomic_write ------------------------------------------------------------------------------------

def test_atomic_write_text_bytes_and_writer_callables(tmp_path):
    atomic_write(tmp_path / "a.json", '{"x": 1}')
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "c.npy", lambda tmp: np.save(tmp, np.arange(3)))  # np.save keeps a .npy name as is
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.npy"]  # no temporary files left


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# -- OutputFolder ------------------------------------------------------------------------------------

def test_a_new_folder_is_built_aside_and_swapped_in(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        assert folder.stage.parent == tmp_path and not out.exists()
        _write_output(folder, "one")
    assert (out / "sub" / "data.txt").read_text() == "one"
    verify_folder(out, FMT, "prepared folder")
    assert _siblings(out) == ["DIR"]


def test_odmts_own_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        (folder.stage / "stale.txt").write_text("only in the old output")
        _write_output(folder, "one")
    with OutputFolder(out, FMT) as folder:
        _write_output(folder, "two")
    assert (out / "sub" / "data.txt").read_text() == "two" and not (out / "stale.txt").exists()
    assert _siblings(out) == ["DIR"]


def test_a_failure_inside_the_block_leaves_the_old_output_as_it_was(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        _write_output(folder, "one")
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        with OutputFolder(out, FMT) as folder:
            (folder.stage / "half.txt").write_text("x")
            raise RuntimeError("killed halfway")
    assert (out / "manifest.json").read_text() == before and (out / "sub" / "data.txt").read_text() == "one"
    assert _siblings(out) == ["DIR"]


def test_a_folder_with_the_users_files_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "inputs"
    out.mkdir()
    (out / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(OutputFolderError, match="not a prepared folder written by odmt.*--force"):
        with OutputFolder(out, FMT, what="prepared folder"):
            pass
    assert [p.name for p in out.iterdir()] == ["interactions.csv"]


def test_a_file_added_to_an_odmt_folder_makes_it_the_users(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        _write_output(folder, "one")
    (out / "sub" / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="sub/my_notes.txt"):
        with OutputFolder(out, FMT):
            pass
    assert (out / "sub" / "my_notes.txt").read_text() == "mine"


def test_another_kind_of_odmt_folder_is_refused(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        _write_output(folder, "one")
    with pytest.raises(OutputFolderError, match="another odmt folder"):
        with OutputFolder(out, "odmt-triton-repo/1", what="model repository"):
            pass


def test_force_moves_a_foreign_folder_aside_and_deletes_nothing(tmp_path):
    out = tmp_path / "inputs"
    out.mkdir()
    (out / "interactions.csv").write_text("mine")
    with OutputFolder(out, FMT, force=True) as folder:
        _write_output(folder, "one")
    assert (out / "sub" / "data.txt").read_text() == "one"
    assert folder.backup is not None and folder.backup.parent == tmp_path
    assert (folder.backup / "interactions.csv").read_text() == "mine"
    assert not (out / "interactions.csv").exists()


def test_an_out_that_is_a_file_is_refused_even_with_force(tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("keep me")
    for force in (False, True):
        with pytest.raises(OutputFolderError, match="is a file, not a folder"):
            with OutputFolder(out, FMT, force=force):
                pass
    assert out.read_text() == "keep me"


def test_a_second_writer_to_the_same_out_is_refused(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT):
        with pytest.raises(OutputFolderError, match="another odmt process is writing"):
            with OutputFolder(out, FMT):
                pass
    with OutputFolder(out, FMT) as folder:  # the lock is released with the first writer
        _write_output(folder, "one")


def test_leftovers_of_a_killed_run_are_cleaned_or_restored(tmp_path):
    out = tmp_path / "DIR"
    with OutputFolder(out, FMT) as folder:
        _write_output(folder, "one")
    stage, old = tmp_path / ".DIR.odmt-partial", tmp_path / ".DIR.odmt-old"
    # killed between the fallback's two renames: the old output sits aside, a complete new one is staged
    os.rename(out, old)
    stage.mkdir()
    (stage / "half").write_text("x")
    with OutputFolder(out, FMT):
        assert (out / "sub" / "data.txt").read_text() == "one"  # restored before anything else happens
        assert not old.exists() and stage.is_dir() and not (stage / "half").exists()
    assert _siblings(out) == ["DIR"]


# -- the commands ------------------------------------------------------------------------------------

@pytest.fixture()
def csv_inputs(tmp_path):
    """A tiny csv source inside tmp_path/inputs."""
    write_csv_source(tmp_path / "inputs")
    return tmp_path / "inputs"


def _prepare(inputs: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--source", "csv", "--interactions", str(inputs / "inter.csv"),
                 "--items", str(inputs / "items.csv"), "--no-features", "--out", str(out), *extra])


def test_prepare_into_the_folder_holding_its_inputs_is_refused_then_forced_without_loss(csv_inputs, capsys):
    before = {p.name: p.read_bytes() for p in csv_inputs.iterdir()}
    assert _prepare(csv_inputs, csv_inputs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("odmt prepare: error: --out") and "--force" in err[-1]
    assert {p.name: p.read_bytes() for p in csv_inputs.iterdir()} == before

    assert _prepare(csv_inputs, csv_inputs, "--force") == 0
    verify_folder(csv_inputs, FMT, "prepared folder")
    (backup,) = csv_inputs.parent.glob("inputs.backup-*")
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before


def test_prepare_out_naming_a_file_is_one_clear_error(csv_inputs, capsys):
    target = csv_inputs / "inter.csv"
    before = target.read_bytes()
    assert _prepare(csv_inputs, target) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"odmt prepare: error: --out {target} is a file, not a folder; give a folder path"
    assert target.read_bytes() == before


def test_prepare_replaces_its_own_output_and_refuses_a_concurrent_writer(csv_inputs, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert _prepare(csv_inputs, out) == 0
    assert _prepare(csv_inputs, out, "--max-length", "3") == 0
    assert json.loads((out / "manifest.json").read_text())["max_length"] == 3
    before = (out / "manifest.json").read_text()
    with OutputFolder(out, FMT):  # another process at work on the same --out
        assert _prepare(csv_inputs, out, "--max-length", "4") == 2
    assert "another odmt process is writing" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert _siblings(out) == ["inputs", "prepared"]
