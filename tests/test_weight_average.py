"""TrainConfig.average_epochs: the moving average of the weights is what is evaluated, saved and resumed."""

import json

import pytest
import torch

from odmt_t4r.model import OdmtRecommender
from odmt_t4r.training import train
from odmt_t4r.training.averaging import WeightAverage
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.evaluate import evaluate_model
from tests.test_training import FAST, data_dir, interrupted_then_resumed  # noqa: F401 (data_dir: the tiny prepared DIR fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_average_follows_the_exponential_rule_and_applied_restores_the_raw_weights():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(20):  # past the warm-up (decay min(0.5, (1+t)/(10+t))): the plain 0.5 rule
        average.update(model)
    raw = model.weight.detach().clone()
    # after n updates toward a fixed target, the gap shrinks by the product of the decays
    gap = 1.0
    for t in range(1, 21):
        gap *= min(0.5, (1.0 + t) / (10.0 + t))
    assert torch.allclose(average.shadow["weight"], raw - gap * (raw - start))
    with average.applied(model):
        assert torch.allclose(model.weight, average.shadow["weight"])
    assert torch.equal(model.weight, raw)


def test_over_epochs_sets_the_horizon_in_steps():
    model = torch.nn.Linear(2, 2)
    assert WeightAverage.over_epochs(model, 2.0, 50).decay == pytest.approx(1 - 1 / 100)
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)
    with pytest.raises(ValueError, match="average_epochs"):
        train.TrainConfig.from_dict({"average_epochs": -1.0}).validate()


def test_the_saved_model_holds_the_averaged_weights_and_resume_is_exact(data_dir, tmp_path):
    cfg = dict(FAST, model="odmt", epochs=3, average_epochs=1.0)
    straight = train.train_run(train.TrainConfig.from_dict(cfg), data_dir, tmp_path / "a", log=lambda *_: None)
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    shadow, raw = ckpt["average"]["shadow"], ckpt["model"]
    assert ckpt["average"]["steps"] == 3 * PreparedData(data_dir).num_batches("train", FAST["batch_size"])
    assert any(not torch.equal(shadow[k], raw[k]) for k in shadow)  # the average is not the last step
    saved = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    if straight["best_epoch"] == 3:  # the best epoch's model is the average at that epoch
        assert all(torch.equal(saved[k], shadow[k]) for k in shadow)
    # the saved model reproduces the validation score that chose it
    model = OdmtRecommender.from_pretrained(tmp_path / "a")
    valid = evaluate_model(model, PreparedData(data_dir), "valid")
    assert valid["NDCG@10"] == pytest.approx(straight["fusion"]["valid_NDCG@10"], abs=1e-6)

    assert interrupted_then_resumed(cfg, data_dir, tmp_path / "b") == straight
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["average"]["shadow"]
    assert all(torch.equal(shadow[k], b[k]) for k in shadow)

    # resume follows the RUN's saved config; one edited to average a run trained without it is refused
    plain = dict(cfg, average_epochs=0.0, epochs=1)
    train.train_run(train.TrainConfig.from_dict(plain), data_dir, tmp_path / "c", log=lambda *_: None)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["train"]["average_epochs"] = 1.0
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without weight averaging"):
        train.train_run(train.TrainConfig.from_dict(plain), data_dir, tmp_path / "c", resume=True, epochs=2,
                        log=lambda *_: None)


def test_average_select_keeps_whichever_of_the_raw_and_averaged_weights_scores_better(data_dir, tmp_path):
    def valid_log(**extra):
        cfg = {**FAST, "model": "odmt", "epochs": 4, **extra}
        out = tmp_path / ("-".join(f"{k}{v}" for k, v in extra.items()) or "raw")
        summary = train.train_run(train.TrainConfig.from_dict(cfg), data_dir, out, log=lambda *_: None)
        return summary, out, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    _, _, raw = valid_log()
    _, _, averaged = valid_log(average_epochs=0.5)
    summary, out, both = valid_log(average_epochs=0.5, average_select=True)
    # averaging never changes the optimizer's path: the selecting run scores both runs' weights each epoch
    for r, a, b in zip(raw, averaged, both):
        better = "average" if a["valid"]["NDCG@10"] > r["valid"]["NDCG@10"] else "raw"
        assert b["weights"] == better and b["valid"]["NDCG@10"] == max(r["valid"]["NDCG@10"], a["valid"]["NDCG@10"])
    assert {r["weights"] for r in raw} == {"raw"} and {a["weights"] for a in averaged} == {"average"}
    # the saved model is the kept epoch's kept weights
    saved = evaluate_model(OdmtRecommender.from_pretrained(out, data_dir=data_dir), PreparedData(data_dir), "valid")
    assert saved["NDCG@10"] == pytest.approx(summary["fusion"]["valid_NDCG@10"])
    assert summary["best"]["NDCG@10"] == pytest.approx(max(b["valid"]["NDCG@10"] for b in both))
    # early stopping follows the better of the two scores: with patience 1 the selecting run ends at the first
    # epoch whose best view is no better than every earlier epoch's
    _, _, short = valid_log(patience=1, epochs=10, seed=2, average_epochs=0.5, average_select=True, stop_on="fused")
    scores = [b["valid"]["NDCG@10"] for b in short]
    assert [b["improved"] for b in short] == [i == 0 or s > max(scores[:i]) for i, s in enumerate(scores)]
    stale = [i for i, b in enumerate(short) if not b["improved"]]
    assert len(short) == (stale[0] + 1 if stale else 10)
    with pytest.raises(ValueError, match="average_select needs average_epochs"):
        train.TrainConfig.from_dict({"average_select": True}).validate()
