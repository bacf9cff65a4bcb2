"""Issue 9: odd raw IDs go through prepare, train, export, a real Triton server and `odmt recommend`,
and come back byte for byte (CSV ID columns are strings: no NA inference, no number conversion)."""

import contextlib
import io
import json

import pandas as pd
import pytest

from tests.triton_fixtures import triton_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_available(), reason="no tritonserver")]

ODD = ["007", "7", "7.0", "1e3", "NA", "null", "None", "", "ünï", "日本語", "a,b", 'say "hi"', "x" * 200,
       " 7", "-0", "0x10", "TRUE", "nan"]
ODD = [i for i in ODD if i]  # an empty ID is refused by prepare (tested in test_inputs.py)


def odmt(*args) -> tuple[int, str, str]:
    from odmt_t4r.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_odd_ids_round_trip_through_every_stage(tmp_path):
    from triton_models.server import TritonServer

    n = len(ODD)
    rows = [(f"u{u}", ODD[(u + s) % n], 1_700_000_000 + s) for u in range(3 * n) for s in range(6)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "inter.csv", index=False)
    pd.DataFrame({"item_id": ODD, "text": [f"item {k}" for k in range(n)]}).to_csv(tmp_path / "items.csv", index=False)
    assert odmt("prepare", "--source", "csv", "--interactions", tmp_path / "inter.csv", "--items",
                tmp_path / "items.csv", "--no-features", "--max-length", 4, "--out", tmp_path / "data")[0] == 0
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"d_model": 16, "n_heads": 2, "seq_layers": 1, "batch_size": 16}))
    code, _, err = odmt("train", "--data", tmp_path / "data", "--model", "sasrec", "--out", tmp_path / "run",
                        "--config", config, "--epochs", 1, "--no-progress")
    assert code == 0, err
    code, _, err = odmt("export", "--run", tmp_path / "run", "--out", tmp_path / "repo", "--k", 5)
    assert code == 0, err
    sessions = [["007", "NA"], ["日本語", "a,b", 'say "hi"'], ["x" * 200], ["7.0", "1e3", " 7"], ["7"]]
    with TritonServer(tmp_path / "repo", log_file=tmp_path / "triton.log") as server:
        answers = []
        for session in sessions:
            code, out, err = odmt("recommend", "--url", server.http_url, "--items-json",
                                  json.dumps(session, ensure_ascii=False), "--k", 5, "--json")
            assert code == 0, err
            answers.append([item for item, _ in json.loads(out)])
        code, out, err = odmt("recommend", "--url", server.http_url, "--items", "007,NA", "--k", 5, "--json")
        assert code == 0 and [i for i, _ in json.loads(out)] == answers[0]  # the comma form, exactly as written
    for session, got in zip(sessions, answers):
        assert got and set(got) <= set(ODD)  # every answer is a raw ID exactly as written
        assert not set(got) & set(session)  # the session's own items are excluded, matched exactly
    items = pd.read_parquet(tmp_path / "data" / "items.parquet")
    assert sorted(items["item_id"]) == sorted(ODD)
