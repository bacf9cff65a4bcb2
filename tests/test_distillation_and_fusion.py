"""Issue 8: distillation variants, fusion chosen on validation, the in-batch logQ correction, the
popularity prior, early stopping that waits for every branch, the long-tail slice and coverage, and
the model config as one dataclass behind `odmt train`'s flags."""

import argparse
import json
import math

import pytest
import torch

from odmt_t4r.model import OdmtConfig, PeerDistillationTask, build_model, split_targets, teacher_map
from odmt_t4r.model.peer_distillation import detached_kl, fuse, kd_ramp, soft_cross_entropy
from odmt_t4r.training import evaluate, train
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.fusion import choose_fusion, evaluate_fusions, fusion_candidates, simplex_grid
from odmt_t4r.training.metrics import RankingAccumulator
from tests.synthetic import make_synthetic_prepared

SMALL = dict(d_model=16, n_heads=2, imt_layers=1, seq_layers=1)
FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 32, "eval_batch_size": 64,
        "modalities": ["id", "text"], "progress": False}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared"), n_users=32, n_items=20, max_length=6,
                                   text_tokens=5, image_tokens=4, text_dim=24, image_dim=32, jump=0.05)


def rows():
    return torch.tensor([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 0, 0, 0, 0], [20, 21, 0, 0, 0, 0, 0]])


# ---------------------------------------------------------------- distillation variants
def test_detached_kd_is_a_kl_that_sends_no_gradient_to_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(5, 9, requires_grad=True)
    teacher = torch.randn(5, 9, requires_grad=True)
    loss = detached_kl(student, teacher, tau=0.5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    p, q = torch.softmax(teacher / 0.5, -1), torch.log_softmax(student / 0.5, -1)
    by_hand = 0.25 * (p * (p.log() - q)).sum(-1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert detached_kl(teacher, teacher, 0.5).item() == pytest.approx(0.0, abs=1e-6)  # KL of equals is 0


@pytest.mark.parametrize("id_teacher, expected", [
    ("ensemble", {"id": "ensemble", "text": "id", "image": "id"}),
    ("none", {"text": "id", "image": "id"}),
])
def test_the_id_branchs_teacher_is_a_choice(id_teacher, expected):
    assert teacher_map(["id", "text", "image"], id_teacher) == expected


def test_the_ensemble_teacher_is_the_mean_of_every_branch():
    task = PeerDistillationTask(["id", "text", "image"], id_teacher="ensemble")
    logits = {"id": torch.full((1, 4), 9.0), "text": torch.ones(1, 4), "image": torch.full((1, 4), 3.0)}
    assert torch.equal(task.teacher_logits(logits, "ensemble"), torch.full((1, 4), 13.0 / 3))
    assert torch.equal(task.teacher_logits(logits, "text"), logits["text"])


@pytest.mark.parametrize("mode, teacher_grad", [("mutual", True), ("detached", False)])
def test_kd_mode_decides_whether_the_id_teacher_learns_from_its_students(data_dir, mode, teacher_grad):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, modalities=["id", "text"], kd_mode=mode, id_teacher="none", kd_weight=0.5,
                        **SMALL)
    out = model(rows(), progress=1.0)
    model.zero_grad()
    out["losses"]["kd"].backward()  # only text <- id: any gradient in the id branch came through its teacher role
    id_grad = sum(p.grad.abs().sum() for p in model.branches["id"].parameters() if p.grad is not None)
    assert (float(id_grad) > 0) == teacher_grad


def test_kd_mask_removes_the_users_own_items_from_the_distilled_distributions():
    torch.manual_seed(0)
    states = {"id": torch.randn(2, 4), "text": torch.randn(2, 4)}
    cands = {"id": torch.randn(5, 4), "text": torch.randn(5, 4)}
    y = torch.tensor([0, 1])
    seen = torch.zeros(2, 5, dtype=torch.bool)
    seen[:, 3] = True  # item 3 is both users' own other item

    def kd(mask_seen, bump):
        c = {b: v.clone() for b, v in cands.items()}
        c["id"][3] += bump  # move a seen item's teacher score only
        task = PeerDistillationTask(["id", "text"], kd_mask_seen=mask_seen, kd_weight=1.0)
        return task(states, c, y, progress=1.0, seen=seen)["losses"]["kd"].item()

    assert kd(True, 0.0) == pytest.approx(kd(True, 3.0), rel=1e-6)  # masked: the seen item plays no part
    assert kd(False, 0.0) != pytest.approx(kd(False, 3.0), rel=1e-3)


def test_tau_scales_the_kd_as_written():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    for tau in (0.3, 1.0, 2.0):
        p = torch.softmax(t / tau, -1)
        assert soft_cross_entropy(s, t, tau).item() == pytest.approx(
            (tau ** 2 * -(p * torch.log_softmax(s / tau, -1)).sum(-1).mean()).item(), rel=1e-6)


def test_the_kd_ramp_is_a_fraction_of_the_epoch_budget(data_dir, tmp_path):
    cfg = train.TrainConfig.from_dict(dict(FAST, epochs=4, kd_ramp=0.5, kd_weight=0.8, patience=100))
    train.train_run(cfg, data_dir, tmp_path / "run", log=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # epoch e (0-based) of 4 is progress e/4; the ramp reaches its top at half the budget
    expected = [0.8 * math.exp(-5 * (1 - min(e / 4, 0.5) / 0.5) ** 2) for e in range(4)]
    assert [r["kd_weight"] for r in log] == pytest.approx(expected)
    assert log[2]["kd_weight"] == pytest.approx(0.8) and log[0]["kd_weight"] < 0.01
    assert kd_ramp(0.25, 0.5) == pytest.approx(math.exp(-1.25))


# ---------------------------------------------------------------- fusion
def test_fuse_weights_raw_or_log_softmax_scores():
    a, b = torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[10.0, 0.0, 0.0]])
    assert torch.equal(fuse({"id": a, "text": b}), (a + b) / 2)
    assert torch.allclose(fuse({"id": a, "text": b}, {"id": 0.7, "text": 0.3}), 0.7 * a + 0.3 * b)
    expected = 0.5 * torch.log_softmax(a, -1) + 0.5 * torch.log_softmax(b, -1)
    assert torch.allclose(fuse({"id": a, "text": b}, {"id": 0.5, "text": 0.5}, "log_softmax"), expected)
    assert torch.equal(fuse({"id": a, "text": b}, {"id": 1.0, "text": 0.0}), a)  # a zero weight drops a branch
    with pytest.raises(ValueError):
        fuse({"id": a}, {"id": 0.0})


