"""Business rules at serving: per-request `exclude_ids` and `include_ids` on a REAL Triton server.

The served answer under a rule must be the unrestricted ranking with the excluded items removed, or
restricted to the included ones (same items, order, scores), and equal the in-process answer under the same
rule (`reference_recommend(..., rules=...)`: Workflow.transform + an eager model). Both request transforms,
the exact scan and the HNSW path (forced through the RUN's "retrieval" settings), merged batches, the
session's own items, unknown IDs, short include lists, empty sessions and the CLI.
The store, the RUN and the server fixtures are tests/test_serving.py's."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from odmt_t4r.model import OdmtRecommender
from odmt_t4r.model.retrieval import ItemRules, RetrievalConfig
from tests.test_serving import (ATOL, K, OFFSETS, VALUES, data_dir, fast_server, known, raw_infer,  # noqa: F401
                                run_dir, serve, sessions, workflow_server)
from tests.triton_fixtures import (executor_module_under, expected, toy_repo, triton_available,  # noqa: F401
                                   triton_server)
from triton_models.checks import catalog_ids, reference_recommend
from triton_models.client import RecommenderClient
from triton_models.graph import load_inference_workflow

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_available(), reason="no tritonserver")]
UNKNOWN = "__no-such-item__"


@pytest.fixture(scope="module")
def in_process(run_dir, data_dir):  # noqa: F811
    """rules -> the in-process answers (raw IDs [B k], scores [B k]) of sessions under `rules` (raw IDs)."""
    torch.set_num_threads(1)
    model = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir)
    workflow, ids = load_inference_workflow(data_dir), catalog_ids(data_dir)
    return lambda sessions, rules=None, k=K: reference_recommend(model, workflow, ids, sessions, k, rules=rules)


@pytest.fixture(scope="module")
def hnsw_run(run_dir, data_dir, tmp_path_factory):  # noqa: F811
    """tests/test_serving.py's RUN searching through HNSW: include lists of at most 20 items are scanned
    exactly, wider rules walk the graph with a faiss selector (retrieval.py)."""
    model = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir)
    model.set_retrieval(RetrievalConfig(index="hnsw", rules_exact_max_items=20))
    out = tmp_path_factory.mktemp("rules") / "hnsw-run"
    model.save_pretrained(out, extra={"data": {"dir": str(data_dir)}})
    return out


@pytest.fixture(scope="module")
def hnsw_server(hnsw_run, data_dir, tmp_path_factory):  # noqa: F811
    with serve(hnsw_run, data_dir, tmp_path_factory, "fast") as server:
        yield server


def allowed_ranking(idx, scores, allowed, k=K):
    """An unfiltered in-process ranking (item indices, scores) cut to the allowed items, first k."""
    return [(i, s) for i, s in zip(idx.tolist(), scores.tolist()) if allowed[i] and s > float("-inf")][:k]


def answers_ids(answers):
    return [[i for i, _ in a] for a in answers]


def assert_served_equals(answers, want):
    want_ids, want_scores = want
    assert len(answers) == len(want_ids)
    for i, answer in enumerate(answers):
        assert [a[0] for a in answer] == [w for w in want_ids[i] if w], f"session {i}"
        finite = want_scores[i][np.isfinite(want_scores[i])]
        np.testing.assert_allclose([a[1] for a in answer], finite, atol=ATOL, rtol=0, err_msg=f"session {i}")


def restricted(full_ids, full_scores, allowed, k=K):
    """The unrestricted ranking (raw IDs, scores) cut to `allowed`, first k: what a rule must answer."""
    keep = [(i, s) for i, s in zip(full_ids, full_scores) if i and i in allowed][:k]
    return [i for i, _ in keep], [s for _, s in keep]


# -- exclude / include on the exact scan ---------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_exclude_removes_items_from_the_unrestricted_ranking(fast_server, sessions, known, in_process, protocol):  # noqa: F811
    few = sessions[:12]
    full_ids, full_scores = in_process(few, k=len(known))
    exclude = [full_ids[0][0], full_ids[0][2], full_ids[1][0], *known[::9]]  # top items of two sessions, and more
    with RecommenderClient(fast_server.http_url if protocol == "http" else fast_server.grpc_url, protocol) as client:
        answers = client.recommend(few, K, exclude=exclude)
    for i, answer in enumerate(answers):
        want_ids, want_scores = restricted(full_ids[i], full_scores[i], set(known) - set(exclude))
        assert [a[0] for a in answer] == want_ids, f"session {i}"
        np.testing.assert_allclose([a[1] for a in answer], want_scores, atol=ATOL, rtol=0)
        assert not set(want_ids) & set(exclude) and len(answer) == K
    assert_served_equals(answers, in_process(few, {"exclude_ids": exclude}))


def test_include_restricts_the_ranking_to_the_listed_items(fast_server, sessions, known, in_process):  # noqa: F811
    few = sessions[:12]
    full_ids, full_scores = in_process(few, k=len(known))
    include = known[3::7]  # 29 items, some of them in the sessions
    with RecommenderClient(fast_server.http_url) as client:
        answers = client.recommend(few, K, include=include)
    for i, answer in enumerate(answers):
        want_ids, want_scores = restricted(full_ids[i], full_scores[i], set(include))
        assert [a[0] for a in answer] == want_ids and len(answer) == K, f"session {i}"
        np.testing.assert_allclose([a[1] for a in answer], want_scores, atol=ATOL, rtol=0)
    assert_served_equals(answers, in_process(few, {"include_ids": include}))


def test_a_short_include_list_answers_fewer_items_padded_as_in_process(fast_server, sessions, in_process):  # noqa: F811
    from triton_models.client import encode_sessions

    session = sessions[0]
    include = [session[-1], *in_process([session], k=30)[0][0][[4, 20, 29]].tolist(), UNKNOWN]
    with RecommenderClient(fast_server.http_url) as client:
        (answer,), _ = client.recommend_with_unknown([session], K, include=include)
        assert client.unknown_rule_ids == {"exclude": 0, "include": 1}
        nothing = client.recommend([session], K, include=[UNKNOWN])
    assert [i for i, _ in answer] == list(include[1:4])  # the session's own item is never returned
    assert nothing == [[]]
    values, offsets = encode_sessions([session])
    wire = raw_infer(fast_server, [(VALUES, values[None], "BYTES"), (OFFSETS, offsets[None], "INT32"),
                                   ("include_ids", np.array([[i.encode() for i in include]], dtype=object), "BYTES")])
    want_ids, want_scores = in_process([session], {"include_ids": include})
    assert [i.decode() for i in wire.as_numpy("item_ids")[0, 0]] == want_ids[0].tolist()  # b"" pads the same slots
    assert np.array_equal(np.isneginf(wire.as_numpy("scores")[0, 0]), np.isneginf(want_scores[0]))
    assert wire.as_numpy("unknown_rule_ids").tolist() == [[[0, 1]]]


def test_unknown_rule_ids_are_ignored_and_counted(fast_server, sessions, known, in_process):  # noqa: F811
    few = sessions[:4]
    exclude = [in_process(few)[0][0][0], UNKNOWN, "", " ", known[0].lower(), UNKNOWN]
    include = [*known[:60], "another-unknown"]
    with RecommenderClient(fast_server.grpc_url, "grpc") as client:
        answers, unknown = client.recommend_with_unknown(few, K, exclude=exclude, include=include)
        counts = client.unknown_rule_ids
        clean = client.recommend(few, K, exclude=exclude[:1], include=known[:60])
        client.recommend_with_unknown(few, K)
        assert client.unknown_rule_ids is None  # no rules sent, none counted
    assert counts == {"exclude": 5, "include": 1}
    assert unknown == [0] * len(few)  # the sessions' own counts are unchanged by the rules
    assert answers == clean
    assert_served_equals(answers, in_process(few, {"exclude_ids": exclude, "include_ids": include}))


def test_rules_combine_with_the_sessions_own_items(fast_server, sessions, known, in_process):  # noqa: F811
    few = [s for s in sessions if 3 <= len(s) <= 20][:6]
    own = sorted({i for s in few for i in s})
    include = own + known[1::5]  # every session item is included, and still never returned
    exclude = known[1::10]  # half of the other included items
    with RecommenderClient(fast_server.http_url) as client:
        answers = client.recommend(few, K, exclude=exclude, include=include)
    allowed = set(include) - set(exclude)
    for session, answer in zip(few, answers):
        ids = [i for i, _ in answer]
        assert ids and set(ids) <= allowed and not set(ids) & set(session)
    assert_served_equals(answers, in_process(few, {"exclude_ids": exclude, "include_ids": include}))


def test_an_empty_session_gets_the_most_popular_allowed_items(fast_server, workflow_server, data_dir, known):  # noqa: F811
    import pandas as pd

    items = pd.read_parquet(data_dir / "items.parquet")
    by_popularity = items.sort_values(["train_count", "item_idx"], ascending=[False, True])["item_id"].tolist()
    exclude, include = by_popularity[:3], by_popularity[5:40:4]
    for server in (fast_server, workflow_server):
        with RecommenderClient(server.http_url) as client:
            (excluded,) = client.recommend([[]], K, exclude=exclude)
            (included,) = client.recommend([[]], K, include=include)
        assert [i for i, _ in excluded] == by_popularity[3:3 + K]
        assert [i for i, _ in included] == include[:K]


def test_the_workflow_transform_applies_the_same_rules(workflow_server, fast_server, sessions, known, in_process):  # noqa: F811
    few = sessions[:8] + [["not-an-item", known[0]]]
    rules = {"exclude": known[:40], "include": known[20:120]}
    with RecommenderClient(workflow_server.grpc_url, "grpc") as client:
        answers = client.recommend(few, K, **rules)
    with RecommenderClient(fast_server.grpc_url, "grpc") as client:
        fast = client.recommend(few, K, **rules)
    assert_served_equals(answers, in_process(few, {"exclude_ids": rules["exclude"], "include_ids": rules["include"]}))
    assert answers_ids(fast) == answers_ids(answers)


def test_merged_requests_each_get_their_own_rule(fast_server, sessions, known, in_process):  # noqa: F811
    """Concurrent requests with different rules (and none) are merged by the dynamic batcher into one graph run."""
    rules = [{}, {"exclude": known[:50]}, {"include": known[100:140]}, {"exclude": known[::3], "include": known[::2]}]
    with RecommenderClient(fast_server.http_url) as client:
        single = {(r, i): client.recommend([sessions[i]], K, **rules[r])[0] for r in range(4) for i in range(8)}
    for r, rule in enumerate(rules):
        assert_served_equals([single[r, i] for i in range(8)],
                             in_process(sessions[:8], {f"{name}_ids": ids for name, ids in rule.items()} or None))

    def one_request(job):  # its own client: merged only by the server's dynamic batcher
        c, r, i = job
        protocol = "grpc" if c % 2 else "http"
        with RecommenderClient(fast_server.grpc_url if c % 2 else fast_server.http_url, protocol) as client:
            return r, i, client.recommend([sessions[i]], K, **rules[r])[0]

    jobs = [(c, (c + j) % 4, j % 8) for j in range(24) for c in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one_request, jobs))  # a failed request raises here
    assert len(got) == 96
    for r, i, answer in got:
        assert [a for a, _ in answer] == [a for a, _ in single[r, i]]
        np.testing.assert_allclose([s for _, s in answer], [s for _, s in single[r, i]], atol=ATOL)


# -- the HNSW path -------------------------------------------------------------------------------------

def test_hnsw_path_with_rules_equals_in_process_and_the_exact_filtered_answer(hnsw_server, hnsw_run, run_dir,  # noqa: F811
                                                                                 data_dir, sessions, known):  # noqa: F811
    hnsw = OdmtRecommender.from_pretrained(hnsw_run, data_dir=data_dir)
    exact = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir)
    exact.set_retrieval({"index": "exact"})  # the same fusion: log_softmax shifts scores, not the ranking
    workflow, ids = load_inference_workflow(data_dir), catalog_ids(data_dir)
    assert hnsw.retriever().kind == "hnsw"
    few = sessions[:30]
    cases = {"narrow include (exact scan of the allowed items)": {"include_ids": known[::12]},
             "wide exclude (the graph walked with a selector)": {"exclude_ids": known[::2]},
             "both": {"exclude_ids": known[:30], "include_ids": known[::3]}}
    for name, rule in cases.items():
        with RecommenderClient(hnsw_server.http_url) as client:
            answers = client.recommend(few, K, exclude=rule.get("exclude_ids"), include=rule.get("include_ids"))
        assert_served_equals(answers, reference_recommend(hnsw, workflow, ids, few, K, rules=rule))
        want = reference_recommend(exact, workflow, ids, few, K, rules=rule)[0]
        recall = np.mean([len(set(answers_ids([a])[0]) & set(w)) / K for a, w in zip(answers, want)])
        assert recall >= 0.99, name
        assert all(len(a) == K for a in answers), name


def test_hnsw_rules_in_process_keep_k_allowed_items_and_exact_scores(hnsw_run, data_dir):  # noqa: F811
    """Every way the hnsw path answers a rule (the subset scan, the selector walk, the fallback when the walk
    finds too few) returns k allowed items, scored exactly like the unfiltered search."""
    model = OdmtRecommender.from_pretrained(hnsw_run, data_dir=data_dir).eval()
    n = model.config.n_index
    history = torch.randint(3, n, (6, 5), generator=torch.Generator().manual_seed(3))
    full_s, full_i = model.recommend(history, k=n)  # unfiltered: the history last, at -inf
    rules = {"subset": ItemRules(include=torch.arange(3, n, 11)),  # 19 items <= rules_exact_max_items (20)
             "walk": ItemRules(exclude=torch.arange(3, n, 2)),
             "include everything but the top": ItemRules(exclude=full_i[:, :5].reshape(-1))}
    retriever = model.retriever()
    walked = []
    original = retriever._search_subset
    retriever._search_subset = lambda *a: walked.append(len(a[3])) or original(*a)
    for name, rule in rules.items():
        got_s, got_i = model.recommend(history, k=K, rules=rule)
        allowed = rule.allowed(n)
        for row in range(len(history)):
            keep = allowed_ranking(full_i[row], full_s[row], allowed)
            assert got_i[row].tolist() == [i for i, _ in keep], (name, row)
            torch.testing.assert_close(got_s[row], torch.tensor([s for _, s in keep]), atol=1e-4, rtol=0)
    narrow = int(rules["subset"].allowed(n).sum())
    assert walked == [narrow] and narrow <= 20  # only the narrow rule was scanned; the walks found k items
    walk = retriever._search_hnsw  # a walk that comes up short on session 0: the allowed items are scanned

    def short_walk(*args):
        top_s, top_i = walk(*args)
        top_s[0, -3:] = float("-inf")
        return top_s, top_i

    retriever._search_hnsw = short_walk
    rule = rules["walk"]
    got_s, got_i = model.recommend(history, k=K, rules=rule)
    assert walked == [narrow, int(rule.allowed(n).sum())]
    for row in range(len(history)):
        assert got_i[row].tolist() == [i for i, _ in allowed_ranking(full_i[row], full_s[row], rule.allowed(n))]


def test_exact_scan_applies_the_rule_before_its_running_top_k(run_dir, data_dir):  # noqa: F811
    model = OdmtRecommender.from_pretrained(run_dir, data_dir=data_dir).eval()
    n = model.config.n_index
    history = torch.randint(3, n, (5, 4), generator=torch.Generator().manual_seed(5))
    full_s, full_i = model.recommend(history, k=n)
    for block in (7, 64, 100_000):  # the allowed items fall in every block, and in none of some
        model.set_retrieval(RetrievalConfig(index="exact", block_items=block))
        per_session = [ItemRules(include=full_i[0, 150:170]), None, ItemRules(exclude=full_i[:, :K].reshape(-1)),
                       None, ItemRules(include=torch.tensor([], dtype=torch.long))]
        got_s, got_i = model.recommend(history, k=K, rules=per_session)
        for row, rule in enumerate(per_session):
            allowed = torch.ones(n, dtype=torch.bool) if rule is None else rule.allowed(n)
            keep = allowed_ranking(full_i[row], full_s[row], allowed)
            assert got_i[row, :len(keep)].tolist() == [i for i, _ in keep], (block, row)
            torch.testing.assert_close(got_s[row, :len(keep)], torch.tensor(keep and [s for _, s in keep]),
                                       atol=1e-4, rtol=0)
            assert torch.isneginf(got_s[row, len(keep):]).all()
    with pytest.raises(ValueError, match="rows outside the catalog"):
        model.recommend(history, k=K, rules=ItemRules(exclude=torch.tensor([n + 4])))


# -- the command line ----------------------------------------------------------------------------------

def test_cli_recommend_takes_exclude_and_include_lists(fast_server, sessions, known, in_process, capsys):  # noqa: F811
    from odmt_t4r.cli import main

    session = sessions[1]
    top = in_process([session])[0][0].tolist()
    base = ["recommend", "--url", fast_server.http_url, "--items-json", json.dumps(session), "--json"]
    assert main([*base, "--exclude", ",".join(top[:3])]) == 0
    out = capsys.readouterr()
    assert [i for i, _ in json.loads(out.out)] == in_process([session], {"exclude_ids": top[:3]})[0][0].tolist()
    assert out.err == ""
    include = [top[5], top[1], "odd,id", UNKNOWN]
    assert main([*base, "--include-json", json.dumps(include), "--exclude", top[1]]) == 0
    out = capsys.readouterr()
    assert [i for i, _ in json.loads(out.out)] == [top[5]]
    assert "2 of 4 --include item IDs are not in the served catalog (ignored)" in out.err
    assert main([*base, "--include", ""]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "odmt recommend: error: --include holds no item IDs: give at least one, or leave --include out")
    assert main([*base, "--exclude-json", '"a"']) == 2
    assert "--exclude-json must be a JSON list of strings" in capsys.readouterr().err


def test_a_repository_without_rule_inputs_is_refused_with_the_way_out(triton_server, capsys):  # noqa: F811
    """A repository exported before the rules (tests/triton_fixtures.py's toy model declares none)."""
    from odmt_t4r.cli import main

    with RecommenderClient(triton_server.http_url) as client:
        assert not client.takes_rules
        with pytest.raises(ValueError, match="takes no exclude_ids / include_ids inputs: export the RUN again"):
            client.recommend([["a"]], 3, exclude=["b"])
        (answer,) = client.recommend([["a", "b"]], 3)  # without rules it answers
        assert [i for i, _ in answer] == [i for i, _ in expected(["a", "b"], 3)]
    assert main(["recommend", "--url", triton_server.http_url, "--items", "a", "--include", "b"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "takes no business rules: export the RUN again with this version of odmt to use --exclude / --include")


def test_the_executors_bytes_deserializer_equals_the_stubs(monkeypatch):
    """executor_model.deserialize_bytes_tensor replaces the stub's (a list's cost is its transport): the same
    arrays for one-width IDs, mixed widths, empty IDs, IDs ending in NUL, non-ASCII IDs and no IDs at all."""
    import importlib.util
    import struct

    from triton_models._tritonenv import find_triton

    path = find_triton().backend_dir / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    deserialize_bytes_tensor = executor_module_under(monkeypatch, stub).deserialize_bytes_tensor

    cases = {"one width": [f"I{j:07d}".encode() for j in range(1000)],
             "mixed widths": [f"I{j}".encode() for j in range(1000)],
             "empty and odd": [b"", b"a", b"", "日本語".encode(), b"x\x00"],
             "one width, one ending in NUL": [b"ab\x00", b"abc", b"abd"],
             "none": []}
    for name, ids in cases.items():
        wire = b"".join(struct.pack("<I", len(i)) + i for i in ids)
        got, want = deserialize_bytes_tensor(wire), stub.deserialize_bytes_tensor(wire)
        assert got.dtype == object and got.shape == want.shape, name
        assert got.tolist() == want.tolist() == ids, name
        assert all(type(v) is bytes for v in got), name
