"""Full-catalog evaluation streamed over item blocks (training/streaming.py) gives the metrics of the full
[B N] score matrix: every scorer, the fusion grid (raw and log_softmax), the long-tail slice, coverage."""

import functools
import math

import pytest
import torch

from odmt_t4r.model import build_model, history_and_target
from odmt_t4r.model.peer_distillation import fuse
from odmt_t4r.training import evaluate, streaming
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.fusion import evaluate_fusions, fusion_candidates
from odmt_t4r.training.metrics import DEFAULT_KS, RankingAccumulator, hr_ndcg, target_ranks
from tests.synthetic import make_synthetic_prepared

SMALL = dict(d_model=16, n_heads=2, imt_layers=1, seq_layers=1)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("streaming") / "prep", n_users=80, n_items=250)


@pytest.fixture(scope="module")
def model(data_dir):
    torch.manual_seed(0)
    m = build_model("odmt", data_dir, **SMALL)
    for _ in range(3):  # a few steps, so the branches and the prior differ from their init
        m(next(iter(PreparedData(data_dir).batches("train", 64)))["items"])["loss"].backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    p.grad = None
    return m.eval()


def full_matrix_fusions(model, data, candidates):
    """The fusion grid as it was computed before streaming: every candidate on the [B N] matrices."""
    ranks = {c: [] for c in candidates}
    for batch in data.batches("valid", 32):
        history, target = history_and_target(batch["items"])
        raw = {b: model.score(history)[b] for b in model.branch_names}
        per_kind = {"raw": raw, "log_softmax": {b: torch.log_softmax(s, -1) for b, s in raw.items()}}
        for c in candidates:
            kind = c.scores if c.weights is not None else "raw"
            ranks[c].append(target_ranks(fuse(per_kind[kind], c.as_dict(), "raw"), target, batch.get("seen")))
    return {c.name: hr_ndcg(torch.cat(r), DEFAULT_KS) for c, r in ranks.items()}


@pytest.mark.parametrize("block", [17, 100, 10_000])
def test_the_streamed_fusion_grid_equals_the_full_matrix_grid(model, data_dir, block):
    data = PreparedData(data_dir)
    candidates = fusion_candidates(model.branch_names, step=0.25)
    assert {c.scores for c in candidates} == {"raw", "log_softmax"}
    got = evaluate_fusions(model, data, "valid", batch_size=32, candidates=candidates, block_items=block)
    want = full_matrix_fusions(model, data, candidates)
    assert {name: {k: v for k, v in row.items() if k != "candidate"} for name, row in got.items()} == want
    assert len({round(row["NDCG@10"], 9) for row in want.values()}) > 3  # the candidates really differ


@pytest.mark.parametrize("fusion", [None, ({"id": 0.5, "text": 0.2, "image": 0.3}, "log_softmax")],
                         ids=["mean", "log_softmax"])
def test_evaluate_model_streamed_equals_the_full_matrix_metrics(model, data_dir, monkeypatch, fusion):
    model.set_fusion(*(fusion or (None,)))
    data = PreparedData(data_dir)
    tail, _ = evaluate.long_tail_items(data)
    want = RankingAccumulator(n_index=model.config.n_index)
    for batch in data.batches("test", 512):
        history, target = history_and_target(batch["items"])
        want.update(model.score(history), target, batch.get("seen"), tail=tail[target])
    want = want.compute()
    monkeypatch.setattr(evaluate, "streaming_update", functools.partial(streaming.streaming_update, block_items=23))
    got = evaluate.evaluate_model(model, data, "test")
    assert {k: got[k] for k in want} == want
    assert want["longtail_users"] > 0 and 0 < want["coverage@10"] < 1 and "longtail/NDCG@10" in want
    assert ("mean/NDCG@10" in want) == (fusion is not None)


def test_a_target_in_the_history_or_a_reserved_row_ranks_nowhere(model):
    history = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    target = torch.tensor([6, 1])  # in its own history; a reserved row
    out = streaming.stream_ranks(model, history, target, history, streaming.model_scorers(model), coverage_k=4,
                                 block_items=50)
    ranks, top_s, top_i = out["fused"]
    assert ranks.tolist() == [math.inf, math.inf]
    assert top_i.shape == (2, 4) and not set(top_i[0].tolist()) & {0, 1, 2, 5, 6, 7}
