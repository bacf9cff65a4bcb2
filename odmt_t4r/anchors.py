"""Published reference points the project compares itself with (the quality benchmark, the run report).

RecBole 1.2.1 trained on the same ml-100k leave-one-out split as `odmt prepare --source ml-100k`, its
test rankings re-scored with this project's protocol (every item the user saw before the target
excluded; odmt_t4r/training/metrics.py), one seed each.
"""

RECBOLE_ML100K = {
    "RecBole Pop": {"HR@10": 0.0848, "NDCG@10": 0.0446, "HR@20": 0.1262, "NDCG@20": 0.0549},
    "RecBole SASRec": {"HR@10": 0.2100, "NDCG@10": 0.1058, "HR@20": 0.3150, "NDCG@20": 0.1320},
    "RecBole GRU4Rec": {"HR@10": 0.2036, "NDCG@10": 0.1073, "HR@20": 0.3330, "NDCG@20": 0.1400},
}
