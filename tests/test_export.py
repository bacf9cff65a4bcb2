"""`odmt export` in-process: the fast request transform is the fitted workflow, the predict operator,
and the model repository it writes (no server here; tests/test_serving.py serves it)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from triton_models.checks import ServingCheckError, check_in_process, edge_sessions, example_sessions
from triton_models.export import ServingConfig, export
from triton_models.graph import build_ensemble, load_inference_workflow, vocabulary_ids
from triton_models.predict import ARTIFACT_DIR, OdmtPredict
from triton_models.vocab_lookup import OOV_INDEX, FastPathUnsupported, VocabularyLookup, slice_bounds

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 8  # short, so many test sessions are longer and get sliced


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from odmt_t4r.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("export") / "prepared"
    prepare(PrepareConfig(source="fashion", n_items=120, features=False, max_length=MAX_LENGTH, out=str(out)))
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    import torch

    from odmt_t4r.model import build_model

    torch.manual_seed(0)
    model = build_model("sasrec", data_dir, d_model=16, n_heads=2, seq_layers=1)
    out = tmp_path_factory.mktemp("export") / "run"
    model.save_pretrained(out, extra={"data": {"dir": str(data_dir)}})
    return out


@pytest.fixture(scope="module")
def workflow(data_dir):
    return load_inference_workflow(data_dir)


@pytest.fixture(scope="module")
def lookup(workflow):
    return VocabularyLookup.from_workflow(workflow)


@pytest.fixture(scope="module")
def all_sessions(data_dir, workflow):
    """Every test-split history in raw IDs, plus the edge cases (unknown, empty, long, odd strings)."""
    return example_sessions(data_dir, n=10**9) + edge_sessions(vocabulary_ids(workflow), MAX_LENGTH)


def workflow_encoding(workflow, sessions):
    out = workflow.transform(pd.DataFrame({"item_id-list": [list(s) for s in sessions]}))["item_id-list"]
    return [np.asarray(v, dtype=np.int64) for v in out]


def lookup_encoding(lookup, sessions, as_bytes=False):
    values = [(i.encode("utf-8") if as_bytes else i) for s in sessions for i in s]
    values = np.array(values, dtype=object)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sessions])]).astype(np.int32)
    codes, new_offsets = lookup.encode(values, offsets)
    assert new_offsets.dtype == np.int32 and codes.dtype == np.int64
    return [codes[a:b] for a, b in zip(new_offsets[:-1], new_offsets[1:])]


# -- the fast transform is the fitted workflow -------------------------------------------------------

def test_fast_transform_equals_workflow_transform_on_every_test_session(workflow, lookup, all_sessions):
    assert len(all_sessions) > 5000
    assert any(len(s) > MAX_LENGTH for s in all_sessions) and any(len(s) == 0 for s in all_sessions)
    expected = workflow_encoding(workflow, all_sessions)
    for as_bytes in (False, True):  # in-process callers send str, Triton hands the operator UTF-8 bytes
        got = lookup_encoding(lookup, all_sessions, as_bytes=as_bytes)
        mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if not np.array_equal(g, e)]
        assert not mismatches, f"session {mismatches[0]}: {got[mismatches[0]]} vs {expected[mismatches[0]]}"


def test_unknown_ids_encode_as_oov_and_long_sessions_keep_their_last_items(workflow, lookup):
    vocab = vocabulary_ids(workflow)
    known = vocab[3:]
    sessions = [["nope"], [known[0], "nope", known[1]], [], known[:30], ["日本語", "", known[5].lower()]]
    got = lookup_encoding(lookup, sessions)
    assert got[0].tolist() == [OOV_INDEX]
    assert got[1].tolist() == [3, OOV_INDEX, 4]
    assert got[2].tolist() == []
    assert got[3].tolist() == list(range(3 + 30 - MAX_LENGTH, 3 + 30))
    assert got[4].tolist() == [OOV_INDEX] * 3
    for g, e in zip(got, workflow_encoding(workflow, sessions)):
        assert np.array_equal(g, e)


@pytest.mark.parametrize("start,end", [(-8, None), (0, 5), (2, None), (-5, -1), (1, -2), (3, 3), (-100, 100), (0, -100)])
def test_slice_bounds_are_pythons_slice(start, end):
    end_value = np.iinfo(np.int64).max if end is None else end
    lengths = np.arange(0, 15)
    first, length = slice_bounds(lengths, start, end_value)
    for n, f, m in zip(lengths, first, length):
        row = list(range(n))
        assert row[start:end] == row[f:f + m]


def test_lookup_with_other_slices_matches_nvtabular_listslice(workflow, tmp_path):
    import nvtabular as nvt
    from nvtabular import ops

    from workflows.ops import ListSlice

    vocab = pd.Series(vocabulary_ids(workflow)[3:], name="item_id-list")
    known = vocab.tolist()
    sessions = [known[:n] + ["zz"] * (n % 3) for n in range(0, 14)]
    for start, end in [(0, 5), (-5, -1), (2, None), (1, -2)]:
        cats = ops.Categorify(vocabs={"item_id-list": vocab}, out_path=str(tmp_path / f"{start}_{end}"))
        wf = nvt.Workflow(["item_id-list"] >> cats >> ListSlice(start, end))
        wf.fit(nvt.Dataset(pd.DataFrame({"item_id-list": [known[:10]]})))  # non-empty after every slice
        got = lookup_encoding(VocabularyLookup.from_workflow(wf), sessions)
        for g, e in zip(got, workflow_encoding(wf, sessions)):
            assert np.array_equal(g, e), (start, end)


def test_fast_transform_refuses_workflows_it_does_not_reproduce(tmp_path):
    import nvtabular as nvt
    from nvtabular import ops

    from workflows.ops import ListSlice

    vocab = pd.Series(["a", "b", "c"], name="item_id-list")
    frame = pd.DataFrame({"item_id-list": [["a", "b", "c"]]})

    def fitted(tail=None):
        cats = ops.Categorify(vocabs={"item_id-list": vocab}, out_path=str(tmp_path))
        node = ["item_id-list"] >> cats
        wf = nvt.Workflow(node >> tail if tail is not None else node)
        return wf.fit(nvt.Dataset(frame)), cats

    padded, _ = fitted(ListSlice(-2, pad=True))
    extra_op, _ = fitted(ops.LambdaOp(lambda col: col))
    hashed, cats = fitted()
    cats.num_buckets = 10  # hashed OOV buckets (NVTabular 23.08 cannot fit them on list columns at all)
    for wf in (padded, extra_op, hashed):
        with pytest.raises(FastPathUnsupported):
            VocabularyLookup.from_workflow(wf)
    assert VocabularyLookup.from_workflow(fitted()[0]).encode(np.array(["c", "x"], dtype=object),
                                                              np.array([0, 2]))[0].tolist() == [5, OOV_INDEX]


def test_lookup_rejects_malformed_offsets(lookup):
    values = np.array(["a", "b"], dtype=object)
    for offsets in ([0, 3], [1, 2], [0, 2, 1, 2], []):
        with pytest.raises(ValueError, match="offsets"):
            lookup.encode(values, np.array(offsets, dtype=np.int32))


# -- the predict operator ----------------------------------------------------------------------------

def test_predict_operator_keeps_the_model_out_of_its_pickle_and_loads_from_artifacts(run_dir, workflow, tmp_path):
    import cloudpickle

    op = OdmtPredict(run_dir, vocabulary_ids(workflow), k=5)
    op.load_artifacts("")  # what merlin.dag.Graph.__init__ does: must not fail, must not load
    assert op._model is None
    _ = op.model  # in-process use loads from the RUN
    state = cloudpickle.dumps(op)
    assert len(state) < 50_000 and b"state_dict" not in state
    op.save_artifacts(str(tmp_path))
    assert {p.name for p in (tmp_path / ARTIFACT_DIR).iterdir()} >= {"config.json", "model.pt"}
    clone = cloudpickle.loads(state)
    assert clone._model is None
    clone.load_artifacts(str(tmp_path))
    assert clone._model is not None and clone.jit_status.count("traced") == len(clone._model.branches)
    values, offsets = np.array([3, 4, 5, 6], dtype=np.int64), np.array([0, 3, 3, 4])
    (ids, scores), (clone_ids, clone_scores) = op.recommend(values, offsets), clone.recommend(values, offsets)
    assert ids.shape == scores.shape == (3, 5)
    np.testing.assert_array_equal(ids, clone_ids)
    np.testing.assert_allclose(scores, clone_scores, atol=1e-5)


def test_predict_history_is_right_padded_and_keeps_the_last_items(run_dir, workflow):
    op = OdmtPredict(run_dir, vocabulary_ids(workflow), k=5)
    L = op.model.config.max_length
    values = np.arange(3, 3 + L + 5)
    offsets = np.array([0, 2, 2, L + 5])
    hist = op.history(values, offsets)
    assert hist.shape == (3, L)
    assert hist[0].tolist() == [3, 4] + [0] * (L - 2)
    assert hist[1].tolist() == [0] * L
    assert hist[2].tolist() == values[-L:].tolist()


def test_empty_session_gets_the_most_popular_items(run_dir, data_dir, workflow):
    op = OdmtPredict(run_dir, vocabulary_ids(workflow), k=5)
    ids, scores = op.recommend(np.zeros(0, dtype=np.int64), np.array([0, 0]))
    items = pd.read_parquet(data_dir / "items.parquet")
    top = items.sort_values(["train_count", "item_idx"], ascending=[False, True]).head(5)
    assert [i.decode() for i in ids[0]] == top["item_id"].tolist()
    np.testing.assert_allclose(scores[0], np.log(np.maximum(top["train_count"].to_numpy(), 1)), rtol=1e-6)


def test_in_process_check_catches_a_wrong_vocabulary(run_dir, data_dir, workflow):
    ensemble, predict, wf = build_ensemble(run_dir, data_dir, ServingConfig(k=5))
    sessions = example_sessions(data_dir, 20)
    assert check_in_process(ensemble, predict, wf, sessions)["encodings_checked"] == 20
    predict.item_ids = np.roll(predict.item_ids, 1)  # a vocabulary off by one
    with pytest.raises(ServingCheckError, match="differ"):
        check_in_process(ensemble, predict, wf, sessions)


# -- the model repository ----------------------------------------------------------------------------

def parse_config(path):
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


@pytest.mark.parametrize("transform", ["fast", "workflow"])
def test_export_writes_a_tuned_self_contained_repository(run_dir, data_dir, tmp_path, transform):
    import tritonclient.grpc.model_config_pb2 as mc

    repo = tmp_path / "repo"
    manifest = export(run_dir, repo, ServingConfig(k=7, transform=transform), data_dir=data_dir, check_sessions=30)
    assert json.loads((repo / "manifest.json").read_text()) == manifest
    assert manifest["transform"] == transform and manifest["k"] == 7 and manifest["model"] == "sasrec"
    assert manifest["run"] == str(run_dir.resolve()) and manifest["data_dir"] == str(data_dir.resolve())
    assert manifest["check"]["sessions"] == 30 + len(edge_sessions(["a", "b", "c", "d"], MAX_LENGTH))
    assert {"merlin-systems", "nvtabular", "torch", "nvidia-pytriton"} <= set(manifest["versions"])
    assert not (tmp_path / "repo.partial").exists()

    executor = parse_config(repo / "executor_model" / "config.pbtxt")
    assert executor.backend == "python" and executor.max_batch_size == 64
    assert executor.HasField("dynamic_batching")
    assert [g.kind for g in executor.instance_group] == [mc.ModelInstanceGroup.Kind.KIND_CPU]
    assert [(i.name, i.data_type, i.allow_ragged_batch, i.optional) for i in executor.input] == [
        ("item_id-list__values", mc.TYPE_STRING, True, False), ("item_id-list__offsets", mc.TYPE_INT32, True, False),
        ("exclude_ids", mc.TYPE_STRING, True, True), ("include_ids", mc.TYPE_STRING, True, True),  # business rules
        ("filter", mc.TYPE_STRING, True, True)]  # the attribute filter
    assert [(o.name, o.data_type, list(o.dims)) for o in executor.output] == [
        ("item_ids", mc.TYPE_STRING, [-1, 7]), ("scores", mc.TYPE_FP32, [-1, 7]),
        ("contribution_id", mc.TYPE_FP32, [-1, 7]),  # optional: computed only for requests that ask for it
        ("unknown_ids", mc.TYPE_INT32, [-1, 1]),  # per session, its item IDs not in the served catalog
        ("unknown_rule_ids", mc.TYPE_INT32, [-1, 2])]  # the request's exclude / include IDs not in it
    model_py = (repo / "executor_model" / "1" / "model.py").read_text()
    assert model_py == (ROOT / "triton_models" / "executor_model.py").read_text()
    assert (repo / "executor_model" / "1" / "ensemble" / ARTIFACT_DIR / "model.pt").is_file()

    others = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file() and p.name != "executor_model")
    if transform == "fast":
        assert others == []
    else:
        assert others == ["0_transformworkflowtriton"]
        wf_config = parse_config(repo / others[0] / "config.pbtxt")
        assert [g.kind for g in wf_config.instance_group] == [mc.ModelInstanceGroup.Kind.KIND_CPU]
        assert (repo / others[0] / "1" / "model.py").read_text() == (ROOT / "triton_models" / "workflow_model.py").read_text()
        assert (repo / others[0] / "1" / "workflow" / "workflow.pkl").is_file()


def test_export_without_dynamic_batching_keeps_merlins_unbatched_shapes(run_dir, data_dir, tmp_path):
    manifest = export(run_dir, tmp_path / "repo", ServingConfig(k=3, max_batch_size=0), data_dir=data_dir,
                      check_sessions=5)
    config = parse_config(tmp_path / "repo" / "executor_model" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert not any(i.allow_ragged_batch for i in config.input)
    assert manifest["wire"]["inputs"]["item_id-list__values"].startswith("BYTES [N]")


def test_exported_ensemble_loads_without_this_checkout_on_the_path(run_dir, data_dir, tmp_path):
    """The operators are pickled by value: the server's Python needs merlin and odmt_t4r, not triton_models."""
    repo = tmp_path / "repo"
    export(run_dir, repo, ServingConfig(k=3), data_dir=data_dir, check_sessions=5)
    ensemble_dir = repo / "executor_model" / "1" / "ensemble"
    code = f"""
import sys, warnings
warnings.filterwarnings("ignore")
sys.modules["triton_models"] = None  # unimportable
import numpy as np
from merlin.dag import postorder_iter_nodes
from merlin.systems.dag import Ensemble
from merlin.table import TensorTable
ens = Ensemble.load({str(ensemble_dir)!r})
for node in postorder_iter_nodes(ens.graph.output_node):
    node.op.load_artifacts({str(ensemble_dir)!r})
out = ens.transform(TensorTable({{"item_id-list__values": np.array([b"nope"], dtype=object),
                                  "item_id-list__offsets": np.array([0, 1], dtype=np.int32)}}))
print(out["item_ids"].values.shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(1, 3)")


def test_cli_export_and_its_errors(run_dir, data_dir, tmp_path, capsys):
    from odmt_t4r.cli import main

    repo = tmp_path / "repo"
    assert main(["export", "--run", str(run_dir), "--out", str(repo), "--k", "4", "--data", str(data_dir),
                 "--check-sessions", "10"]) == 0
    assert json.loads((repo / "manifest.json").read_text())["k"] == 4
    assert main(["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


# -- small catalogs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_items", [1, 3])
def test_export_works_from_a_one_item_catalog_and_pads_what_is_left(tmp_path, n_items):
    from tests.tiny_data import prepare_tiny, untrained_run
    from triton_models.checks import catalog_ids, reference_recommend

    data = prepare_tiny(tmp_path / "inputs", tmp_path / "prepared", n_items=n_items, n_users=4, length=4)
    run = untrained_run(data, tmp_path / "run")
    k = 5  # more than the catalog
    manifest = export(run, tmp_path / "repo", ServingConfig(k=k), data_dir=data, check_sessions=5, log=lambda m: None)
    assert manifest["n_items"] == n_items
    assert any(len(set(s)) == n_items for s in edge_sessions(vocabulary_ids(load_inference_workflow(data)), 4))

    ensemble, predict, wf = build_ensemble(run, data, ServingConfig(k=k))
    everything = [f"i{i}" for i in range(n_items)]
    sessions = [everything, ["i0"]]
    ids, scores = reference_recommend(predict.model, wf, catalog_ids(data), sessions, k)
    assert ids.shape == scores.shape == (2, k)
    assert ids[0].tolist() == [""] * k and np.isneginf(scores[0]).all()  # no candidate left
    left = n_items - 1
    assert sorted(ids[1][:left]) == everything[1:] and ids[1][left:].tolist() == [""] * (k - left)
    assert np.isfinite(scores[1][:left]).all() and np.isneginf(scores[1][left:]).all()
    check_in_process(ensemble, predict, wf, sessions)  # the served graph pads the same slots
