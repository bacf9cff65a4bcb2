"""How much can item content tell about the next item on the long tail? (fashion default, validation split)

    .venv/bin/python benchmarks/content_signal.py [--work benchmarks/work] [--run RUN ...] [--split valid|test]

The fashion generator (odmt_t4r/data/fashion.py) routes a next item through visual or text similarity
with popularity damped, so rare items are reached through their content. This benchmark ranks every
catalog item by its similarity to one of the user's last 3 items (the generator's `recent_window`),
the history excluded, and reports NDCG@10 on all users and on the long-tail slice (targets with at most
the catalog's median train count), for:
  * oracle-visual / oracle-text: the generator's own latent factors (pixel PCA, attribute one-hots):
    an upper bound for a similarity ranker, not available to any model;
  * oracle-generator: the generator's own next-item probability given the history (every mixture
    component with its true neighbours, categories and popularities; the user's style taste estimated
    from the history's styles): about the best any model can rank, so its long-tail score is a ceiling
    for a model that also keeps the overall score;
  * frozen-text / frozen-image: cosine of the frozen MiniLM sentence / EfficientNet CLS features the
    model reads;
  * probe-image: a linear map of the image tokens the IMT reads (CLS + the 2x2-pooled grid) onto the
    generator's visual factors, fitted by ridge regression on one half of the items and applied to the
    other (two folds: no item's own factors make its vector): what the frozen features could carry;
  * for each --run: its branches' scores with the popularity prior removed (similarity only) and as trained,
    and its fused score with the prior scaled by PRIOR_SCALES (coverage against NDCG).
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
PRIOR_SCALES = (0.5, 0.7, 0.85, 1.0, 1.15)


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch

    from odmt_t4r.data.fashion import FashionConfig, _text_vectors, build_catalog
    from odmt_t4r.model import OdmtRecommender, history_and_target
    from odmt_t4r.model.modality_store import ModalityStore, TokenLayout
    from odmt_t4r.training.data import PreparedData
    from odmt_t4r.training.evaluate import long_tail_items
    from odmt_t4r.training.metrics import RankingAccumulator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--run", nargs="*", default=[], help="trained fashion RUNs whose branches to score")
    ap.add_argument("--split", default="valid", choices=["valid", "test"],
                    help="test only to report the ceiling beside test results; nothing is chosen on it")
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
    for batch in data.batches(args.split, 1024):
        history, target = history_and_target(batch["items"])
        batches.append((history, target, batch["seen"]))

    def report(score_fn) -> dict:
        ranking = RankingAccumulator(ks=(10,), n_index=n)
        for history, target, seen in batches:
            ranking.update({"fused": score_fn(history)}, target, seen, tail[target])
        metrics = ranking.compute()
        return {k: round(metrics[k], 4) for k in ("NDCG@10", "coverage@10", "longtail/NDCG@10", "longtail/HR@10")}

    def similarity(emb: torch.Tensor):
        def score(history: torch.Tensor) -> torch.Tensor:
            lengths = (history > 0).sum(1)
            best = torch.full((len(history), n), -1e9)
            for back in range(1, RECENT + 1):
                last = history[torch.arange(len(history)), (lengths - back).clamp(min=0)]
                best = torch.maximum(best, emb[last] @ emb.t())
            return best
        return score

    if "image" in data.info.modalities:
        probe_store = ModalityStore.load(data.root / "features", ["image"], layout=TokenLayout.from_counts(0, 4))
        tokens = probe_store.lookup(torch.arange(n), n_tokens=5)["image"].double().reshape(n, -1)
        embeddings["probe-image"] = unit(cross_fitted_probe(tokens, torch.from_numpy(catalog.visual[latent_row])))
    results = {name: report(similarity(emb)) for name, emb in embeddings.items()}
    results["oracle-generator"] = report(generator_probability(catalog, cfg, latent_row, n))
    for run in args.run:
        model = OdmtRecommender.from_pretrained(run, data_dir=root)
        prior = model.popularity_bias()
        for b in model.branch_names:
            results[f"{Path(run).name}/{b}"] = report(lambda h, b=b: model.score(h)[b])
            if prior is not None:
                results[f"{Path(run).name}/{b} (no prior)"] = report(lambda h, b=b: model.score(h)[b] - prior[b])
        if prior is not None and model.config.fusion_scores == "raw":
            # the fused score with its popularity prior scaled: what coverage costs in NDCG
            weights = model.config.fusion_weights or {b: 1.0 / len(model.branch_names) for b in model.branch_names}
            fused_prior = sum(w * prior[b] for b, w in weights.items())
            for scale in PRIOR_SCALES:
                results[f"{Path(run).name}/fused (prior x {scale})"] = report(
                    lambda h, scale=scale: model.score(h)["fused"] - (1.0 - scale) * fused_prior)

    print(f"fashion {args.split}: {len(tail[torch.cat([t for _, t, _ in batches])].nonzero())} long-tail users "
          f"(target train count <= {median:g})")
    print(f"{'ranker':<46} {'NDCG@10':>8} {'tail NDCG@10':>13} {'tail HR@10':>11} {'coverage@10':>12}")
    for name, r in results.items():
        print(f"{name:<46} {r['NDCG@10']:8.4f} {r['longtail/NDCG@10']:13.4f} {r['longtail/HR@10']:11.4f} "
              f"{r['coverage@10']:12.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "content_signal", "split": args.split, "recent": RECENT,
                                          "longtail_median": median, "results": results}, indent=2))
    print(f"wrote {args.out}")


def cross_fitted_probe(x, y, ridge: float = 10.0, seed: int = 0):
    """Ridge regression x [n F] -> y [n K] over index rows 3.., two folds: each half is predicted by the map
    fitted on the other half (rows 0-2, reserved, stay zero)."""
    import torch

    rows = torch.arange(3, len(x))[torch.randperm(len(x) - 3, generator=torch.Generator().manual_seed(seed))]
    halves = (rows[: len(rows) // 2], rows[len(rows) // 2:])
    out = torch.zeros(len(x), y.shape[1], dtype=torch.float64)
    for fit, apply in (halves, halves[::-1]):
        mean = x[fit].mean(0)
        a = x[fit] - mean
        w = a.t() @ torch.linalg.solve(a @ a.t() + ridge * torch.eye(len(fit), dtype=a.dtype), y[fit].double())
        out[apply] = (x[apply] - mean) @ w
    return out


def generator_probability(catalog, cfg, latent_row, n: int):
    """history [B L] index rows -> [B n] the generator's probability of each index row being next
    (fashion.py's `_sessions` written as a probability; the taste is the history's style counts under
    the Dirichlet prior's mean)."""
    import numpy as np
    import torch

    from odmt_t4r.data.fashion import CATEGORY_TRANSITIONS, STYLES, _text_vectors, neighbour_weights

    cat, style, pop = (torch.from_numpy(np.asarray(a)) for a in (catalog.category, catalog.style, catalog.pop))
    n_cat, n_styles, m = 10, len(STYLES), len(cat)

    def neighbour_matrix(emb: np.ndarray, temperature: float) -> torch.Tensor:  # [m m] rows sum to 1
        idx, weight = neighbour_weights(emb, catalog.pop, cfg, temperature)
        dense = np.zeros((m, m))
        np.put_along_axis(dense, idx, weight / weight.sum(axis=1, keepdims=True), axis=1)
        return torch.from_numpy(dense)

    visual = neighbour_matrix(catalog.visual, cfg.visual_temperature)
    text = neighbour_matrix(_text_vectors(catalog), cfg.text_temperature)
    bucket = cat * n_styles + style
    within_bucket = pop / torch.zeros(n_cat * n_styles, dtype=pop.dtype).index_add_(0, bucket, pop)[bucket]
    within_style = pop / torch.zeros(n_styles, dtype=pop.dtype).index_add_(0, style, pop)[style]
    trans = torch.from_numpy(CATEGORY_TRANSITIONS)
    mix = torch.tensor([cfg.w_category, cfg.w_visual, cfg.w_text, cfg.w_popular], dtype=torch.float64)
    mix = mix / mix.sum()
    row = torch.from_numpy(latent_row)

    def score(history: torch.Tensor) -> torch.Tensor:
        lengths = (history > 0).sum(1)
        latent = row[history.clamp(min=0)]  # [B L]
        real = history > 0
        counts = torch.zeros(len(history), n_styles, dtype=torch.float64)
        counts.scatter_add_(1, style[latent], real.double())
        taste = (cfg.taste_concentration + counts) / (n_styles * cfg.taste_concentration + lengths[:, None])
        last = latent[torch.arange(len(history)), (lengths - 1).clamp(min=0)]
        p = mix[0] * trans[cat[last]][:, cat] * taste[:, style] * within_bucket  # category move
        p += mix[3] * taste[:, style] * within_style  # taste x popularity move
        recent = torch.zeros(len(history), m, dtype=torch.float64)
        for back in range(1, RECENT + 1):  # the anchor: one of the last `recent_window` items, uniformly
            anchor = latent[torch.arange(len(history)), (lengths - back).clamp(min=0)]
            weight = ((lengths >= back).double() / lengths.clamp(max=RECENT).double())[:, None]
            recent += weight * (mix[1] * visual[anchor] + mix[2] * text[anchor])
        out = torch.zeros(len(history), n, dtype=torch.float64)
        out[:, 3:] = (p + recent)[:, row[3:]]
        return out.float()

    return score


if __name__ == "__main__":
    main()
