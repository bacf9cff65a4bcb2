"""What `odmt prepare` makes of odd input: IDs come back exactly as written, timestamps are read one
way or refused, and every bad input ends in one `odmt prepare: error:` line with exit code 2."""

import json
from pathlib import Path

import pandas as pd
import pytest

from odmt_t4r.cli import main
from odmt_t4r.data import DataValidationError, load_source
from odmt_t4r.prepare import read_split

# IDs that type inference, NA detection or CSV quoting would change, merge or drop
ODD_IDS = ["007", "7", "7.0", " 7", "-0", "1e3", "1000", "NA", "null", "nan", "None", "True", "ünï", "a,b",
           'say "hi"', "tab\there", "x" * 500]
ODD_USERS = ["007", "7", "NA", "null", "1e3", "ünï", "a,b"]


def _prepare(tmp_path, *args: str) -> int:
    return main(["prepare", "--out", str(tmp_path / "out"), "--no-features", *args])


def _csv_source(tmp_path, inter: pd.DataFrame, items: pd.DataFrame) -> list[str]:
    inter.to_csv(tmp_path / "inter.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    return ["--source", "csv", "--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv")]


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("odmt prepare: error:")] == [lines[-1]]
    return lines[-1]


def test_odd_csv_ids_come_back_byte_for_byte(tmp_path):
    # every user walks the whole catalog in its own rotation, so a merged or changed ID shows up in the splits
    rows = [(u, ODD_IDS[(k + s) % len(ODD_IDS)], 1_700_000_000 + s) for k, u in enumerate(ODD_USERS) for s in range(len(ODD_IDS))]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": ODD_IDS, "text": [f"item {k}" for k in range(len(ODD_IDS))]})
    assert _prepare(tmp_path, *_csv_source(tmp_path, inter, items)) == 0
    out = tmp_path / "out"

    table = pd.read_parquet(out / "items.parquet")
    assert sorted(s.encode() for s in table["item_id"]) == sorted(s.encode() for s in ODD_IDS)
    vocab = pd.read_parquet(next(out.glob("categories/**/unique.item_id.parquet")))["item_id"].tolist()
    assert vocab == table.sort_values("item_idx")["item_id"].tolist()
    users = pd.read_parquet(next(out.glob("categories/**/unique.user_id.parquet")))["user_id"].tolist()
    assert sorted(users) == sorted(ODD_USERS)

    # the test split, mapped back through items.parquet and the user vocabulary, is each user's raw history
    item_of = dict(zip(table["item_idx"], table["item_id"]))
    test = read_split(out / "test")
    max_length = json.loads((out / "manifest.json").read_text())["max_length"]
    for user_idx, seq in zip(test["user_idx"], test["item_id-list"]):
        user = users[user_idx - 3]
        written = inter.loc[inter["user_id"] == user, "item_id"].tolist()
        assert [item_of[i] for i in seq] == written[-(max_length + 1):]


def test_parquet_ids_become_strings_one_documented_way(tmp_path):
    inter = pd.DataFrame({"user_id": [7, 7, 7], "item_id": pd.Series([1.0, 2.0, 2.5]),
                          "timestamp": pd.to_datetime(["2024-01-01", "2024-01-01 00:00:00.250", "2024-01-02"])})
    items = pd.DataFrame({"item_id": pd.Series(["1", "2", "2.5", "007"], dtype=object)})
    inter.to_parquet(tmp_path / "i.parquet")
    items.to_parquet(tmp_path / "t.parquet")
    raw = load_source("parquet", interactions=str(tmp_path / "i.parquet"), items=str(tmp_path / "t.parquet"))
    assert raw.interactions["user_id"].tolist() == ["7"] * 3  # integers in decimal
    assert raw.interactions["item_id"].tolist() == ["1", "2", "2.5"]  # whole floats as integers, others as written
    assert raw.items["item_id"].tolist() == ["1", "2", "2.5", "007"]  # strings untouched
    day = 1_704_067_200_000  # a datetime column (naive = UTC) becomes epoch milliseconds
    assert raw.interactions["timestamp"].tolist() == [day, day + 250, day + 86_400_000]

    items.loc[3, "item_id"] = ""  # an empty ID could never be asked for
    items.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataValidationError, match="empty or null ID"):
        load_source("parquet", interactions=str(tmp_path / "i.parquet"), items=str(tmp_path / "t.parquet"))