def test_the_candidates_include_the_mean_and_every_single_branch():
    assert len(simplex_grid(3, 0.1)) == 66 and all(abs(sum(w) - 1) < 1e-9 for w in simplex_grid(3, 0.1))
    names = [c.name for c in fusion_candidates(["id", "text", "image"], 0.5)]
    assert names[0] == "mean" and {"id", "text", "image"} <= set(names)
    assert len(names) == len(set(names))  # a single branch is listed once, not once per score kind


def test_the_chosen_fusion_is_never_below_a_single_branch_on_validation(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL).eval()
    data = PreparedData(data_dir)
    results = evaluate_fusions(model, data, "valid", step=0.25)
    choice = choose_fusion(results)
    assert all(choice["valid_NDCG@10"] >= results[b]["NDCG@10"] for b in ("id", "text", "image", "mean"))
    # the fast grid scoring agrees with the model's own fused scores once the choice is set
    model.set_fusion(choice["weights"], choice["scores"])
    assert evaluate.evaluate_model(model, data, "valid")["NDCG@10"] == pytest.approx(choice["valid_NDCG@10"], abs=1e-6)


def test_a_set_fusion_is_saved_and_reloaded(data_dir, tmp_path):
    from odmt_t4r.model import OdmtRecommender

    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL).eval()
    model.set_fusion({"id": 0.8, "image": 0.2}, "log_softmax")
    history, _ = split_targets(rows())
    expected = model.score(history)
    model.save_pretrained(tmp_path / "m", extra={"data": {"dir": str(data_dir)}})
    loaded = OdmtRecommender.from_pretrained(tmp_path / "m")
    assert loaded.config.fusion_weights == {"id": 0.8, "image": 0.2} and loaded.config.fusion_scores == "log_softmax"
    got = loaded.score(history)
    assert torch.equal(got["fused"], expected["fused"])
    by_hand = 0.8 * torch.log_softmax(got["id"], -1) + 0.2 * torch.log_softmax(got["image"], -1)
    assert torch.allclose(got["fused"][:, 3:], by_hand[:, 3:], atol=1e-5)
    assert torch.allclose(got["mean"][:, 3:], torch.stack([got[b][:, 3:] for b in ("id", "text", "image")]).mean(0))
    with pytest.raises(ValueError):
        model.set_fusion({"nope": 1.0})


