"""Per-branch explanations in-process: what a contribution is, which branch drove an item, and that the
executor skips them for requests that do not ask (tests/test_serving.py checks them on the real server)."""

import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from odmt_t4r.model.explain import BranchExplainer, driving_branches, fusion_weights
from tests.triton_fixtures import executor_module_under
from triton_models.checks import catalog_ids, example_sessions
from triton_models.client import encode_sessions
from triton_models.export import ServingConfig
from triton_models.graph import build_ensemble
from triton_models.predict import CONTRIBUTION

K = 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from odmt_t4r.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("explain") / "fashion"
    prepare(PrepareConfig(source="fashion", n_items=200, out=str(out)))  # as test_serving: features cached
    return out


@pytest.fixture(scope="module")
def model(data_dir, one_torch_thread):
    from odmt_t4r.model import build_model

    torch.manual_seed(0)
    model = build_model("odmt", data_dir)
    model.eval()
    assert model.branch_names == ["id", "text", "image"]
    return model


@pytest.fixture(scope="module")
def histories(data_dir, model):
    index = {raw: i for i, raw in enumerate(catalog_ids(data_dir)) if raw}
    L = model.config.max_length
    hist = torch.zeros(30, L, dtype=torch.long)
    for row, session in enumerate(example_sessions(data_dir, 30)):
        codes = [index[i] for i in session][-L:]
        hist[row, : len(codes)] = torch.tensor(codes)
    return hist


@pytest.mark.parametrize("weights,kind", [(None, "raw"), ({"id": 0.6, "text": 0.3, "image": 0.1}, "raw"),
                                          ({"id": 0.6, "text": 0.3, "image": 0.1}, "log_softmax")])
def test_contributions_split_the_fused_score_above_an_average_item(model, histories, weights, kind):
    model.set_fusion(weights, kind)
    scores, top = model.recommend(histories, k=K)
    lifts = BranchExplainer(model).contributions(histories, top)
    assert list(lifts) == ["id", "text", "image"] and all(v.shape == (30, K) for v in lifts.values())
    # sum_b c_b(i) = fused(i) - fused(average item): the same offset for every item of a session
    offset = sum(lifts.values()) - scores  # [B K]
    assert float((offset - offset[:, :1]).abs().max()) < 1e-3
    fused = model.score(histories)["fused"][:, 3:]  # the catalog's real items
    if kind == "raw":  # with raw scores the offset is exactly minus the average item's fused score
        torch.testing.assert_close(offset[:, 0], -fused.mean(1), atol=1e-3, rtol=0)
    # unweighted, each branch's contribution is its score minus its catalog mean
    raw = model.branch_scores(model.session_states(histories))
    w = fusion_weights(model.config)
    for b, lift in lifts.items():
        own = raw[b].gather(1, top) - raw[b][:, 3:].mean(1, keepdim=True)
        torch.testing.assert_close(lift, w[b] * own, atol=1e-3, rtol=0)
    model.set_fusion(None)


def test_a_branch_with_no_fusion_weight_is_not_explained_and_cannot_drive(model, histories):
    model.set_fusion({"id": 0.0, "text": 1.0, "image": 0.0})
    try:
        _, top = model.recommend(histories, k=K)
        lifts = BranchExplainer(model).contributions(histories, top)
        assert list(lifts) == ["text"]
        assert set(driving_branches({b: v.numpy() for b, v in lifts.items()}).ravel()) == {"text"}
    finally:
        model.set_fusion(None)


def test_the_driving_branch_is_the_largest_contribution_first_on_ties():
    drove = driving_branches({"id": [[1.0, 3.0, -2.0]], "text": [[2.0, 3.0, -1.0]], "image": [[0.5, -9.0, -3.0]]})
    assert drove.tolist() == [["text", "id", "text"]]


# -- the operator and the executor: explanations only for requests that ask ------------------------

@pytest.fixture(scope="module")
def served_graph(data_dir, model, tmp_path_factory):
    run = tmp_path_factory.mktemp("explain") / "run"
    model.set_fusion({"id": 0.6, "text": 0.3, "image": 0.1}, "log_softmax")
    model.save_pretrained(run, extra={"data": {"dir": str(data_dir)}})
    model.set_fusion(None)
    ensemble, predict, _ = build_ensemble(run, data_dir, ServingConfig(k=K))
    assert predict.optional_outputs == ("contribution_id", "contribution_text", "contribution_image")
    return ensemble, predict