def test_empty_csv_id_cell_is_still_refused(tmp_path, capsys):
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\nu1,a,1\n,a,2\nu1,NA,3\n")
    (tmp_path / "items.csv").write_text("item_id\na\nNA\n")
    args = ["--source", "csv", "--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv")]
    assert _prepare(tmp_path, *args) == 2
    line = _last_error_line(capsys)
    assert "inter.csv, column 'user_id': 1 rows have an empty or null ID" in line


# ---- timestamps ----------------------------------------------------------------------------------

def _timestamps(tmp_path, values, timestamp_format=None) -> list[int]:
    inter = pd.DataFrame({"user_id": ["u"] * len(values), "item_id": ["a"] * len(values), "timestamp": values})
    inter.to_csv(tmp_path / "inter.csv", index=False)
    pd.DataFrame({"item_id": ["a"]}).to_csv(tmp_path / "items.csv", index=False)
    raw = load_source("csv", interactions=str(tmp_path / "inter.csv"), items=str(tmp_path / "items.csv"),
                      timestamp_format=timestamp_format)
    return raw.interactions["timestamp"].tolist()


def test_epoch_seconds_and_milliseconds_give_the_same_instants(tmp_path):
    seconds = _timestamps(tmp_path, [1_700_000_000, 1_700_000_001])
    millis = _timestamps(tmp_path, [1_700_000_000_000, 1_700_000_000_500])  # sub-second order is kept
    assert seconds == [1_700_000_000_000, 1_700_000_001_000]
    assert millis == [1_700_000_000_000, 1_700_000_000_500]
    assert _timestamps(tmp_path, ["2023-11-14T22:13:20Z", "2023-11-14 22:13:21"]) == seconds


def test_day_month_strings_need_the_format_flag(tmp_path):
    with pytest.raises(DataValidationError) as err:
        _timestamps(tmp_path, ["03/04/2024", "05/04/2024"])
    msg = str(err.value)
    assert "column 'timestamp'" in msg and "day/month" in msg and "--timestamp-format" in msg and "03/04/2024" in msg
    assert _timestamps(tmp_path, ["03/04/2024", "05/04/2024"], "%d/%m/%Y") == [
        pd.Timestamp("2024-04-03", tz="UTC").value // 10**6, pd.Timestamp("2024-04-05", tz="UTC").value // 10**6]


@pytest.mark.parametrize("values, offending, valid", [
    (["2024-01-05", "06/01/2024", "2024-01-07"], "06/01/2024", "2024-01-05"),  # day-first row among ISO dates
    (["2024-01-05", "1704585600", "2024-01-07"], "1704585600", "2024-01-05"),  # an epoch number among dates
    (["1700000000", "1700000100", "soon"], "soon", "1700000000"),  # unparsable: the bad row, not the valid ones
    ([10, 1_700_000_000_000, 20], "1700000000000", "10"),  # milliseconds among seconds
])
def test_mixed_or_bad_timestamps_show_only_the_offending_rows(tmp_path, values, offending, valid):
    with pytest.raises(DataValidationError) as err:
        _timestamps(tmp_path, values)
    headline, _, sample = str(err.value).partition("\n")
    assert "column 'timestamp'" in headline and "--timestamp-format" in headline
    assert offending in sample and valid not in sample


def test_a_format_that_does_not_match_names_the_flag_and_the_rows(tmp_path):
    with pytest.raises(DataValidationError) as err:
        _timestamps(tmp_path, ["03/04/2024", "2024-04-05"], "%d/%m/%Y")
    headline, _, sample = str(err.value).partition("\n")
    assert "do not match --timestamp-format '%d/%m/%Y'" in headline
    assert "2024-04-05" in sample and "03/04/2024" not in sample


# ---- one error style -----------------------------------------------------------------------------

def _short_users(tmp_path) -> list[str]:
    inter = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "timestamp": [1, 2, 3]})
    return _csv_source(tmp_path, inter, pd.DataFrame({"item_id": ["a", "b"]}))