# ---------------------------------------------------------------- losses and the popularity prior
def test_in_batch_log_q_is_the_chance_of_being_a_candidate(data_dir):
    model = build_model("sasrec", data_dir, loss="in_batch", **SMALL)
    counts = torch.zeros(model.config.n_index)
    counts[3], counts[4], counts[5] = 1000.0, 10.0, 1.0
    model.set_popularity(counts)
    q = counts / counts.sum()
    got = model.in_batch_log_q(torch.tensor([3, 4, 5]), n_targets=200).exp()
    assert torch.allclose(got, 1 - (1 - q[[3, 4, 5]]) ** 200, rtol=1e-4)
    assert got[0] == pytest.approx(1.0, abs=1e-6)  # a popular item saturates: no over-penalty
    assert got[2] == pytest.approx(200 * q[5].item(), rel=0.2)  # a rare one is ~P*q, as plain logQ


def test_the_popularity_prior_is_a_learned_per_branch_weight_on_log_counts(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL)
    assert model.popularity_weight is not None and model.popularity_weight.shape == (3,)
    out = model(rows())
    out["loss"].backward()
    assert model.popularity_weight.grad.abs().sum() > 0
    model.eval()
    history, _ = split_targets(rows())
    with torch.no_grad():
        before = model.score(history)["id"][:, 3:].clone()
        model.popularity_weight[0] += 1.0
        after = model.score(history)["id"][:, 3:]
    assert torch.allclose(after - before, torch.log1p(model.train_count[3:]).expand_as(before), atol=1e-5)
    assert build_model("sasrec", data_dir, **SMALL).popularity_weight is None  # the baseline keeps its form


