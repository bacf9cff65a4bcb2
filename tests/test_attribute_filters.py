"""Catalog attributes and the per-request `filter` (issue 23, parts 2 and 4), on a REAL Triton server.

A csv catalog with a category, a brand, a price, an `available` flag and a `since` date is prepared, an
untrained model serves it on the exact scan and on HNSW, and the served answers under a filter must equal the
in-process ones (`reference_recommend(..., rules={"filter": ...})`: the filter evaluated by plain pandas, not by
the served index) and hold only items whose attributes match. Filters combine with exclude / include lists and
the session's own items; a malformed filter is refused for its own request only. prepare, prepare --append-to,
export and add-items keep the attributes; `odmt recommend --filter / --new-arrivals` reach the server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from odmt_t4r.contract import run_item_ids
from odmt_t4r.data.attributes import NEW_ARRIVAL, run_attributes
from odmt_t4r.model import OdmtRecommender
from odmt_t4r.model.item_filter import AttributeIndex
from tests.test_business_rules import assert_served_equals, hnsw_run, hnsw_server  # noqa: F401 - on this RUN
from tests.test_serving import K, fast_server  # noqa: F401
from tests.triton_fixtures import toy_repo, triton_server  # noqa: F401
from triton_models.checks import example_sessions, reference_filter_mask, reference_recommend
from triton_models.client import RecommenderClient
from triton_models.graph import load_inference_workflow

pytestmark = pytest.mark.slow
N_ITEMS, N_USERS = 300, 150
CATEGORIES = [f"c{i}" for i in range(10)]
FILTERS = {
    "category": {"category": ["c1", "c4"]},
    "price range": {"price": {"min": 20, "max": 80}},
    "available and cheap": {"available": True, "price": {"max": 60}},
    "since": {"since": {"min": "2024-03-01", "max": "2024-04-30"}},
    "not a brand": {"brand": {"not": ["acme", "zeta"]}},
    "a value no item has": {"category": ["no-such-category"]},
}


def write_catalog(folder: Path, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"i{j:03d}" for j in range(N_ITEMS)]
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 180, N_ITEMS), unit="D")
    items = pd.DataFrame({
        "item_id": ids,
        "category": rng.choice(CATEGORIES, N_ITEMS),
        "brand": np.where(rng.random(N_ITEMS) < 0.05, "", rng.choice(["acme", "zeta", "nova", "orbit", "vela"], N_ITEMS)),
        "price": np.where(rng.random(N_ITEMS) < 0.1, np.nan, np.round(rng.uniform(5, 150, N_ITEMS), 2)),
        "available": np.where(rng.random(N_ITEMS) < 0.8, "true", "false"),
        "since": np.where(rng.random(N_ITEMS) < 0.1, "", days.strftime("%Y-%m-%d")),
    })
    items.to_csv(folder / "items.csv", index=False)
    users = np.repeat(np.arange(N_USERS), 10)
    pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": rng.choice(ids, len(users)),
                  "timestamp": 1_700_000_000 + np.arange(len(users))}).to_csv(folder / "inter.csv", index=False)
    return ["--source", "csv", "--interactions", str(folder / "inter.csv"), "--items", str(folder / "items.csv")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attr-src")
    return folder, write_catalog(folder)


@pytest.fixture(scope="module")
def data_dir(source, tmp_path_factory):
    from odmt_t4r.cli import main

    out = tmp_path_factory.mktemp("attr") / "data"
    assert main(["prepare", *source[1], "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    from tests.tiny_data import untrained_run

    return untrained_run(data_dir, tmp_path_factory.mktemp("attr") / "run")


@pytest.fixture(scope="module")
def servers(fast_server, hnsw_server):  # noqa: F811 - test_serving's and test_business_rules' on this module's RUN
    return {"exact": fast_server, "hnsw": hnsw_server}


@pytest.fixture(scope="module")
def sessions(data_dir):
    return example_sessions(data_dir, 30)


@pytest.fixture(scope="module")
def catalog_csv(source):
    return pd.read_csv(source[0] / "items.csv", dtype=str, keep_default_na=False)  # the cells as written


def in_process(run, data_dir, sessions, rules, k=K):
    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run, data_dir=data_dir)
    return reference_recommend(model, load_inference_workflow(data_dir), run_item_ids(run, data_dir), sessions, k,
                               rules=rules, attributes=run_attributes(run, data_dir))


def matches(row: pd.Series, spec: dict) -> bool:
    """Whether a catalog CSV row satisfies a filter, read straight off the CSV's text (the test's own oracle)."""
    for name, cond in spec.items():
        cell = row[name]
        if cell == "":
            return False
        if name == "price":
            value = float(cell)
            if isinstance(cond, dict) and not (cond.get("min", -1e9) <= value <= cond.get("max", 1e9)):
                return False
        elif name == "available":
            if (cell == "true") != cond:
                return False
        elif name == "since":
            if not (cond.get("min", "0000") <= cell <= cond.get("max", "9999")):
                return False
        elif isinstance(cond, dict):
            if cell in cond["not"]:
                return False
        elif cell not in cond:
            return False
    return True


# -- the catalog's attributes through prepare, export, append -----------------------------------------------

def test_prepare_keeps_the_attributes_typed(data_dir, catalog_csv):
    items = pd.read_parquet(data_dir / "items.parquet").set_index("item_id").loc[catalog_csv["item_id"]]
    assert str(items["category"].dtype) == "object" and str(items["price"].dtype) == "float64"
    assert str(items["available"].dtype) == "boolean" and str(items["since"].dtype) == "datetime64[ns, UTC]"
    assert items["category"].tolist() == catalog_csv["category"].tolist()
    assert items["brand"].fillna("").tolist() == catalog_csv["brand"].tolist()  # an empty cell is null
    np.testing.assert_array_equal(items["price"].to_numpy(), pd.to_numeric(catalog_csv["price"]).to_numpy())
    assert items["available"].tolist() == (catalog_csv["available"] == "true").tolist()
    since = items["since"].dt.strftime("%Y-%m-%d").fillna("")
    assert since.tolist() == catalog_csv["since"].tolist()


def test_export_ships_the_attributes_with_the_model(servers, data_dir):
    shipped = servers["exact"].repo / "executor_model" / "1" / "ensemble" / "odmt_model" / "served_attributes.parquet"
    frame = pd.read_parquet(shipped)
    items = pd.read_parquet(data_dir / "items.parquet").set_index("item_idx")
    assert len(frame) == items.index.max() + 1 and frame.iloc[:3].isna().all().all()  # reserved rows: null
    for column in ("category", "brand", "price", "available", "since"):
        pd.testing.assert_series_equal(frame[column].iloc[3:], items[column].reindex(frame.index[3:]),
                                       check_names=False, check_index=False)
    assert not frame[NEW_ARRIVAL].iloc[3:].any()


def test_append_keeps_the_attributes_and_refuses_another_kind(data_dir, source, tmp_path, capsys):
    from odmt_t4r.cli import main

    new = tmp_path / "new_items.csv"
    pd.DataFrame({"item_id": ["n1", "n2"], "category": ["c1", "fresh"], "price": [12.5, ""], "available": ["false", "true"],
                  "since": ["2024-07-01", "2024-07-02"]}).to_csv(new, index=False)
    inter = tmp_path / "inter.csv"
    pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["n1", "n2", "n1"],
                  "timestamp": [1_800_000_000, 1_800_000_001, 1_800_000_002]}).to_csv(inter, index=False)
    out = tmp_path / "dir2"
    args = ["prepare", "--source", "csv", "--interactions", str(inter), "--append-to", str(data_dir)]
    assert main([*args, "--items", str(new), "--out", str(out)]) == 0
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")
    old = pd.read_parquet(data_dir / "items.parquet").set_index("item_id")
    pd.testing.assert_frame_equal(items.loc[old.index, ["category", "price", "available", "since", "brand"]],
                                  old[["category", "price", "available", "since", "brand"]])
    assert items.loc["n1", "category"] == "c1" and items.loc["n2", "category"] == "fresh"
    assert items.loc["n1", "price"] == 12.5 and np.isnan(items.loc["n2", "price"])
    assert items.loc["n1", "available"] is np.False_ or items.loc["n1", "available"] == False  # noqa: E712
    assert str(items["since"].dtype) == "datetime64[ns, UTC]" and pd.isna(items.loc["n1", "brand"])
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"item_id": ["n3"], "price": ["cheap"]}).to_csv(bad, index=False)
    assert main([*args, "--items", str(bad), "--out", str(tmp_path / "dir3")]) == 2
    err = capsys.readouterr().err
    assert "column 'price'" in err and "is a number attribute of the catalog" in err
    assert not (tmp_path / "dir3").exists()


# -- served filters equal the in-process ones -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["exact", "hnsw"])
def test_served_filters_equal_the_in_process_answers(path, servers, run_dir, hnsw_run, data_dir, sessions,  # noqa: F811
                                                     catalog_csv):
    server, run = servers[path], (run_dir if path == "exact" else hnsw_run)
    rows = catalog_csv.set_index("item_id")
    few = sessions[:12]
    for name, spec in FILTERS.items():
        with RecommenderClient(server.http_url) as client:
            answers = client.recommend(few, K, filter=spec)
        assert_served_equals(answers, in_process(run, data_dir, few, {"filter": json.dumps(spec)}))
        allowed = {i for i, row in rows.iterrows() if matches(row, spec)}
        for session, answer in zip(few, answers):
            ids = [i for i, _ in answer]
            assert set(ids) <= allowed and not set(ids) & set(session), name
            assert len(ids) == min(K, len(allowed - set(session))), name  # k allowed items whenever k exist
    if path == "hnsw":  # as exact as the exact filtered answer
        exact = in_process(run_dir, data_dir, few, {"filter": json.dumps(FILTERS["category"])})[0]
        with RecommenderClient(server.http_url) as client:
            got = client.recommend(few, K, filter=FILTERS["category"])
        assert [[i for i, _ in a] for a in got] == [[i for i in w if i] for w in exact]


@pytest.mark.parametrize("path", ["exact", "hnsw"])
def test_filters_combine_with_lists_and_the_sessions_own_items(path, servers, run_dir, hnsw_run,  # noqa: F811
                                                                data_dir, sessions, catalog_csv):
    server, run = servers[path], (run_dir if path == "exact" else hnsw_run)
    rows = catalog_csv.set_index("item_id")
    spec = {"category": ["c1", "c2", "c3", "c4", "c5"], "available": True}
    few = sessions[:10]
    allowed = {i for i, row in rows.iterrows() if matches(row, spec)}
    unrestricted = in_process(run, data_dir, few, {"filter": json.dumps(spec)})[0]
    exclude = [w for w in unrestricted[:, :2].reshape(-1).tolist() if w]  # the filter's first answers
    include = sorted(allowed)[::2] + sorted(set(rows.index) - allowed)[:30] + [i for s in few for i in s]
    with RecommenderClient(server.grpc_url, "grpc") as client:
        answers = client.recommend(few, K, exclude=exclude, include=include, filter=spec)
    rule = {"exclude_ids": exclude, "include_ids": include, "filter": json.dumps(spec)}
    assert_served_equals(answers, in_process(run, data_dir, few, rule))
    for session, answer in zip(few, answers):
        ids = {i for i, _ in answer}
        assert ids and ids <= (allowed & set(include)) - set(exclude) - set(session)
    items = pd.read_parquet(data_dir / "items.parquet").sort_values(["train_count", "item_idx"], ascending=[False, True])
    with RecommenderClient(server.http_url) as client:  # an empty session: the most popular matching items
        (empty,) = client.recommend([[]], K, filter=spec)
    assert [i for i, _ in empty] == [i for i in items["item_id"] if i in allowed][:K]


def test_a_malformed_filter_is_refused_for_its_request_only(servers, run_dir, data_dir, sessions):
    from tritonclient.utils import InferenceServerException

    bad = {"not json": "{category: c1", "unknown attribute": {"colour": ["red"]},
           "wrong type": {"price": "cheap"}, "not an object": ["c1"], "bad date": {"since": {"min": "soon"}}}
    messages = {"not json": "filter: not valid JSON", "unknown attribute": "filter: unknown attribute 'colour'",
                "wrong type": "filter: 'price' is a number attribute", "not an object": "filter: must be a JSON object",
                "bad date": "is not an ISO 8601 date"}
    good = FILTERS["category"]
    want = in_process(run_dir, data_dir, sessions[:8], {"filter": json.dumps(good)})

    def one(job):  # its own client: concurrent requests are merged by the server's dynamic batcher
        j, name = job
        with RecommenderClient(servers["exact"].http_url) as client:
            spec = good if name is None else bad[name]
            try:
                return j, name, client.recommend([sessions[j % 8]], K, filter=spec)[0]
            except InferenceServerException as exc:
                return j, name, exc

    jobs = [(j, None if j % 3 else list(bad)[j % len(bad)]) for j in range(60)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, jobs))
    for j, name, got in results:
        if name is None:
            assert not isinstance(got, Exception), got
            assert [i for i, _ in got] == [w for w in want[0][j % 8] if w]
        else:
            assert isinstance(got, InferenceServerException), name
            assert messages[name] in str(got) and got.status() in ("400", 400), (name, str(got))
    log = servers["exact"].log_file.read_text()
    assert "Traceback" not in log


# -- new arrivals: add-items, --new-arrivals, --filter ----------------------------------------------------

def test_add_items_records_attributes_and_the_new_arrivals_shelf_is_served(run_dir, data_dir, tmp_path, sessions,
                                                                          capsys):
    from odmt_t4r.catalog_update import add_items
    from odmt_t4r.cli import main
    from odmt_t4r.contract import ADDED_ITEMS
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    repo = tmp_path / "repo"
    export(run_dir, repo, ServingConfig(k=K), check_sessions=10)
    new = tmp_path / "new.csv"
    pd.DataFrame({"item_id": [f"NEW{i}" for i in range(6)], "category": ["c1", "c1", "c2", "c9", "", "c1"],
                  "price": [10, 20, 30, 40, 50, ""]}).to_csv(new, index=False)
    before = datetime.now(timezone.utc)
    summary = add_items(run_dir, new, out=tmp_path / "v2", repo=repo)
    assert summary["repo_version"] == 2
    added = pd.read_parquet(tmp_path / "v2" / ADDED_ITEMS).set_index("item_id")
    assert (added["since"] >= pd.Timestamp(before).floor("s")).all()  # no since column: they arrive now
    assert pd.isna(added.loc["NEW4", "category"]) and np.isnan(added.loc["NEW5", "price"])
    shipped = pd.read_parquet(repo / "executor_model" / "2" / "ensemble" / "odmt_model" / "served_attributes.parquet")
    assert shipped[NEW_ARRIVAL].sum() == 6 and shipped["category"].iloc[-6:].tolist()[:4] == ["c1", "c1", "c2", "c9"]
    session = sessions[0]
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        with RecommenderClient(server.http_url) as client:
            shelf = client.recommend([session], K, filter={NEW_ARRIVAL: True})[0]
            c1 = client.recommend([session], K, filter={NEW_ARRIVAL: True, "category": "c1"})[0]
            cheap = client.recommend([session], K, filter={"price": {"max": 25}, NEW_ARRIVAL: True})[0]
        assert sorted(i for i, _ in shelf) == [f"NEW{i}" for i in range(6)]  # only the added items
        assert sorted(i for i, _ in c1) == ["NEW0", "NEW1", "NEW5"]  # NEW4 has no category: never matched
        assert sorted(i for i, _ in cheap) == ["NEW0", "NEW1"]
        want = in_process(tmp_path / "v2", data_dir, [session], {"filter": json.dumps({NEW_ARRIVAL: True})})
        assert_served_equals([shelf], want)
        base = ["recommend", "--url", server.http_url, "--items-json", json.dumps(session), "--json"]
        assert main([*base, "--new-arrivals"]) == 0
        assert [i for i, _ in json.loads(capsys.readouterr().out)] == [i for i, _ in shelf]
        today = before.strftime("%Y-%m-%d")
        assert main([*base, "--new-arrivals", "--since", today, "--filter", '{"category": ["c1", "c2"]}']) == 0
        assert sorted(i for i, _ in json.loads(capsys.readouterr().out)) == ["NEW0", "NEW1", "NEW2", "NEW5"]
        assert main([*base, "--filter", '{"category": "c1"}', "--exclude", "NEW0"]) == 0
        got = [i for i, _ in json.loads(capsys.readouterr().out)]
        assert "NEW0" not in got and got == [w for w in in_process(
            tmp_path / "v2", data_dir, [session], {"filter": '{"category": "c1"}', "exclude_ids": ["NEW0"]})[0][0] if w]
        assert main([*base, "--filter", '{"category": "no-such-category"}']) == 0
        out = capsys.readouterr()
        assert json.loads(out.out) == [] and "no unseen item of the served catalog matches the filter" in out.err
        assert main([*base, "--filter", '{"colour": "red"}']) == 2
        assert "filter: unknown attribute 'colour'" in capsys.readouterr().err
        assert main([*base, "--filter", "{bad"]) == 2
        assert "--filter is not valid JSON" in capsys.readouterr().err
        assert main([*base, "--since", today]) == 2
        assert "--since applies to --new-arrivals" in capsys.readouterr().err


# -- the grammar, in-process --------------------------------------------------------------------------------

def test_attribute_kinds_are_read_off_the_values_and_a_derived_name_is_refused():
    from odmt_t4r.data.attributes import attribute_kinds, normalize_attributes
    from odmt_t4r.data.base import DataValidationError

    items = pd.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", "y", "z"], "flag": ["TRUE", "false", ""],
                          "size": [1, 2.5, None], "since": ["1700000000", "", "1700000100"],
                          "label": ["None", "nan", " "], "code": [7, 8, 9]})
    out = normalize_attributes(items, "items.csv", {"code": "text"})
    assert attribute_kinds(out) == {"flag": "bool", "size": "number", "since": "date", "label": "text", "code": "text"}
    assert out["flag"].tolist()[:2] == [True, False] and pd.isna(out["flag"][2])
    assert out["since"][0] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC") and pd.isna(out["since"][1])
    assert out["label"].tolist()[:2] == ["None", "nan"] and pd.isna(out["label"][2])  # words kept, a blank is null
    assert out["code"].tolist() == ["7", "8", "9"]  # the catalog's text attribute takes numbers as text
    with pytest.raises(DataValidationError, match="'new_arrival' is derived by odmt"):
        normalize_attributes(items.assign(new_arrival=True), "items.csv")
    with pytest.raises(DataValidationError, match="column 'flag': is a true/false attribute"):
        normalize_attributes(items.assign(flag=["yes", "no", "true"]), "new.csv", {"flag": "bool"})


def test_the_attribute_index_equals_plain_pandas_on_every_condition(run_dir, data_dir):
    frame = run_attributes(run_dir, data_dir)
    index = AttributeIndex(frame)
    specs = [*FILTERS.values(), {"category": "c3"}, {"price": [float(frame["price"].dropna().iloc[0])]},
             {"price": {"not": float(frame["price"].dropna().iloc[1])}}, {"available": False},
             {"since": {"max": "2024-02-10"}}, {"since": {"min": "2024-02-10T12:00:00+02:00"}}, {NEW_ARRIVAL: False},
             {"category": []}]
    for spec in specs:
        got = index.allowed(index.parse(json.dumps(spec)))
        want = reference_filter_mask(frame, spec)
        assert np.array_equal(got, want), spec
    assert index.allowed(index.parse("{}")) is None
    model = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir)  # in-process, the filter as ItemRules
    history = torch.tensor([[5, 9, 40, 0]])
    scores, idx = model.recommend(history, k=K, rules=AttributeIndex.for_run(run_dir).rules(FILTERS["category"]))
    allowed = reference_filter_mask(frame, FILTERS["category"])
    full_s, full_i = model.recommend(history, k=model.config.n_index)
    want = [i for i, s in zip(full_i[0].tolist(), full_s[0].tolist()) if allowed[i] and s > float("-inf")][:K]
    assert idx[0].tolist() == want
    with pytest.raises(ValueError, match=r"filter: 'available' is a bool attribute: give true or false"):
        index.parse('{"available": "yes"}')
    with pytest.raises(ValueError, match="filter: one JSON object per request"):
        index.parse(np.array([b"{}", b"{}"], dtype=object))


def test_a_repository_without_the_filter_input_is_refused_with_the_way_out(triton_server, capsys):  # noqa: F811
    """A repository exported before filters (tests/triton_fixtures.py's toy model declares no rule inputs)."""
    from odmt_t4r.cli import main

    with RecommenderClient(triton_server.http_url) as client:
        assert not client.takes_filter
        with pytest.raises(ValueError, match="takes no"):
            client.recommend([["a"]], 3, filter={"category": "c1"})
    assert main(["recommend", "--url", triton_server.http_url, "--items", "a", "--new-arrivals"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "takes no attribute filter: export the RUN again with this version of odmt to use --filter / --new-arrivals")
