"""Issue 11: `odmt train --nproc 2` runs torch DDP (gloo) on 2 CPU processes: each rank trains on its own
shard of the batches, rank 0 evaluates and writes the RUN, --resume works, and the model it saves
evaluates like a single-process run on the same data (within a stated tolerance). Also bf16 autocast."""

import json

import pytest

from odmt_t4r.model import OdmtRecommender
from odmt_t4r.training import train
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.distributed import TRACE_ENV
from odmt_t4r.training.evaluate import evaluate_model
from tests.synthetic import make_synthetic_prepared

# a strongly learnable synthetic set: both runs reach high scores, so the comparison is meaningful
SETTINGS = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "modalities": ["id", "text"],
            "lr": 5e-3, "eval_batch_size": 64, "patience": 100, "progress": False, "loss": "full"}
TOLERANCE = 0.1  # valid NDCG@10: DDP averages 2 shards per step, so its steps are not the single run's

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_prepared(tmp_path_factory.mktemp("ddp"), n_users=64, n_items=20, max_length=6,
                                   text_tokens=4, image_tokens=4, text_dim=16, image_dim=16, jump=0.05)


def test_two_processes_train_disjoint_shards_and_match_a_single_process(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    ddp = train.train_run(train.TrainConfig.from_dict(dict(SETTINGS, batch_size=16, nproc=2, epochs=2)),
                          data_dir, tmp_path / "ddp")
    # resume the 2-process run for a third epoch
    ddp = train.train_run(train.TrainConfig.from_dict(dict(SETTINGS, batch_size=16, nproc=2, epochs=2)),
                          data_dir, tmp_path / "ddp", resume=True, epochs=3)
    assert ddp["epochs_run"] == 3
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]

    seen = {r: [json.loads(line) for line in (tmp_path / f"rows-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    n_rows = PreparedData(data_dir).num_rows("train")
    for epoch in range(3):
        rows = {r: [(u, *row) for b in seen[r] if b["epoch"] == epoch for u, row in zip(b["users"], b["rows"])]
                for r in (0, 1)}  # a training row: one window of one user
        assert rows[0] and rows[1] and len(rows[0]) == len(rows[1])  # the same number of steps per rank
        assert len(rows[0]) + len(rows[1]) >= n_rows - 16 * 2  # all but at most one batch per rank
        assert rows[0][0][0] is not None and len(set(rows[0] + rows[1])) == len(rows[0] + rows[1])
        assert not set(rows[0]) & set(rows[1])  # disjoint shards: no training row went to both ranks

    monkeypatch.delenv(TRACE_ENV)
    single = train.train_run(train.TrainConfig.from_dict(dict(SETTINGS, batch_size=32, epochs=3)), data_dir,
                             tmp_path / "single", log=lambda *_: None)
    data = PreparedData(data_dir)
    got = evaluate_model(OdmtRecommender.from_pretrained(tmp_path / "ddp", data_dir=data_dir), data, "valid")
    want = evaluate_model(OdmtRecommender.from_pretrained(tmp_path / "single", data_dir=data_dir), data, "valid")
    assert got["NDCG@10"] == pytest.approx(ddp["fusion"]["valid_NDCG@10"], abs=1e-6)
    assert abs(got["NDCG@10"] - want["NDCG@10"]) <= TOLERANCE, (got["NDCG@10"], want["NDCG@10"])
    assert got["HR@10"] > 0.5 and single["fusion"]["valid_NDCG@10"] > 0.3  # both learned the sequences


def test_bf16_mixed_precision_trains(data_dir, tmp_path):
    summary = train.train_run(train.TrainConfig.from_dict(dict(SETTINGS, batch_size=32, epochs=2, amp="bf16")),
                              data_dir, tmp_path / "bf16", log=lambda *_: None)
    assert summary["epochs_run"] == 2 and summary["fusion"]["valid_NDCG@10"] > 0
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train.TrainConfig.from_dict(dict(SETTINGS, amp="fp16", device="cpu")).validate()
