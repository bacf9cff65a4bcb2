"""The GPU is picked up with no code change: the frozen encoders run on CUDA where torch sees a GPU, and
NVTabular runs on cuDF where merlin does (both fall back to the CPU here, which has no GPU)."""

import merlin.core.compat
import pytest
import torch

from odmt_t4r.features import FeatureConfig
from odmt_t4r.features.encoders import make_image_encoder, make_text_encoder
from workflows import sessions as W


@pytest.mark.parametrize("cuda, want", [(True, "cuda"), (False, "cpu")])
def test_encoders_follow_the_gpu_by_default(monkeypatch, cuda, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = FeatureConfig()
    assert config.device == "auto" and config.torch_device() == want
    assert make_text_encoder(config).device == want  # built lazily: no weights load here
    assert make_image_encoder(config).device == want


def test_an_explicit_device_wins_over_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_text_encoder(FeatureConfig(device="cpu")).device == "cpu"
    assert FeatureConfig(device="cuda:1").torch_device() == "cuda:1"


def test_the_device_does_not_change_the_feature_cache_key():
    assert FeatureConfig(device="cuda").hashed_settings("text") == FeatureConfig().hashed_settings("text")


@pytest.mark.parametrize("has_gpu, cudf, want", [(True, object(), True), (True, None, False), (False, object(), False)])
def test_nvtabular_runs_on_cudf_only_with_a_gpu_and_cudf(monkeypatch, has_gpu, cudf, want):
    monkeypatch.setattr(merlin.core.compat, "HAS_GPU", has_gpu)
    monkeypatch.setattr(merlin.core.compat, "cudf", cudf)
    assert W.on_gpu() is want


def test_dask_leaves_object_columns_alone_for_the_pandas_2_gpu_stack():
    # cuDF 24.04 (the first RAPIDS for Python 3.11) needs pandas 2, where dask would turn NVTabular's
    # list columns into pyarrow strings; the CPU pins (pandas 1.5) never convert, so this is the guard
    import dask
    assert dask.config.get("dataframe.convert-string") is False