# ---------------------------------------------------------------- early stopping
def test_early_stopping_follows_the_fused_score_and_the_grid_runs_every_fusion_every_epochs(data_dir, tmp_path):
    cfg = train.TrainConfig.from_dict(dict(FAST, epochs=12, patience=2, lr=3e-3, fusion_every=3, stop_on="fused"))
    summary = train.train_run(cfg, data_dir, tmp_path / "run", log=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    bad = 0
    for i, r in enumerate(log):
        bad = 0 if r["improved"] else bad + 1
        assert r["improved"] == (r["valid"]["NDCG@10"] > max([x["valid"]["NDCG@10"] for x in log[:i]], default=-1))
        if i + 1 < len(log):  # a run that went on had a better fused score within the last `patience` epochs
            assert bad < 2
        assert r["fusion_grid"] == (i == 0 or (i + 1) % 3 == 0)  # the grid after epoch 1 and every 3rd
        if not r["fusion_grid"]:  # in between: the mean, the branches and the last grid's choice only
            grid_choice = [x for x in log[:i] if x["fusion_grid"]][-1]["fusion"]
            assert r["fusion"] in ("mean", grid_choice, "id", "text")
    assert summary["stopped"] == (bad >= 2)
    best = max(log, key=lambda r: r["valid"]["NDCG@10"])
    assert summary["best_epoch"] == best["epoch"]


# ---------------------------------------------------------------- long tail and coverage

def test_early_stopping_on_any_branch_goes_on_while_a_branch_still_improves(data_dir, tmp_path):
    cfg = train.TrainConfig.from_dict(dict(FAST, epochs=12, patience=2, lr=3e-3, stop_on="any"))
    summary = train.train_run(cfg, data_dir, tmp_path / "run", log=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    bad, best = 0, {}
    for i, r in enumerate(log):
        scores = {b: r["valid"][f"{b}/NDCG@10"] for b in ("id", "text")}
        # a branch counts as improved when it beats its own best so far
        assert sorted(r["branches_improved"]) == sorted(b for b, v in scores.items() if v > best.get(b, -1))
        best.update({b: max(v, best.get(b, -1)) for b, v in scores.items()})
        bad = 0 if r["improved"] or r["branches_improved"] else bad + 1
        if i + 1 < len(log):
            assert bad < 2
    assert summary["stopped"] == (bad >= 2)
    with pytest.raises(ValueError, match="stop_on='branch'"):
        train.TrainConfig.from_dict({"stop_on": "branch"}).validate()

def test_long_tail_slice_and_coverage_by_hand():
    acc = RankingAccumulator(ks=(2,), n_index=8, coverage_k=2)
    scores = torch.tensor([[0, 0, 0, 5.0, 4.0, 3.0, 2.0, 1.0],
                           [0, 0, 0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    acc.update({"fused": scores}, targets=torch.tensor([4, 3]), exclude=None, tail=torch.tensor([False, True]))
    m = acc.compute()
    assert m["HR@2"] == 0.5 and m["longtail/HR@2"] == 0.0 and m["longtail_users"] == 1
    assert m["coverage@2"] == pytest.approx(4 / 5)  # items 3, 4, 7, 6 of 5 catalog items


def test_evaluate_reports_each_branch_the_mean_the_chosen_fusion_the_slice_and_coverage(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL).eval()
    model.set_fusion({"id": 1.0}, "raw")
    m = evaluate.evaluate_model(model, PreparedData(data_dir), "test")
    for key in ("NDCG@10", "mean/NDCG@10", "id/NDCG@10", "text/NDCG@10", "image/NDCG@10", "coverage@10",
                "id/coverage@10", "longtail_users", "longtail_rule"):
        assert key in m, key
    assert m["NDCG@10"] == m["id/NDCG@10"]
    assert 0 < m["longtail_users"] <= m["n_users"]
    assert 0 < m["coverage@10"] <= 1


# ---------------------------------------------------------------- one model config, flags from it
def test_train_config_holds_the_model_config_and_checks_types():
    cfg = train.TrainConfig.from_dict({"lr": 1, "d_model": 32, "model_config": {"kd_mode": "mutual"}})
    assert isinstance(cfg.model_config, OdmtConfig) and cfg.lr == 1.0
    assert cfg.model_config.d_model == 32 and cfg.model_config.kd_mode == "mutual"
    for bad in ({"d_modle": 3}, {"d_model": "64"}, {"popularity_prior": "yes"}, {"epochs": 2.5}, []):
        with pytest.raises(ValueError):
            train.TrainConfig.from_dict(bad)


def test_every_model_field_is_an_odmt_train_flag():
    from odmt_t4r.training import command
    from odmt_t4r.training.selection import SelectionConfig

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    for f in OdmtConfig.__dataclass_fields__:
        if f not in OdmtConfig.DERIVED:
            assert f in flags, f
    for f in [*train.TrainConfig.__dataclass_fields__, *SelectionConfig.__dataclass_fields__]:
        if f not in (*command.TRAIN_FLAGS_SKIP, "name"):
            assert f in flags, f
    args = parser.parse_args(["--data", "d", "--out", "o", "--kd-mode", "mutual", "--no-popularity-prior",
                              "--modalities", "id", "text", "--tau", "0.3", "--lr", "0.002", "--kd-mask-seen"])
    cfg = train.TrainConfig.from_dict(command.settings_from_args(args))
    m = cfg.model_config
    assert (m.kd_mode, m.popularity_prior, m.modalities, m.tau, m.kd_mask_seen) == ("mutual", False, ["id", "text"], 0.3, True)
    assert cfg.lr == 0.002
