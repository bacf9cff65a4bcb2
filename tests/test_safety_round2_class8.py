"""Issue 20, class 8 ("silent surprises"), the last two: unknown item IDs in a request are counted and said,
and empty image cells among imaged items are counted and warned about by `odmt prepare`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odmt_t4r.cli import main
from tests.tiny_data import prepare_tiny, untrained_run

MAX_LENGTH = 4  # the tiny DIR keeps each session's last 4 items
UNKNOWN, MIXED, KNOWN = ["x", "y", "z"], ["i1", "q", "i2", "i3"], ["i1", "i2"]
LONG = ["q"] + ["i1", "i2", "i3"] * 2  # the unknown ID is older than the last 4 items the model reads


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("class8")
    data = prepare_tiny(root / "src", root / "dir", max_length=MAX_LENGTH, n_items=8)
    return untrained_run(data, root / "run")


@pytest.fixture(scope="module")
def served(run_dir, tmp_path_factory):
    """The RUN exported (fast transform) and served by a real Triton server."""
    from tests.triton_fixtures import triton_available
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    if not triton_available():
        pytest.fail("tritonserver is not installed: the served unknown-ID count cannot be tested")
    repo = tmp_path_factory.mktemp("class8") / "repo"
    export(run_dir, repo, ServingConfig(k=3), check_sessions=5, log=lambda msg: None)
    with TritonServer(repo, log_file=repo.parent / "triton.log") as server:
        yield server


def _raw_request(url: str, sessions, outputs: list[str] | None):
    """A plain tritonclient request, as a client that knows nothing of unknown_ids sends it."""
    import tritonclient.http as tc

    from triton_models.client import encode_sessions

    values, offsets = encode_sessions(sessions)
    inputs = [tc.InferInput("item_id-list__values", [1, len(values)], "BYTES"),
              tc.InferInput("item_id-list__offsets", [1, len(offsets)], "INT32")]
    inputs[0].set_data_from_numpy(values[None])
    inputs[1].set_data_from_numpy(offsets[None])
    client = tc.InferenceServerClient(url)
    try:
        wanted = None if outputs is None else [tc.InferRequestedOutput(n) for n in outputs]
        return client.infer("executor_model", inputs, outputs=wanted)
    finally:
        client.close()


# -- (a) unknown item IDs, served --------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_server_counts_each_sessions_item_ids_that_are_not_in_the_served_catalog(served, protocol):
    from triton_models.client import RecommenderClient

    sessions = [UNKNOWN, MIXED, KNOWN, LONG, ["日本語", "", "i1"]]
    url = served.http_url if protocol == "http" else served.grpc_url
    with RecommenderClient(url, protocol) as client:
        answers, unknown = client.recommend_with_unknown(sessions, k=3)
        assert unknown == [3, 1, 0, 1, 2]  # LONG: the whole request is counted, not only the last 4 items
        assert answers == client.recommend(sessions, k=3)  # asking for the count changes no answer
        explained, unknown_too = client.explain_with_unknown(sessions, k=3)
        assert unknown_too == unknown and [[(e.item_id, e.score) for e in row] for row in explained] == answers


def test_a_client_that_does_not_name_the_count_gets_exactly_what_it_asked_for(served):
    named = _raw_request(served.http_url, [UNKNOWN, KNOWN], ["item_ids", "scores"])
    assert {o["name"] for o in named.get_response()["outputs"]} == {"item_ids", "scores"}
    everything = _raw_request(served.http_url, [UNKNOWN, KNOWN], None)  # none named: all (Triton's rule)
    assert everything.as_numpy("unknown_ids").reshape(-1).tolist() == [3, 0]
    np.testing.assert_array_equal(everything.as_numpy("item_ids"), named.as_numpy("item_ids"))


def test_odmt_recommend_notes_unknown_ids_on_stderr(served, capsys):
    url = served.http_url
    assert main(["recommend", "--url", url, "--items", ",".join(UNKNOWN), "--k", "3"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "odmt recommend: note: session 1: 3 of 3 item IDs are not in the served catalog; none is known, so the "
        "answer is not personalised (any session of that many unknown IDs gets it)"]
    assert out.splitlines()[0].split() == ["rank", "item_id", "score"]  # stdout holds the answer only
    assert main(["recommend", "--url", url, "--items", ",".join(MIXED), "--k", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note: session 1: 1 of 4 item IDs are not in the served catalog" in err and "none is known" not in err
    assert len(json.loads(out)) == 3
    assert main(["recommend", "--url", url, "--items", ",".join(KNOWN), "--k", "3", "--explain"]) == 0
    assert "not in the served catalog" not in capsys.readouterr().err


def test_a_server_without_the_count_output_answers_as_before(tmp_path, capsys):
    """An older repository (the toy model declares item_ids and scores only): no count, no note, no error."""
    from tests.triton_fixtures import TOY_K, expected, triton_available, write_toy_repo
    from triton_models.client import RecommenderClient
    from triton_models.server import TritonServer

    if not triton_available():
        pytest.fail("tritonserver is not installed")
    with TritonServer(write_toy_repo(tmp_path / "toy")) as server:
        with RecommenderClient(server.http_url) as client:
            (answer,), unknown = client.recommend_with_unknown([["a", "b"]], k=TOY_K)
            assert unknown is None and answer == [(i, pytest.approx(s)) for i, s in expected(["a", "b"])]
        assert main(["recommend", "--url", server.http_url, "--items", "zz", "--k", str(TOY_K)]) == 0
        assert "not in the served catalog" not in capsys.readouterr().err


def test_a_version_whose_config_lacks_the_count_still_answers(run_dir, tmp_path):
    """add-items adds a version to a repository whose config.pbtxt predates the output: a request naming no
    outputs gets what the config declares (the executor sends only those; Triton 2.51 would also drop the
    rest, a stricter server might refuse them), and the client asks for no count."""
    from odmt_t4r.trust import write_manifest
    from triton_models.client import RecommenderClient
    from triton_models.export import ServingConfig, export
    from triton_models.server import TritonServer

    repo = tmp_path / "repo"
    manifest = export(run_dir, repo, ServingConfig(k=3), check_sessions=5, log=lambda msg: None)
    config = repo / "executor_model" / "config.pbtxt"
    text = config.read_text()
    start = text.index('output {\n  name: "unknown_ids"')
    config.write_text(text[:start] + text[text.index("}\n", text.index("dims", start)) + 2:])
    assert "unknown_ids" not in config.read_text()
    write_manifest(repo, {k: v for k, v in manifest.items() if k not in ("files", "signature")})
    with TritonServer(repo) as server:
        everything = _raw_request(server.http_url, [UNKNOWN, KNOWN], None)
        assert "unknown_ids" not in {o["name"] for o in everything.get_response()["outputs"]}
        assert everything.as_numpy("item_ids").shape == (1, 2, 3)
        with RecommenderClient(server.http_url) as client:
            assert client.recommend_with_unknown([UNKNOWN], k=3)[1] is None


# -- (a) in-process: the graph and the export's check -------------------------------------------------

@pytest.mark.parametrize("transform, long_count", [("fast", 1), ("workflow", 0)])
def test_the_in_process_graph_counts_like_the_server_and_the_check_compares_it(run_dir, transform, long_count):
    from merlin.table import TensorTable

    from triton_models.checks import check_in_process, edge_sessions
    from triton_models.client import encode_sessions
    from triton_models.graph import ServingConfig, build_ensemble

    ensemble, predict, workflow = build_ensemble(run_dir, cfg=ServingConfig(k=3, transform=transform))
    sessions = [UNKNOWN, MIXED, KNOWN, LONG, []]
    values, offsets = encode_sessions(sessions)
    out = ensemble.transform(TensorTable({"item_id-list__values": np.array([v.decode() for v in values], dtype=object),
                                          "item_id-list__offsets": offsets}))
    # the workflow transform counts among the last MAX_LENGTH items it keeps: LONG's unknown ID is cut
    assert out["unknown_ids"].values.reshape(-1).tolist() == [3, 1, 0, long_count, 0]
    served = [i.decode() for i in predict.item_ids]
    check = check_in_process(ensemble, predict, workflow, sessions + edge_sessions(served, MAX_LENGTH))
    assert check["unknown_ids_checked"] == len(sessions) + len(edge_sessions(served, MAX_LENGTH))


def test_the_export_check_refuses_a_graph_that_miscounts_unknown_ids(run_dir, monkeypatch):
    from triton_models.checks import ServingCheckError, check_in_process
    from triton_models.graph import ServingConfig, build_ensemble
    from triton_models.vocab_lookup import VocabularyLookup

    ensemble, predict, workflow = build_ensemble(run_dir, cfg=ServingConfig(k=3))
    monkeypatch.setattr(VocabularyLookup, "unknown_counts",
                        staticmethod(lambda codes, offsets: np.zeros((len(offsets) - 1, 1), dtype=np.int32)))
    with pytest.raises(ServingCheckError, match="unknown IDs in session 0"):
        check_in_process(ensemble, predict, workflow, [UNKNOWN, KNOWN])


# -- (b) empty image cells in odmt prepare -------------------------------------------------------------

def _photo_catalog(folder: Path, images: list[str | None]) -> list[str]:
    """A tiny csv source whose items.csv has an image column (`images`, one per item; None = empty cell)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(images):
        if name:
            Image.new("RGB", (8, 8), (30 * k, 60, 90)).save(folder / name)
    n = len(images)
    rows = [(f"u{u}", f"i{(u + s) % n}", 1_700_000_000 + s) for u in range(8) for s in range(5)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "text": [f"product {k}" for k in range(n)],
                  "image": images}).to_csv(folder / "items.csv", index=False)
    return ["prepare", "--source", "csv", "--interactions", str(folder / "inter.csv"),
            "--items", str(folder / "items.csv"), "--no-features", "--out", str(folder / "dir")]


