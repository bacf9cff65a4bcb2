"""The ODMT model: IMT masks, branch subsets, peer distillation, the baselines, save/load."""

import itertools
import math

import pytest
import torch

from odmt_t4r.model import (
    IdAwareMultiModalTransformer,
    ItemTowerConfig,
    ModalityStore,
    OdmtRecommender,
    PeerDistillationTask,
    build_model,
    clip_history,
    kd_ramp,
    model_registry,
    soft_cross_entropy,
    split_targets,
    teacher_map,
)
from tests.synthetic import make_synthetic_prepared

SMALL = dict(d_model=16, n_heads=2, imt_layers=1, seq_layers=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared"), n_users=24, n_items=20, max_length=6,
                                   text_tokens=5, image_tokens=4, text_dim=24, image_dim=32)


@pytest.fixture(scope="module")
def store(data_dir):
    return ModalityStore.load(data_dir / "features")


def batch_rows():
    # right-padded rows ending with their target (the prepared-DIR contract), L + 1 = 7
    return torch.tensor([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 0, 0, 0, 0], [20, 21, 0, 0, 0, 0, 0]])


def imt(store, **kw):
    torch.manual_seed(0)
    tower = IdAwareMultiModalTransformer(ItemTowerConfig(d_model=16, n_layers=2, n_heads=2, dropout=0.0, **kw),
                                         store.n_index, ["id", "text", "image"],
                                         {"text": store.dim("text"), "image": store.dim("image")}, store)
    return tower.eval()


# ---------------------------------------------------------------- item tower
def test_imt_outputs_one_vector_per_modality(store):
    out = imt(store)(torch.tensor([3, 4, 5, 0]))
    assert set(out) == {"id", "text", "image"}
    assert all(v.shape == (4, 16) for v in out.values())
    assert all(torch.isfinite(v).all() for v in out.values())  # reserved row 0 (no content) included


def test_content_vectors_cannot_see_the_id_token(store):
    tower = imt(store)
    items = torch.tensor([3, 7, 11])
    before = tower(items)
    with torch.no_grad():
        tower.id_embedding.weight[7] += 5.0
    after = tower(items)
    assert torch.equal(before["text"], after["text"]) and torch.equal(before["image"], after["image"])
    assert not torch.allclose(before["id"][1], after["id"][1])  # the ID token itself did change
    assert torch.equal(before["id"][0], after["id"][0])  # other items untouched


def test_padded_text_tokens_are_ignored(store):
    tower = imt(store)
    mask = store._torch["text_mask"]
    item = int(torch.nonzero(~mask[3:].all(1))[0]) + 3  # an item with padded text tokens
    before = tower(torch.tensor([item]))
    store._torch["text"][item, ~mask[item]] = 7.0  # garbage where the mask says "padding"
    try:
        after = tower(torch.tensor([item]))
    finally:
        store._torch["text"][item, ~mask[item]] = 0.0
    for m in before:
        assert torch.allclose(before[m], after[m], atol=1e-6)


def test_length_buckets_give_the_same_vectors(store):
    tower = imt(store)
    items = torch.arange(3, store.n_index)
    tower.bucket_size = 10_000  # one group, padded to the longest text
    whole = tower(items)
    tower.bucket_size = 4  # groups of similar text length, each cut to its own longest text
    bucketed = tower(items)
    for m in whole:
        assert torch.allclose(whole[m], bucketed[m], atol=1e-5)


def test_content_id_init_is_mean_of_projected_cls(store):
    tower = imt(store)
    tower.init_id_from_content()
    f = store.lookup(torch.tensor([5]))
    expected = (tower.proj["text"](f["text"][:, 0]) + tower.proj["image"](f["image"][:, 0])) / 2
    assert torch.allclose(tower.id_embedding.weight[5], expected[0], atol=1e-6)
    assert tower.id_embedding.weight[:3].abs().sum() == 0


# ---------------------------------------------------------------- distillation
def test_kd_ramp_values():
    assert kd_ramp(0, 5) == pytest.approx(math.exp(-5))
    assert kd_ramp(2.5, 5) == pytest.approx(math.exp(-1.25))
    assert kd_ramp(5, 5) == 1.0 and kd_ramp(12, 5) == 1.0
    assert kd_ramp(0, 0) == 1.0
    assert [kd_ramp(e, 5) for e in range(6)] == sorted(kd_ramp(e, 5) for e in range(6))


def test_teacher_map_generalises_to_any_branch_set():
    assert teacher_map(["id", "text", "image"]) == {"id": "ensemble", "text": "id", "image": "id"}
    assert teacher_map(["id", "text"]) == {"id": "ensemble", "text": "id"}
    assert teacher_map(["text", "image"]) == {"text": "ensemble", "image": "ensemble"}
    assert teacher_map(["id"]) == {}
    assert PeerDistillationTask(["id"]).weight(7) == 0.0  # a lone branch has no peer
    assert PeerDistillationTask(["id", "text"], kd_weight=0.5).weight(7) == 0.5


