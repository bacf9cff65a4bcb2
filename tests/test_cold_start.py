"""Cold start: `odmt prepare --cold-items` holds out the items whose first interaction comes last, and
`odmt evaluate --slice cold` scores the users whose test target is one of them, on an add-items RUN."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from odmt_t4r.cli import main
from odmt_t4r.contract import (ADDED_ITEMS, COLD_ITEMS, COLD_TEST, RESERVED_ROWS, catalog_item_ids, read_cold_test,
                               read_split)

T0 = 1_700_000_000
# (user, item, second): rows in input-file order. Items e and h are first seen last (e ties c at 950 but
# comes later in the file); j is the rarest item but seen first, so neither popularity nor ID order decides.
ROWS = [
    ("u0", "a", 10), ("u0", "b", 20), ("u0", "c", 950), ("u0", "d", 1000),
    ("u1", "b", 11), ("u1", "a", 21), ("u1", "e", 950), ("u1", "f", 1001),  # e in the middle: dropped
    ("u2", "a", 12), ("u2", "d", 22), ("u2", "f", 32), ("u2", "h", 990),  # cold target h
    ("u3", "j", 5), ("u3", "c", 960), ("u3", "e", 970), ("u3", "a", 980), ("u3", "h", 995),  # h after cold e
    ("u4", "e", 975), ("u4", "h", 996),  # cold target but no non-cold history: no row
    ("u5", "a", 13), ("u5", "b", 23), ("u5", "d", 33), ("u5", "g", 43),
    ("u6", "b", 14), ("u6", "d", 24), ("u6", "g", 34), ("u6", "f", 44), ("u6", "i", 54),
    ("u7", "d", 15), ("u7", "c", 1100), ("u7", "b", 1110),
]
ITEMS = list("abcdefghij")


def write_source(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([(u, i, T0 + s) for u, i, s in ROWS], columns=["user_id", "item_id", "timestamp"]).to_csv(
        folder / "inter.csv", index=False)
    pd.DataFrame({"item_id": ITEMS, "text": [f"{i} product, size {k}" for k, i in enumerate(ITEMS)]}).to_csv(
        folder / "items.csv", index=False)
    return ["--source", "csv", "--interactions", str(folder / "inter.csv"), "--items", str(folder / "items.csv"),
            "--no-features", "--max-length", "4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("cold_src"))


@pytest.fixture(scope="module")
def cold_dir(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("cold") / "dir"
    assert main(["prepare", *source, "--out", str(out), "--cold-items", "0.2"]) == 0
    return out


def split_ids(d: Path, split: str) -> dict[int, list[str]]:
    ids = catalog_item_ids(d)
    frame = read_split(d / split)
    return {int(u): [ids[i] for i in items] for u, items in zip(frame["user_idx"], frame["item_id-list"])}


def test_the_items_first_seen_last_are_held_out(cold_dir):
    m = json.loads((cold_dir / "manifest.json").read_text())
    assert m["cold"]["items"] == 2 and m["cold"]["items_with_interactions"] == 10
    held = pd.read_csv(cold_dir / COLD_ITEMS, dtype=str)
    assert held["item_id"].tolist() == ["e", "h"]  # by first interaction; c ties e at 950 but comes first in the file
    assert held["text"].tolist() == ["e product, size 4", "h product, size 7"]
    assert m["cold"]["interactions_dropped"] == 6 and m["cold"]["first_interaction_from_ms"] == (T0 + 950) * 1000


def test_held_out_items_are_absent_from_catalog_vocabulary_and_splits(cold_dir):
    items = pd.read_parquet(cold_dir / "items.parquet")
    assert sorted(items["item_id"]) == ["a", "b", "c", "d", "f", "g", "i", "j"]
    assert items["item_idx"].tolist() == list(range(RESERVED_ROWS, RESERVED_ROWS + 8))
    vocab = pd.concat(pd.read_parquet(p) for p in (cold_dir / "categories").rglob("*item_id*.parquet"))
    assert not set(vocab.iloc[:, 0].dropna().astype(str)) & {"e", "h"}
    m = json.loads((cold_dir / "manifest.json").read_text())
    assert m["n_index"] == RESERVED_ROWS + 8 and m["counts"]["items"] == 8
    for split in ("train", "valid", "test"):
        for history in split_ids(cold_dir, split).values():
            assert "" not in history and not {"e", "h"} & set(history), split
    # u1's e is dropped from the middle of the history: the normal test row is b, a -> f
    assert ["b", "a", "f"] in split_ids(cold_dir, "test").values()


def test_cold_test_rows_are_the_users_whose_last_item_is_held_out(cold_dir):
    rows = read_cold_test(cold_dir).set_index("user_id")
    ids = catalog_item_ids(cold_dir)
    assert sorted(rows.index) == ["u2", "u3"]  # u4 has no earlier item that is not held out
    assert [ids[i] for i in rows.loc["u2", "history"]] == ["a", "d", "f"]
    assert [ids[i] for i in rows.loc["u3", "history"]] == ["j", "c", "a"]
    assert rows["target_id"].tolist() == ["h", "h"]
    assert list(rows.loc["u3", "earlier_cold_ids"]) == ["e"] and list(rows.loc["u2", "earlier_cold_ids"]) == []
    m = json.loads((cold_dir / "manifest.json").read_text())
    assert m["cold"]["test_users"] == 2 and m["cold"]["cold_target_users_without_history"] == 1
    assert {COLD_ITEMS, COLD_TEST} <= set(m["files"])  # hashed like every file of DIR


def test_cold_items_zero_prepares_exactly_as_before(source, tmp_path):
    assert main(["prepare", *source, "--out", str(tmp_path / "plain")]) == 0
    assert main(["prepare", *source, "--out", str(tmp_path / "zero"), "--cold-items", "0"]) == 0
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    assert not (zero / "cold").exists() and json.loads((zero / "manifest.json").read_text())["cold"] is None
    pd.testing.assert_frame_equal(pd.read_parquet(plain / "items.parquet"), pd.read_parquet(zero / "items.parquet"))
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(read_split(plain / split), read_split(zero / split))
    assert len(pd.read_parquet(zero / "items.parquet")) == 10


@pytest.mark.parametrize("fraction, message", [("1", "in [0, 1)"), ("-0.1", "in [0, 1)"), ("0.05", "holds out no item")])
def test_cold_items_out_of_range_is_refused(source, tmp_path, capsys, fraction, message):
    assert main(["prepare", *source, "--out", str(tmp_path / "x"), "--cold-items", fraction]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("odmt prepare: error:") and message in last


def test_fashion_cold_items_csv_reads_back_as_a_catalog(tmp_path):
    """The held-out photos stay in DIR/raw_images; cold/items.csv points at them relative to itself,
    so the catalog reader `odmt add-items` uses resolves them (also after DIR moves)."""
    from odmt_t4r.data.base import validate_items
    from odmt_t4r.data.sources import read_csv_exact

    out = tmp_path / "fashion"
    assert main(["prepare", "--source", "fashion", "--n-items", "60", "--no-features", "--cold-items", "0.1",
                 "--out", str(out)]) == 0
    moved = out.rename(tmp_path / "moved")
    path = moved / COLD_ITEMS
    items = validate_items(read_csv_exact(path), str(path))
    assert len(items) == 6 and items["text"].notna().all()
    assert all(Path(p).is_file() and Path(p).is_relative_to((moved / "raw_images").resolve()) for p in items["image"])


# ---------------------------------------------------------------------------- evaluate --slice cold

class ScoreTable(torch.nn.Module):
    """A stand-in model with fixed scores per index row (the same for every user and scorer)."""

    def __init__(self, row_scores: np.ndarray):
        super().__init__()
        from types import SimpleNamespace
        self.row_scores = torch.tensor(row_scores, dtype=torch.float32)
        self.config = SimpleNamespace(n_index=len(row_scores), fusion_weights=None, fusion_scores="raw")
        self.log_popularity = torch.zeros(1)

    def score(self, history):
        s = self.row_scores.expand(len(history), -1).clone()
        return {"fused": s, "id": s, "text": -s}


def fake_added_run(data_dir: Path, out: Path, added: list[str]) -> Path:
    """What `odmt add-items` leaves in a RUN, as far as the cold slice reads it (contract.py)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"data": {"dir": str(data_dir)}}))
    n = len(catalog_item_ids(data_dir))
    pd.DataFrame({"item_id": added, "item_idx": range(n, n + len(added))}).to_parquet(out / ADDED_ITEMS)
    return out