def graph_input(sessions):
    from merlin.table import TensorTable

    values, offsets = encode_sessions(sessions)
    return TensorTable({"item_id-list__values": np.array([v.decode() for v in values], dtype=object),
                        "item_id-list__offsets": offsets})


def test_the_operator_skips_explaining_when_no_one_asked(served_graph, data_dir, monkeypatch):
    ensemble, predict = served_graph
    sessions = example_sessions(data_dir, 12) + [[]]
    full = ensemble.transform(graph_input(sessions)).to_dict()  # in-process: every output
    assert np.all(full["contribution_id"][-1] == 0)  # the empty session: popularity, no branch

    def refuse(*args):
        raise AssertionError("explain ran for a request that did not ask for it")

    monkeypatch.setattr(predict, "explain", refuse)
    predict.requested = frozenset({"item_ids", "scores"})
    try:
        plain = ensemble.transform(graph_input(sessions)).to_dict()
    finally:
        predict.requested = None
    assert np.array_equal(plain["item_ids"], full["item_ids"]) and np.array_equal(plain["scores"], full["scores"])
    assert plain["contribution_id"].strides == (0, 0)  # a placeholder view: no data behind it


class FakeRequest:
    def __init__(self, sessions, outputs):
        values, offsets = encode_sessions(sessions)
        self.tensors = {"item_id-list__values": values[None], "item_id-list__offsets": offsets[None]}
        self.outputs = list(outputs)

    def requested_output_names(self):
        return self.outputs


@pytest.fixture
def executor(served_graph, monkeypatch, tmp_path):
    """Our executor_model.py under a stand-in for Triton's python-backend module, on the in-process graph."""
    ensemble, predict = served_graph
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = lambda name, array: (name, array)
    fake.InferenceResponse = lambda output_tensors=(), error=None: SimpleNamespace(
        tensors=dict(output_tensors), error=error)
    fake.TritonError = lambda message, *code: message
    fake.TritonModelException = RuntimeError
    fake.get_input_tensor_by_name = lambda request, name: (
        SimpleNamespace(as_numpy=lambda: request.tensors[name]) if name in request.tensors else None)
    executor_model = executor_module_under(monkeypatch, fake)
    from merlin.systems.triton.models.executor_model import TritonPythonModel as Merlin

    monkeypatch.setattr(Merlin, "initialize", lambda self, args: setattr(self, "ensemble", ensemble))
    model = executor_model.TritonPythonModel()
    # Triton passes the model's folder; this repository has no availability file: every item available
    model.initialize({"model_config": '{"max_batch_size": 64}',
                      "model_repository": str(tmp_path / "repository" / "executor_model")})
    assert model.explainers == [predict]
    calls = []
    original = predict.explain
    monkeypatch.setattr(predict, "explain", lambda *a: calls.append(len(a[2])) or original(*a))
    yield model, calls
    predict.requested = None


def test_the_executor_explains_only_for_requests_that_ask(executor, data_dir):
    model, calls = executor
    sessions = example_sessions(data_dir, 6)
    plain = model.execute([FakeRequest(sessions[:3], ["item_ids", "scores"]), FakeRequest(sessions[3:], ["scores"])])
    assert calls == []  # nobody asked: the operator never explained
    assert [set(r.tensors) for r in plain] == [{"item_ids", "scores"}, {"scores"}]

    asking = ["item_ids", "scores", "contribution_id", "contribution_text", "contribution_image"]
    mixed = model.execute([FakeRequest(sessions[:3], ["item_ids", "scores"]), FakeRequest(sessions[3:], asking)])
    assert calls == [6]  # one explanation for the merged run, which the asking request shares
    assert set(mixed[0].tensors) == {"item_ids", "scores"} and set(mixed[1].tensors) == set(asking)
    for got, want in zip(mixed, plain):  # asking changes nobody's answers
        assert np.array_equal(got.tensors["scores"], want.tensors["scores"])
    assert mixed[1].tensors["contribution_id"].shape == (1, 3, K)
    assert np.any(mixed[1].tensors["contribution_text"] != 0)

    everything = model.execute([FakeRequest(sessions[:2], [])])  # naming no outputs asks for all (Triton's rule)
    assert set(everything[0].tensors) == {*asking, "unknown_ids", "unknown_rule_ids"} and calls == [6, 2]