def test_prepare_counts_and_warns_about_an_empty_image_cell_among_imaged_items(tmp_path, capsys):
    args = _photo_catalog(tmp_path / "one_empty", ["p0.png", "p1.png", None, "p3.png", "p4.png", "p5.png"])
    assert main(args) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "empty image cell" in line]
    assert warned == [f"warning: {tmp_path / 'one_empty' / 'items.csv'}: 1 of 6 items have an empty image cell; "
                      "they get a zero image feature (sample: ['i2'])"]
    notes = json.loads((tmp_path / "one_empty" / "dir" / "manifest.json").read_text())["notes"]
    assert notes["empty_image_cells"] == 1 and notes["empty_image_cell_sample"] == ["i2"]


@pytest.mark.parametrize("images", [[f"p{k}.png" for k in range(6)], [None] * 6], ids=["all imaged", "no image"])
def test_prepare_says_nothing_when_no_item_or_every_item_has_an_image(tmp_path, capsys, images):
    assert main(_photo_catalog(tmp_path / "src", images)) == 0
    assert "empty image cell" not in capsys.readouterr().err
    notes = json.loads((tmp_path / "src" / "dir" / "manifest.json").read_text())["notes"]
    assert "empty_image_cells" not in notes


def test_the_feature_manifest_counts_empty_image_cells_next_to_undecodable_ones(tmp_path, monkeypatch):
    from odmt_t4r.features import IMAGE_ENCODERS, TEXT_ENCODERS, FeatureConfig, build_item_features
    from tests.test_features import N_INDEX, ToyImage, ToyText, write_catalog

    monkeypatch.setitem(TEXT_ENCODERS, "toy-text", lambda cfg: ToyText())
    monkeypatch.setitem(IMAGE_ENCODERS, "toy-image", lambda cfg: ToyImage())
    config = FeatureConfig(text_encoder="toy-text", image_encoder="toy-image", progress=False)
    items = write_catalog(tmp_path / "images")  # 5 items: one empty image cell, one broken file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = build_item_features(items, N_INDEX, tmp_path / "out", config, cache_dir=tmp_path / "cache")
    assert manifest["fallbacks"] == {"image_unreadable": 1, "image_empty": 1}
    no_images = items.assign(image=None)
    manifest = build_item_features(no_images, N_INDEX, tmp_path / "out2", config, cache_dir=tmp_path / "cache")
    assert manifest["fallbacks"] == {"image_unreadable": 0, "image_empty": 0}
