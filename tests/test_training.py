"""`odmt train` / `odmt evaluate` on a tiny prepared DIR: fitting, RUN layout, resume, determinism."""

import json

import pytest
import torch

from odmt_t4r.model import OdmtRecommender, build_model, history_and_target
from odmt_t4r.training import command, evaluate
from odmt_t4r.training.selection import train_model
from odmt_t4r.training.data import PreparedData, pad_ragged
from odmt_t4r.training.metrics import hr_ndcg, target_ranks
from tests.synthetic import make_synthetic_prepared

FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 32, "eval_batch_size": 64,
        "modalities": ["id", "text"], "progress": False, "patience": 100}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared"), n_users=32, n_items=20, max_length=6,
                                   text_tokens=5, image_tokens=4, text_dim=24, image_dim=32, jump=0.05)


def cli(module, argv):
    """`odmt <the module's command> ARGV` through the CLI entry, which prints errors and sets exit codes."""
    from odmt_t4r import cli as entry

    name = next(n for n, (m, _) in entry.COMMANDS.items() if m == module.__name__)
    return entry.main([name, *(str(a) for a in argv)])


def test_pad_ragged_right_pads_and_keeps_the_tail():
    values, offsets = torch.tensor([3, 4, 5, 6, 7, 8, 9]), torch.tensor([0, 2, 7])
    assert pad_ragged(values, offsets, 4).tolist() == [[3, 4, 0, 0], [6, 7, 8, 9]]
    assert pad_ragged(values, offsets).tolist() == [[3, 4, 0, 0, 0], [5, 6, 7, 8, 9]]


def test_batches_follow_the_prepared_contract(data_dir):
    data = PreparedData(data_dir)
    assert data.item_column == "item_id-list" and data.max_length == 6
    batch = next(data.batches("valid", 8))
    assert batch["items"].shape == (8, 7) and batch["seen"].shape[0] == 8
    history, target = history_and_target(batch["items"])
    # valid: the seen items end with the history's newest item, and the target follows it
    for h, s in zip(history, batch["seen"]):
        h, s = h[h > 0].tolist(), s[s > 0].tolist()
        assert s[-len(h):] == h


def test_a_tiny_model_overfits_its_training_sequences(data_dir):
    torch.manual_seed(0)
    data = PreparedData(data_dir)
    model = build_model("odmt", data.info, d_model=32, n_heads=2, imt_layers=1, seq_layers=1, imt_dropout=0.0,
                        seq_dropout=0.0, modalities=["id", "text"], kd_ramp=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rows = torch.cat([b["items"] for b in data.batches("train", 256)])
    losses = []
    for step in range(60):
        model.train()
        loss = model(rows, progress=step / 60)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    history, target = history_and_target(rows)
    hr = hr_ndcg(target_ranks(model.score(history)["fused"], target), ks=(10,))["HR@10"]
    assert hr > 0.9


def test_train_then_evaluate_writes_the_run_folder(data_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST))
    run = tmp_path / "run"
    assert cli(command, ["--data", data_dir, "--model", "odmt", "--out", run, "--config", config,
                       "--epochs", 2, "--no-progress"]) == 0
    for name in ("config.json", "model.pt", "item_vectors.pt", "checkpoint.pt", "log.jsonl"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["manifest_sha256"] == PreparedData(data_dir).info.manifest_sha256
    assert saved["train"]["model"] == "odmt" and saved["model"]["modalities"] == ["id", "text"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"id", "text", "loss"} <= set(log[0]["losses"]) and "NDCG@10" in log[0]["valid"]
    assert "kd" not in log[0]["losses"]  # distillation is off by default: its term is not computed

    assert cli(evaluate, ["--run", run, "--split", "test", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics-test.json").read_text())
    for key in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "id/HR@10", "text/NDCG@20", "split", "protocol", "n_users"):
        assert key in metrics, key
    assert metrics["split"] == "test" and metrics["n_users"] == 32
    assert 0.0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= metrics["HR@20"] <= 1.0

    # the best model on valid, reloaded with one call, reproduces the logged valid metric
    model = OdmtRecommender.from_pretrained(run)
    valid = evaluate.evaluate_model(model, PreparedData(data_dir), "valid")
    best = max(r["valid"]["NDCG@10"] for r in log)
    fusion = json.loads((run / "fusion.json").read_text())
    assert valid["NDCG@10"] == pytest.approx(fusion["valid_NDCG@10"], abs=1e-6)
    assert valid["NDCG@10"] >= best - 1e-6  # the final, finer grid contains every epoch's grid
    assert model.config.fusion_weights == fusion["weights"] and saved["model"]["fusion_weights"] == fusion["weights"]

    # a second train into the same RUN without --resume is refused
    assert cli(command, ["--data", data_dir, "--out", run, "--config", config, "--epochs", 1]) == 2


def interrupted_then_resumed(cfg: dict, data_dir, out) -> dict:
    """Trains `cfg` into `out`, interrupted after log.jsonl got epoch 2 (before its checkpoint), then
    resumes it; returns the resumed run's summary."""
    def killed_after_logging_epoch_2(message):
        if "epoch   2/" in message:  # a candidate's lines carry its name first
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(cfg, data_dir, out, log=killed_after_logging_epoch_2)
    return train_model(cfg, data_dir, out, resume=True, log=lambda *_: None)


def test_resume_continues_exactly_where_an_interrupted_run_stopped(data_dir, tmp_path):
    cfg = dict(FAST, model="odmt", epochs=3)
    straight = train_model(cfg, data_dir, tmp_path / "a", log=lambda *_: None)
    assert interrupted_then_resumed(cfg, data_dir, tmp_path / "b") == straight

    def log(run):
        return [{k: r[k] for k in ("epoch", "losses", "kd_weight", "valid")}
                for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())]

    assert log("a") == log("b")  # same seed: identical epochs 1-2, and epoch 3 continues identically
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_written_before_the_house_was_tidied_still_loads_and_scores(data_dir, tmp_path):
    """RUNs from before this version: no manifest, settings since removed (item_to_item, lr_plateau,
    candidates on the TrainConfig) and the IMT under the name odmt: they load and score as before."""
    from odmt_t4r.model import OdmtRecommender
    from odmt_t4r.training.evaluate import evaluate_run

    run = tmp_path / "old"
    train_model(dict(FAST, epochs=1, model="odmt-imt"), data_dir, run, log=lambda *_: None)
    before = evaluate_run(run, data_dir, "valid")
    config = json.loads((run / "config.json").read_text())
    config["model"].update(item_to_item=0.0, name="odmt")
    config["train"].update(lr_plateau=0, lr_decay=0.3, candidates=None, candidate_jobs=0, model="odmt")
    (run / "config.json").write_text(json.dumps(config))
    (run / "manifest.json").unlink()  # older RUNs have none: trusted while no signing key is set
    model = OdmtRecommender.from_pretrained(run, data_dir=data_dir)
    assert model.config.item_tower == "imt"  # what it was trained as, whatever the preset is called now
    after = evaluate_run(run, data_dir, "valid")
    assert after["NDCG@10"] == pytest.approx(before["NDCG@10"]) and after["HR@20"] == pytest.approx(before["HR@20"])
