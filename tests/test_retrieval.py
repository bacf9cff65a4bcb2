"""The fused top-k as one inner product (odmt_t4r/model/retrieval.py): exact in item blocks against the
full score matrix, every fusion, the history excluded; the HNSW index finds the exact top-k on a small
catalog and is cached on disk; a saved RUN keeps its retrieval settings."""

import pytest
import torch

from odmt_t4r.model import OdmtRecommender, build_model
from odmt_t4r.model.retrieval import FusedRetriever, RetrievalConfig
from tests.synthetic import make_synthetic_prepared

SMALL = dict(d_model=16, n_heads=2, imt_layers=1, seq_layers=1)
FUSIONS = [None, ({"id": 0.6, "text": 0.4}, "raw"), ({"id": 0.5, "text": 0.3, "image": 0.2}, "log_softmax")]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("retrieval") / "prep", n_users=48, n_items=300)


@pytest.fixture(scope="module")
def model(data_dir):
    torch.manual_seed(0)
    m = build_model("odmt", data_dir, **SMALL).eval()
    with torch.no_grad():  # a learned-looking prior, not the initial 1.0 of every branch
        m.popularity_weight.copy_(torch.tensor([0.7, 0.2, 0.4]))
    return m


def histories(n_index: int, B: int = 16, L: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h = torch.randint(3, n_index, (B, L), generator=g)
    h[::3, 4:] = 0  # some shorter sessions, right-padded
    return h


def full_top_k(model, history, k):
    s = model.score(history)["fused"].clone()
    s.scatter_(1, history, float("-inf"))
    return torch.topk(s, k, dim=1)


@pytest.mark.parametrize("fusion", FUSIONS, ids=["mean", "raw", "log_softmax"])
@pytest.mark.parametrize("block", [7, 64, 100_000])
def test_exact_blocks_give_the_full_matrix_top_k_and_scores(model, fusion, block):
    model.set_fusion(*(fusion or (None,)))
    model.set_retrieval(RetrievalConfig(index="exact", block_items=block))
    history = histories(model.config.n_index)
    want_s, want_i = full_top_k(model, history, 10)
    got_s, got_i = model.recommend(history, k=10)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s, atol=1e-4, rtol=1e-5)
    assert not (set(got_i[0].tolist()) & set(history[0].tolist()))


def test_a_session_that_leaves_fewer_than_k_items_gets_minus_inf_slots(data_dir):
    torch.manual_seed(0)
    model = build_model("sasrec", make_synthetic_prepared(data_dir.parent / "tiny", n_users=8, n_items=5), **SMALL).eval()
    model.set_retrieval({"index": "exact", "block_items": 2})
    scores, items = model.recommend(torch.tensor([[3, 4, 5, 0]]), k=10)
    assert scores.shape == (1, 5)  # k is cut to the catalog's size, as before
    assert torch.isfinite(scores[0, :2]).all() and torch.isinf(scores[0, 2:]).all()
    assert set(items[0, :2].tolist()) == {6, 7}


@pytest.mark.parametrize("fusion", FUSIONS[:2], ids=["mean", "raw"])
def test_hnsw_finds_the_exact_top_k_on_a_small_catalog_with_exact_scores(model, fusion, tmp_path):
    model.set_fusion(*(fusion or (None,)))
    model.set_retrieval(RetrievalConfig(index="exact"))
    history = histories(model.config.n_index)
    want_s, want_i = model.recommend(history, k=10)
    model.set_retrieval(RetrievalConfig(index="hnsw", hnsw_ef_search=400, cache_dir=str(tmp_path)))
    assert model.retriever().kind == "hnsw"
    got_s, got_i = model.recommend(history, k=10)
    assert torch.equal(got_i, want_i)  # ef 400 on 300 items: the graph search visits everything
    torch.testing.assert_close(got_s, want_s, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "retrieval").glob("hnsw-*.faiss"))) == 1


def test_the_hnsw_index_is_built_once_and_then_read_from_its_cache(model, tmp_path):
    model.set_fusion(None)
    cfg = RetrievalConfig(index="hnsw", cache_dir=str(tmp_path))
    model.set_retrieval(cfg)
    first = model.retriever()
    (cached,) = (tmp_path / "retrieval").glob("hnsw-*.faiss")
    stamp = cached.stat().st_mtime_ns
    model.set_retrieval(cfg)  # a new retriever over the same catalog
    second = model.retriever()
    assert second is not first and cached.stat().st_mtime_ns == stamp
    history = histories(model.config.n_index)
    states = model.session_states(history)
    assert torch.equal(first.search(states, history, 10)[1], second.search(states, history, 10)[1])


def test_auto_is_exact_for_small_catalogs_and_hnsw_above_the_threshold(model, tmp_path):
    model.set_fusion(None)
    catalog = model.catalog_vectors()
    weights = {b: 1.0 for b in model.branch_names}
    assert FusedRetriever(catalog, weights, config=RetrievalConfig()).kind == "exact"
    cfg = RetrievalConfig(exact_max_items=100, cache_dir=str(tmp_path))
    assert FusedRetriever(catalog, weights, config=cfg).kind == "hnsw"


def test_a_saved_run_keeps_its_retrieval_settings_and_rejects_bad_ones(model, data_dir, tmp_path):
    model.set_fusion(None)
    model.set_retrieval({"index": "exact", "block_items": 128})
    model.save_pretrained(tmp_path / "run", extra={"data": {"dir": str(data_dir)}})
    loaded = OdmtRecommender.from_pretrained(tmp_path / "run")
    assert loaded.retrieval == RetrievalConfig(index="exact", block_items=128)
    config = (tmp_path / "run" / "config.json")
    config.write_text(config.read_text().replace('"index": "exact"', '"index": "annoy"'))
    with pytest.raises(ValueError, match="retrieval"):
        OdmtRecommender.from_pretrained(tmp_path / "run")