def test_soft_cross_entropy_sends_gradients_to_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(5, 9, requires_grad=True)
    teacher = torch.randn(5, 9, requires_grad=True)
    loss = soft_cross_entropy(student, teacher, tau=0.4)
    loss.backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0  # not detached: mutual learning
    assert student.grad.abs().sum() > 0
    # tau^2 * CE(softmax(T/tau), log_softmax(S/tau)) by hand
    p = torch.softmax(teacher / 0.4, -1)
    by_hand = 0.16 * -(p * torch.log_softmax(student / 0.4, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_mutual_kd_from_the_text_branch_reaches_the_id_teacher(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, modalities=["id", "text"], kd_mode="mutual", id_teacher="none",
                        kd_weight=0.5, **SMALL)
    out = model(batch_rows(), progress=1.0)
    model.zero_grad()
    out["losses"]["kd"].backward()
    id_grad = sum(p.grad.abs().sum() for p in model.branches["id"].parameters() if p.grad is not None)
    text_grad = sum(p.grad.abs().sum() for p in model.branches["text"].parameters() if p.grad is not None)
    assert id_grad > 0 and text_grad > 0


def test_kd_off_computes_no_kd_term(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL)  # kd_weight 0, the default
    out = model(batch_rows(), progress=1.0)
    assert "kd" not in out["losses"] and out["kd_weight"] == 0.0
    assert out["loss"].item() == pytest.approx(sum(out["losses"][b] for b in ("id", "text", "image")).item())


def test_total_loss_is_branch_ces_plus_weighted_kd(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, kd_weight=0.5, **SMALL).eval()  # eval: no dropout, so calls agree
    out = model(batch_rows(), progress=0.05)
    w = model.config.kd_weight * kd_ramp(0.05, model.config.kd_ramp)
    assert out["kd_weight"] == pytest.approx(w)
    ces = sum(out["losses"][b] for b in ("id", "text", "image"))
    assert out["loss"].item() == pytest.approx((ces + w * out["losses"]["kd"]).item(), rel=1e-5)


# ---------------------------------------------------------------- whole model
def subsets():
    mods = ["id", "text", "image"]
    return [list(c) for r in (1, 2, 3) for c in itertools.combinations(mods, r)]


@pytest.mark.parametrize("modalities", subsets(), ids=lambda m: "+".join(m))
def test_every_branch_subset_trains_and_scores(data_dir, modalities):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, modalities=modalities, kd_weight=0.5, **SMALL)
    assert model.branch_names == modalities
    out = model(batch_rows())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert ("kd" in out["losses"]) == (len(modalities) > 1)
    model.eval()
    history, _ = split_targets(batch_rows())
    scores = model.score(history)
    assert set(scores) == {*modalities, "fused"}
    n_index = model.config.n_index
    assert all(s.shape == (3, n_index) for s in scores.values())
    assert torch.isinf(scores["fused"][:, :3]).all()
    assert torch.allclose(scores["fused"][:, 3:], torch.stack([scores[b][:, 3:] for b in modalities]).mean(0))


@pytest.mark.parametrize("name", sorted(model_registry))
def test_registry_models_build_and_train(data_dir, name):
    torch.manual_seed(0)
    model = build_model(name, data_dir, **SMALL)
    expected = {"sasrec": ["id"], "late-fusion": ["late"]}.get(name, ["id", "text", "image"])
    assert model.branch_names == expected
    out = model(batch_rows(), progress=0.5)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    if name in ("odmt", "odmt-imt", "late-fusion", "sasrec"):  # distillation is off by default
        assert out["loss"].item() == pytest.approx(sum(v.item() for k, v in out["losses"].items() if k != "kd"),
                                                   rel=1e-6)


@pytest.mark.parametrize("options", [dict(loss="in_batch"), dict(seq_encoder="xlnet")], ids=["in_batch", "xlnet"])
def test_options_train(data_dir, options):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL, **options)
    out = model(batch_rows())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_in_batch_softmax_masks_the_users_other_items(data_dir):
    torch.manual_seed(0)
    model = build_model("sasrec", data_dir, loss="in_batch", **SMALL).eval()
    seen = {}
    original = model.task.logits

    def spy(*args, **kwargs):
        seen["mask"] = kwargs["mask"]
        return original(*args, **kwargs)

    model.task.logits = spy
    rows = batch_rows()
    model(rows)
    mask = seen["mask"]  # [P C]; candidates = unique targets in the batch
    _, targets = split_targets(rows)
    cand = torch.unique(targets[targets >= 3])
    y = torch.searchsorted(cand, targets[targets >= 3])
    assert not mask[torch.arange(len(y)), y].any()  # the true target is never masked
    # position 0 of row 0 (target 4): the row's other items 5..9 are masked, row 1's items are not
    row0 = mask[0]
    assert row0[torch.isin(cand, torch.tensor([5, 6, 7, 8, 9]))].all()
    assert not row0[torch.isin(cand, torch.tensor([11, 12, 21]))].any()


def test_scores_are_causal_and_ignore_padding(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL).eval()
    short = torch.tensor([[3, 4, 5, 0, 0, 0]])
    longer_row = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0, 0]])  # more padding
    assert torch.allclose(model.score(short)["fused"][:, 3:], model.score(longer_row)["fused"][:, 3:], atol=1e-5)
    assert clip_history(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0]]), 6).tolist() == [[3, 4, 5, 6, 7, 8]]


def test_recommend_excludes_the_history(data_dir):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL).eval()
    history = torch.tensor([[3, 4, 5, 6, 0, 0]])
    scores, items = model.recommend(history, k=10)
    assert items.shape == (1, 10)
    assert not set(items[0].tolist()) & {0, 1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("with_features", [True, False], ids=["with-features", "item-vectors-only"])
def test_save_and_load_give_identical_scores(data_dir, tmp_path, with_features):
    torch.manual_seed(0)
    model = build_model("odmt", data_dir, **SMALL)
    model(batch_rows())["loss"].backward()  # make sure it is not just the init
    model.eval()
    history, _ = split_targets(batch_rows())
    expected = model.score(history)
    model.save_pretrained(tmp_path / "run", extra={"data": {"dir": str(data_dir) if with_features else None}})
    loaded = OdmtRecommender.from_pretrained(tmp_path / "run")
    assert not loaded.training
    got = loaded.score(history)
    for b in expected:
        assert torch.equal(expected[b], got[b])
    assert (loaded.item_tower.store is not None) == with_features
    if not with_features:
        with pytest.raises(RuntimeError):
            loaded.train()
