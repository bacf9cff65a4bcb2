"""The NVTabular session workflows against the plain pandas reference (workflows/reference.py)."""

import numpy as np
import nvtabular as nvt
import pandas as pd
import pytest

from workflows import reference as ref
from workflows import sessions as W


def _interactions(seed=0, n_users=40, n_rows=600, n_items=30):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(n_users)], n_rows),
        "item_id": rng.choice([f"i{i}" for i in range(n_items)], n_rows),
        "timestamp": rng.integers(0, 20, n_rows),  # few distinct times: many ties
    })
    df[W.ROW_COL] = np.arange(len(df))
    return df


def _run(df, cfg, tmp_path, vocab, partitions=1):
    cats = str(tmp_path / "cats")
    ds = nvt.Dataset(df, npartitions=partitions)
    if partitions > 1:
        ds = ds.shuffle_by_keys([W.USER_COL])
    workflows, splits = W.run_session_workflows(ds, vocab, cfg, cats)
    sess = workflows["sessions"].transform(ds).to_ddf().compute()
    out = {"sessions": sess.sort_values(W.USER_COL).reset_index(drop=True)}
    users = pd.read_parquet(tmp_path / "cats" / "categories" / "unique.user_id.parquet")[W.USER_COL]
    for split in W.SPLITS:
        o = splits[split].to_ddf().compute()
        o[W.USER_COL] = o[W.USER_IDX].map(users)  # decode the user index back to the raw id
        out[split] = o
    return out


def _lists(s):
    return [list(map(int, x)) for x in s]


@pytest.mark.parametrize("partitions", [1, 3])
def test_sessions_and_splits_match_pandas_reference(tmp_path, partitions):
    df = _interactions()
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)]})
    vocab = W.item_vocabulary(df, items)
    cfg = W.SessionConfig(max_length=4)
    got = _run(df, cfg, tmp_path, vocab, partitions)
    want_sess = ref.sessions(df, vocab)
    assert _lists(got["sessions"][W.ITEM_LIST]) == _lists(want_sess[W.ITEM_LIST])
    for split in W.SPLITS:
        want = ref.split(want_sess, split, cfg)
        g = got[split].sort_values(W.USER_COL, kind="stable")
        if split == "train":  # a user's windows: compare as ordered multisets per user
            g = g.groupby(W.USER_COL)[W.ITEM_LIST].agg(lambda s: sorted(map(tuple, s)))
            w = want.groupby(W.USER_COL)[W.ITEM_LIST].agg(lambda s: sorted(map(tuple, s)))
            assert g.to_dict() == w.to_dict()
            continue
        w = want.sort_values(W.USER_COL, kind="stable")
        assert g[W.USER_COL].tolist() == w[W.USER_COL].tolist()
        assert _lists(g[W.ITEM_LIST]) == _lists(w[W.ITEM_LIST])
        assert _lists(g[W.SEEN_LIST]) == _lists(w[W.SEEN_LIST])


def test_equal_timestamps_keep_input_row_order(tmp_path):
    df = pd.DataFrame({"user_id": ["u"] * 5, "item_id": ["c", "a", "b", "e", "d"], "timestamp": [5, 1, 1, 1, 0]})
    df[W.ROW_COL] = np.arange(5)
    vocab = pd.Series(list("abcde"), name="item_id")  # a=3 .. e=7
    got = _run(df, W.SessionConfig(max_length=10), tmp_path, vocab)
    # time order: d(0), then a, b, e (all at 1, kept in file order), then c(5)
    assert _lists(got["sessions"][W.ITEM_LIST]) == [[6, 3, 4, 7, 5]]
    assert _lists(got["test"][W.ITEM_LIST]) == [[6, 3, 4, 7, 5]]
    assert _lists(got["valid"][W.ITEM_LIST]) == [[6, 3, 4, 7]]
    assert _lists(got["valid"][W.SEEN_LIST]) == [[6, 3, 4]]
    assert _lists(got["train"][W.ITEM_LIST]) == [[6, 3, 4]]


