"""Full-ranking HR/NDCG with history exclusion, pinned by a hand-computed example."""

import math

import pytest
import torch

from odmt_t4r.training.metrics import RankingAccumulator, hr_ndcg, ndcg_standard_error, target_ranks

NEG = -1.0  # reserved rows 0..2 get high raw scores below: they must never count


def test_hand_example_ranks_and_metrics():
    #                 pad  null  oov   3    4    5    6    7
    scores = torch.tensor([
        [9.0, 9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # target 6; item 4 (higher) was seen -> rank 0
        [9.0, 9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # target 3; items 4 and 6 score higher -> rank 2
        [9.0, 9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # target 7 was seen before -> excluded -> a miss
    ])
    targets = torch.tensor([6, 3, 7])
    seen = torch.tensor([[4, 0], [0, 0], [7, 5]])  # 0 = padding
    ranks = target_ranks(scores, targets, seen)
    assert ranks[:2].tolist() == [0.0, 2.0] and math.isinf(ranks[2])

    m = hr_ndcg(ranks, ks=(1, 3))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)  # (1 + 0.5 + 0) / 3


def test_the_standard_error_is_that_of_the_mean_per_user_gain():
    ranks = torch.tensor([0.0, math.inf, 1.0, 5.0, 30.0])
    gains = [1.0, 0.0, 1 / math.log2(3), 1 / math.log2(7), 0.0]  # NDCG@10 of each user
    mean = sum(gains) / 5
    sample_sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / 4)
    assert ndcg_standard_error(ranks, 10) == pytest.approx(sample_sd / math.sqrt(5))
    assert ndcg_standard_error(torch.tensor([0.0, 0.0, 0.0])) == 0.0  # every user alike: nothing to resample
    acc = RankingAccumulator(ks=(10, 20))
    acc.add_users(torch.tensor([3, 4, 5, 6, 7]), None)
    acc.add_ranks("fused", ranks)
    acc.add_ranks("id", ranks * 0)
    out = acc.compute()
    assert out["se/NDCG@10"] == pytest.approx(sample_sd / math.sqrt(5)) and "se/id/NDCG@10" not in out


def test_ties_count_against_the_target():
    scores = torch.zeros(1, 13)  # 10 real items, all scored equally
    ranks = target_ranks(scores, torch.tensor([5]))
    assert ranks.item() == 9.0  # every other item ties with the target and is ranked above it
    assert hr_ndcg(ranks, ks=(5,))["HR@5"] == 0.0


def test_accumulator_names_fused_and_branch_keys():
    acc = RankingAccumulator(ks=(10, 20))
    s = torch.randn(4, 30)
    t = torch.tensor([3, 4, 5, 6])
    acc.update({"fused": s, "id": s, "text": -s}, t, torch.zeros(4, 1, dtype=torch.long))
    out = acc.compute()
    for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "id/HR@10", "text/NDCG@20"):
        assert k in out
    assert out["HR@10"] == out["id/HR@10"]