def test_cold_slice_ranks_the_added_target_with_every_earlier_item_excluded(cold_dir, tmp_path):
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import evaluate_cold_slice

    run = fake_added_run(cold_dir, tmp_path / "run.v2", ["h", "e"])  # h -> n, e -> n + 1
    ids = catalog_item_ids(cold_dir)
    n = len(ids)
    scores = np.linspace(0, 1, n + 2)
    scores[list(ids).index("a")] = 10.0  # in both users' histories: excluded, or it would outrank h
    scores[n + 1], scores[n] = 9.0, 8.0  # e, then h: u3 had e earlier (excluded), u2 did not
    m = evaluate_cold_slice(ScoreTable(scores), PreparedData(cold_dir), run)
    assert m["n_users"] == 2 and m["slice"] == "cold" and m["cold_items"] == 2
    # ranks 0 (u3) and 1 (u2)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert m["id/NDCG@10"] == m["NDCG@10"] and m["text/NDCG@10"] < m["NDCG@10"] / 2  # per scorer


def test_cold_slice_refuses_a_run_without_the_held_out_items(cold_dir, tmp_path, capsys):
    from tests.tiny_data import untrained_run

    run = untrained_run(cold_dir, tmp_path / "plain")
    assert main(["evaluate", "--run", str(run), "--slice", "cold", "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("odmt evaluate: error:") and "does not score 2 of the 2 held-out items" in last
    assert "odmt add-items" in last
    assert not (run / "metrics-test-cold.json").exists()


def test_cold_slice_needs_a_dir_prepared_with_cold_items(source, tmp_path, capsys):
    from tests.tiny_data import untrained_run

    plain = tmp_path / "plain"
    assert main(["prepare", *source, "--out", str(plain)]) == 0
    run = untrained_run(plain, tmp_path / "run")
    assert main(["evaluate", "--run", str(run), "--slice", "cold", "--no-progress"]) == 2
    assert "prepare it with --cold-items" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["evaluate", "--run", str(run), "--slice", "cold", "--split", "valid"]) == 2
    assert "slice of the test split" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cold_slice_end_to_end_after_add_items(source, tmp_path, capsys):
    """prepare --cold-items -> a RUN -> odmt add-items with DIR/cold/items.csv -> evaluate --slice cold:
    the held-out items get indices after the DIR's catalog and every branch scores them."""
    from odmt_t4r.model import build_model

    with_text = [a for a in source if a != "--no-features"]
    data = tmp_path / "dir"
    assert main(["prepare", *with_text, "--out", str(data), "--cold-items", "0.2"]) == 0
    torch.manual_seed(0)
    model = build_model("odmt", data, d_model=16, n_heads=2, seq_layers=1, imt_layers=1)
    run = model.save_pretrained(tmp_path / "run", extra={"data": {"dir": str(data)}})
    assert main(["add-items", "--run", str(run), "--items", str(data / COLD_ITEMS), "--out", str(tmp_path / "run.v2")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run.v2"), "--slice", "cold", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "run.v2" / "metrics-test-cold.json").read_text())
    assert printed == written and written["slice"] == "cold" and written["n_users"] == 2
    assert {"NDCG@10", "id/NDCG@10", "text/NDCG@10"} <= set(written)
    added = pd.read_parquet(tmp_path / "run.v2" / ADDED_ITEMS)
    assert sorted(added["item_id"]) == ["e", "h"] and added["item_idx"].min() == RESERVED_ROWS + 8
