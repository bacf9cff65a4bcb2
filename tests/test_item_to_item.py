"""OdmtConfig.item_to_item: each position's own item vector also scores the next item."""

import pytest
import torch

from odmt_t4r.model import OdmtConfig, build_model
from odmt_t4r.training.data import PreparedData
from tests.test_training import data_dir  # noqa: F401 (the tiny prepared DIR fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(d_model=16, n_heads=2, imt_layers=1, seq_layers=1, imt_dropout=0.0, seq_dropout=0.0,
             modalities=["id", "text"])


@pytest.mark.parametrize("loss", ["full", "in_batch"])
def test_the_term_is_added_with_its_weight_and_trains_the_item_tower_alone(data_dir, loss):  # noqa: F811
    data = PreparedData(data_dir)
    rows = next(data.batches("train", 16))["items"]
    torch.manual_seed(0)
    off = build_model("odmt", data.info, loss=loss, **SMALL)
    on = build_model("odmt", data.info, loss=loss, item_to_item=0.5, **SMALL)
    on.load_state_dict(off.state_dict())
    a, b = off(rows), on(rows)
    assert "i2i" not in a["losses"] and b["losses"]["i2i"] > 0
    assert b["loss"].item() == pytest.approx(a["loss"].item() + 0.5 * b["losses"]["i2i"].item(), rel=1e-5)
    # the term reads item vectors only: it trains the item tower and branch MLPs, not the sequence encoders
    on.zero_grad()
    b["losses"]["i2i"].backward()
    assert on.item_tower.id_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for br in on.branches.values() for p in br.mlp.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for br in on.branches.values() for p in br.encoder.parameters())


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="item_to_item"):
        OdmtConfig(modalities=["id"], loss="full", item_to_item=-1.0).validate()
