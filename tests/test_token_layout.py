"""TokenLayout: what the item tower sees of the frozen features (summary + pooled span / grid tokens)."""

import numpy as np
import pytest
import torch

from odmt_t4r.model import ModalityStore, TokenLayout, build_model
from tests.synthetic import make_synthetic_prepared


def text_item():
    # one item, T=6 stored tokens: [CLS] + 4 real tokens + 1 pad; token i holds the value i in every dim
    tokens = torch.arange(6, dtype=torch.float32)[None, :, None].expand(1, 6, 3).clone()
    mask = torch.tensor([[True, True, True, True, True, False]])
    return tokens, mask


def test_text_summary_is_the_mean_of_real_tokens_and_spans_split_the_rest():
    tokens, mask = text_item()
    out, out_mask = TokenLayout(text_tokens=2).text(tokens, mask)
    assert out.shape == (1, 3, 3)
    assert out[0, 0, 0].item() == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)  # the sentence embedding
    assert out[0, 1, 0].item() == pytest.approx((1 + 2) / 2)  # first half of the tokens after [CLS]
    assert out[0, 2, 0].item() == pytest.approx((3 + 4) / 2)  # second half; the pad never counts
    assert out_mask.tolist() == [[True, True, True]]


def test_text_spans_beyond_a_short_text_are_masked():
    tokens, mask = text_item()
    out, out_mask = TokenLayout(text_tokens=8).text(tokens, mask)
    assert out.shape == (1, 9, 3)
    assert out_mask[0].sum().item() == 1 + 4  # the summary and one span per real token
    real = out[0, 1:][out_mask[0, 1:]][:, 0].tolist()
    assert real == [1.0, 2.0, 3.0, 4.0]


def test_text_tokens_none_keeps_every_token_with_the_summary_first():
    tokens, mask = text_item()
    out, out_mask = TokenLayout().text(tokens, mask)
    assert torch.equal(out[:, 1:], tokens[:, 1:]) and torch.equal(out_mask, mask)
    assert out[0, 0, 0].item() == pytest.approx(2.0)


def test_image_grid_is_average_pooled_to_g_by_g():
    grid = torch.arange(16, dtype=torch.float32).reshape(4, 4)  # a 4x4 feature map, 1-d features
    tokens = torch.cat([torch.tensor([[-1.0]]), grid.reshape(16, 1)])[None]  # [1 17 1], CLS = -1
    out = TokenLayout(image_tokens=4).image(tokens)
    assert out.shape == (1, 5, 1)
    assert out[0, 0, 0].item() == -1.0
    expected = [grid[:2, :2].mean(), grid[:2, 2:].mean(), grid[2:, :2].mean(), grid[2:, 2:].mean()]
    assert out[0, 1:, 0].tolist() == pytest.approx([e.item() for e in expected])
    assert TokenLayout(image_tokens=0).image(tokens).shape == (1, 1, 1)
    spans = TokenLayout(image_tokens=2).image(tokens)  # not a square count: two spans in token order
    assert spans[0, 1:, 0].tolist() == pytest.approx([grid.flatten()[:8].mean().item(), grid.flatten()[8:].mean().item()])


def test_bad_token_counts_are_refused():
    with pytest.raises(ValueError, match="image_tokens"):
        TokenLayout(image_tokens=-3)
    with pytest.raises(ValueError, match="text_tokens"):
        TokenLayout(text_tokens=-2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared"), n_users=12, n_items=20, max_length=6,
                                   text_tokens=7, image_tokens=5, text_dim=8, image_dim=6)


def test_memory_mapped_and_in_memory_stores_give_the_same_pooled_rows(data_dir):
    layout = TokenLayout(text_tokens=3, image_tokens=2)
    in_ram = ModalityStore.load(data_dir / "features", layout=layout)
    mapped = ModalityStore.load(data_dir / "features", layout=layout, in_memory_limit_bytes=0)
    mapped_f32 = ModalityStore(mapped._np, in_memory_limit_bytes=0, float32_limit_bytes=0, layout=layout)
    idx = torch.tensor([7, 3, 22, 0, 7])
    a, b = in_ram.lookup(idx), mapped_f32.lookup(idx)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k
    assert in_ram.n_tokens("text") == 4 and in_ram.n_tokens("image") == 3
    assert a["text"].dtype == torch.float32 and a["text_mask"].dtype == torch.bool


def test_model_config_token_counts_reach_the_tower(data_dir):
    model = build_model("odmt", data_dir, text_tokens=2, image_tokens=-1, d_model=16, n_heads=2,
                        imt_layers=1, seq_layers=1)
    store = model.item_tower.store
    assert store.n_tokens("text") == 3 and store.n_tokens("image") == 5
    assert model.item_tower(torch.tensor([3, 4]))["text"].shape == (2, 16)
    with pytest.raises(ValueError, match="image_tokens"):
        build_model("odmt", data_dir, image_tokens=-2)
