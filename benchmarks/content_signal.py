"""How much can item content tell about the next item on the long tail? (fashion default, validation split)

    .venv/bin/python benchmarks/content_signal.py [--work benchmarks/work] [--run RUN ...]

The fashion generator (odmt_t4r/data/fashion.py) routes a next item through visual or text similarity
with popularity damped, so rare items are reached through their content. This benchmark ranks every
catalog item by its similarity to one of the user's last 3 items (the generator's `recent_window`),
the history excluded, and reports NDCG@10 on all users and on the long-tail slice (targets with at most
the catalog's median train count), for:
  * oracle-visual / oracle-text: the generator's own latent factors (pixel PCA, attribute one-hots):
    an upper bound for a similarity ranker, not available to any model;
  * frozen-text / frozen-image: cosine of the frozen MiniLM sentence / EfficientNet CLS features the
    model reads;
  * for each --run: its branches' scores with the popularity prior removed (similarity only) and as trained.
Writes benchmarks/results/content_signal.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

RESULTS = Path(__file__).parent / "results" / "content_signal.json"
RECENT = 3  # the generator anchors similarity moves on one of the last 3 items


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch

    from odmt_t4r.data.fashion import FashionConfig, _text_vectors, build_catalog
    from odmt_t4r.model import OdmtRecommender, history_and_target
    from odmt_t4r.model.modality_store import ModalityStore, TokenLayout
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import long_tail_items
    from odmt_t4r.training.metrics import hr_ndcg, target_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--run", nargs="*", default=[], help="trained fashion RUNs whose branches to score")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)

    root = Path(args.work) / "data" / "fashion"
    if not (root / "manifest.json").is_file():
        from odmt_t4r.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(source="fashion", out=str(root)))
    data = PreparedData(root)
    manifest = data.info.manifest
    cfg = FashionConfig(**{k: v for k, v in manifest.get("notes", {}).get("fashion", {}).items()
                           if k in FashionConfig.__dataclass_fields__})
    catalog = build_catalog(cfg, np.random.default_rng(cfg.seed))  # the catalog is drawn first: same factors
    items = pd.read_parquet(root / "items.parquet", columns=["item_idx", "item_id"])
    n = data.info.n_index
    latent_row = np.zeros(n, dtype=np.int64)
    latent_row[items["item_idx"]] = items["item_id"].str.lstrip("F").astype(int)
    tail, median = long_tail_items(data)

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.float(), dim=-1)
        x[:3] = 0
        return x

    embeddings = {
        "oracle-visual": unit(torch.from_numpy(catalog.visual[latent_row])),
        "oracle-text": unit(torch.from_numpy(_text_vectors(catalog)[latent_row])),
    }
    store = ModalityStore.load(data.root / "features", data.info.modalities[1:], layout=TokenLayout.from_counts(0, 0))
    feats = store.lookup(torch.arange(n), n_tokens=1)
    for m in data.info.modalities[1:]:
        embeddings[f"frozen-{m}"] = unit(feats[m][:, 0])

    batches = []
    for batch in data.batches("valid", 1024):
        history, target = history_and_target(batch["items"])
        batches.append((history, target, batch["seen"]))

    def report(score_fn) -> dict:
        ranks, tails = [], []
        for history, target, seen in batches:
            ranks.append(target_ranks(score_fn(history), target, seen))
            tails.append(tail[target])
        r, t = torch.cat(ranks), torch.cat(tails)
        return {"NDCG@10": round(hr_ndcg(r, (10,))["NDCG@10"], 4),
                "longtail/NDCG@10": round(hr_ndcg(r[t], (10,))["NDCG@10"], 4),
                "longtail/HR@10": round(hr_ndcg(r[t], (10,))["HR@10"], 4)}

    def similarity(emb: torch.Tensor):
        def score(history: torch.Tensor) -> torch.Tensor:
            lengths = (history > 0).sum(1)
            best = torch.full((len(history), n), -1e9)
            for back in range(1, RECENT + 1):
                last = history[torch.arange(len(history)), (lengths - back).clamp(min=0)]
                best = torch.maximum(best, emb[last] @ emb.t())
            return best
        return score

    results = {name: report(similarity(emb)) for name, emb in embeddings.items()}
    for run in args.run:
        model = OdmtRecommender.from_pretrained(run, data_dir=root)
        prior = model.popularity_bias()
        for b in model.branch_names:
            results[f"{Path(run).name}/{b}"] = report(lambda h, b=b: model.score(h)[b])
            if prior is not None:
                results[f"{Path(run).name}/{b} (no prior)"] = report(lambda h, b=b: model.score(h)[b] - prior[b])

    print(f"fashion valid: {len(tail[torch.cat([t for _, t, _ in batches])].nonzero())} long-tail users "
          f"(target train count <= {median:g})")
    print(f"{'ranker':<46} {'NDCG@10':>8} {'tail NDCG@10':>13} {'tail HR@10':>11}")
    for name, r in results.items():
        print(f"{name:<46} {r['NDCG@10']:8.4f} {r['longtail/NDCG@10']:13.4f} {r['longtail/HR@10']:11.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "content_signal", "split": "valid", "recent": RECENT,
                                          "longtail_median": median, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
