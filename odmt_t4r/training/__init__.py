"""Training and evaluation of ODMT and its baselines on a prepared DIR (`odmt train`, `odmt evaluate`)."""

from .data import PreparedData, pad_ragged
from .metrics import PROTOCOL, RankingAccumulator, hr_ndcg, target_ranks

__all__ = ["PreparedData", "pad_ragged", "PROTOCOL", "RankingAccumulator", "hr_ndcg", "target_ranks"]