def test_leave_one_out_boundaries_and_truncation(tmp_path):
    n = 13
    df = pd.DataFrame({"user_id": ["u"] * n + ["short"] * 2, "item_id": [f"i{k}" for k in range(n)] + ["i0", "i1"],
                       "timestamp": list(range(n)) + [0, 1]})
    df[W.ROW_COL] = np.arange(len(df))
    vocab = pd.Series([f"i{k}" for k in range(n)], name="item_id")  # i_k -> 3 + k
    got = _run(df, W.SessionConfig(max_length=4), tmp_path, vocab)
    codes = [3 + k for k in range(n)]
    assert got["test"][W.USER_COL].tolist() == ["u"]  # fewer than 3 interactions: left out
    assert _lists(got["test"][W.ITEM_LIST]) == [codes[-5:]]  # truncated to L + 1, ends with the target
    assert _lists(got["test"][W.SEEN_LIST]) == [codes[:-1]]  # full history, not truncated
    assert _lists(got["valid"][W.ITEM_LIST]) == [codes[-6:-1]]
    train = sorted(_lists(got["train"][W.ITEM_LIST]))
    # items[:-2] = 11 items; windows of 5 stepping back by 4: every item but the first is a target once
    assert train == sorted([codes[6:11], codes[2:7], codes[0:3]])
    targets = sorted(t for w in train for t in w[1:])
    assert targets == codes[1:11]


def test_oov_and_null_items_in_inference_workflow(tmp_path):
    vocab = pd.Series(["a", "b", "c"], name="item_id")
    wf = W.inference_workflow(vocab, W.SessionConfig(max_length=3), str(tmp_path / "cats"))
    wf.fit(nvt.Dataset(pd.DataFrame({W.ITEM_LIST: [["a"]]})))
    out = wf.transform(pd.DataFrame({W.ITEM_LIST: [["a", "zzz", "b", "c", "a"], ["c"], []]}))
    assert _lists(out[W.ITEM_LIST]) == [[4, 5, 3], [5], []]  # last 3 kept; no request dropped
    out = wf.transform(pd.DataFrame({W.ITEM_LIST: [["zzz", "a"]]}))
    assert _lists(out[W.ITEM_LIST]) == [[2, 3]]  # unknown item -> OOV index 2
    assert ref.encode_items(pd.Series(["a", None, "q"]), vocab).tolist() == [3, 1, 2]


def test_vocabulary_orders_by_popularity_and_keeps_cold_items():
    inter = pd.DataFrame({"item_id": ["b", "c", "c", "b", "c"]})
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"]})
    assert W.item_vocabulary(inter, items).tolist() == ["c", "b", "a", "d"]


def test_split_schema_carries_tags_and_domain(tmp_path):
    df = _interactions()
    vocab = W.item_vocabulary(df, pd.DataFrame({"item_id": [f"i{i}" for i in range(30)]}))
    workflows, _ = W.run_session_workflows(nvt.Dataset(df), vocab, W.SessionConfig(max_length=4), str(tmp_path / "cats"))
    wf = workflows["train"]
    from merlin.schema import Tags
    col = wf.output_schema.select_by_tag(Tags.ITEM_ID).first
    assert col.name == W.ITEM_LIST
    assert col.int_domain.max == 30 + 2
    assert col.properties["value_count"]["max"] == 5


def test_vectorised_groupby_equals_upstream_groupby():
    from nvtabular import ops as nvt_ops
    from workflows.ops import Groupby
    df = _interactions(seed=3)
    kw = dict(groupby_cols=["user_id"], sort_cols=["timestamp", W.ROW_COL], aggs={"item_id": ["list", "count"]}, name_sep="-")
    outs = []
    for op in (Groupby(**kw), nvt_ops.Groupby(**kw)):
        wf = nvt.Workflow(["user_id", "item_id", "timestamp", W.ROW_COL] >> op)
        outs.append(wf.fit_transform(nvt.Dataset(df)).to_ddf().compute().reset_index(drop=True))
    fast, upstream = outs
    assert fast["user_id"].tolist() == upstream["user_id"].tolist()
    assert [list(x) for x in fast["item_id-list"]] == [list(x) for x in upstream["item_id-list"]]
    assert fast["item_id-count"].tolist() == upstream["item_id-count"].tolist()