def test_every_user_below_the_minimum_length(tmp_path, capsys):
    assert _prepare(tmp_path, *_short_users(tmp_path)) == 2
    line = _last_error_line(capsys)
    assert "column 'user_id': every user has fewer than 3 interactions (the longest has 2)" in line
    assert not (tmp_path / "out").exists()


def test_header_only_and_empty_files(tmp_path, capsys):
    (tmp_path / "items.csv").write_text("item_id\na\n")
    args = ["--source", "csv", "--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv")]
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n")
    assert _prepare(tmp_path, *args) == 2
    assert "inter.csv: has no interaction rows" in _last_error_line(capsys)
    (tmp_path / "inter.csv").write_text("")
    assert _prepare(tmp_path, *args) == 2
    assert "inter.csv: is empty" in _last_error_line(capsys)


@pytest.mark.parametrize("flag, value", [("--max-length", "0"), ("--max-length", "-3"), ("--partitions", "0")])
def test_nonpositive_settings_are_refused_before_any_work(tmp_path, capsys, flag, value):
    assert _prepare(tmp_path, "--source", "fashion", flag, value) == 2
    assert f"{flag} must be at least 1, got {value}" in _last_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_flags_for_user_files_are_refused_with_other_sources(tmp_path, capsys):
    assert _prepare(tmp_path, "--source", "fashion", "--timestamp-format", "%Y") == 2
    assert "apply to the csv and parquet sources, not 'fashion'" in _last_error_line(capsys)


def test_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert _prepare(tmp_path, *_short_users(tmp_path)) == 2
    assert f"--out {tmp_path / 'out'}" in _last_error_line(capsys)
    assert (tmp_path / "out").read_text() == "mine"


def test_a_folder_given_as_the_interactions_file(tmp_path, capsys):
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (tmp_path / "items.csv").write_text("item_id\na\n")
    assert _prepare(tmp_path, "--source", "csv", "--interactions", str(folder), "--items", str(tmp_path / "items.csv")) == 2
    assert f"{folder} is a folder; --interactions and --items take a csv file" in _last_error_line(capsys)


def test_the_sample_comes_before_the_one_error_line(tmp_path, capsys):
    inter = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a"] * 3, "timestamp": ["2024-01-01", "soon", "2024-01-03"]})
    assert _prepare(tmp_path, *_csv_source(tmp_path, inter, pd.DataFrame({"item_id": ["a"]}))) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("odmt prepare: error: ") and "1 unparsable timestamps" in lines[-1]
    assert "sample of offending rows" in err.split(lines[-1])[0] and "soon" in err.split(lines[-1])[0]


def test_debug_adds_the_traceback(tmp_path, capsys):
    assert main(["--debug", "prepare", "--out", str(tmp_path / "out"), "--max-length", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("odmt prepare: error: --max-length")
    assert main(["prepare", "--out", str(tmp_path / "out"), "--max-length", "0", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_pointing_at_debug(tmp_path, capsys, monkeypatch):
    import odmt_t4r.prepare

    def broken(*_, **__):
        raise KeyError("items")
    monkeypatch.setattr(odmt_t4r.prepare, "prepare", broken)
    assert _prepare(tmp_path, "--source", "fashion") == 2
    line = _last_error_line(capsys)
    assert line == "odmt prepare: error: unexpected KeyError: 'items' (rerun with --debug for the traceback)"
