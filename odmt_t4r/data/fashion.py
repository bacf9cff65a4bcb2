"""`fashion`: the bundled default source, a seeded semi-synthetic store on real Fashion-MNIST photos.

Catalog. `n_items` photos are drawn from the 70k Fashion-MNIST images (train + t10k), balanced over the
10 classes, then shuffled so item IDs say nothing about the class. Each item gets:
  * a category: its Fashion-MNIST class;
  * a visual embedding: the top `visual_dim` PCA components of its pixels, L2-normalised;
  * text attributes: a shade (bucketed mean brightness of the garment's pixels, so it is visual too),
    a brand, a style (tied to the brand's house style) and a material; the text-attribute vector is the
    weighted one-hot of these four, so text similarity = weighted count of shared attributes;
  * a popularity: a Zipf weight `rank ** -zipf_alpha` over a random ranking, so most items are rare.
The item text spells the attributes out ("Corvo sneakers in white leather, sporty style. Best seller."),
each attribute word swapped for a random one with probability `text_noise`, plus an uninformative
filler phrase. The image column is the real 28x28 photo, written as a PNG per item.

Sessions. One session per user (user_id is the session). Each user has a taste: a Dirichlet(
`taste_concentration`) distribution over styles. A session has 2 + NegBin(2) items (mean
`mean_session_len`, capped at `max_session_len`). Its first item is drawn by popularity within a style
drawn from the user's taste; every next item comes from one component of a mixture:
  * category (`w_category`): next category ~ CATEGORY_TRANSITIONS[category of the last item] (outfit
    flows such as top -> trousers -> shoes -> bag), then an item of that category and of a style drawn
    from the user's taste, by popularity;
  * visual (`w_visual`): an item among the `n_neighbours` visually closest to one of the last
    `recent_window` items, weight exp(cosine / `visual_temperature`) * popularity ** `neighbour_pop_power`;
  * text (`w_text`): the same with text-attribute similarity (temperature `text_temperature`);
  * popularity (`w_popular`): a style from the user's taste, then an item of that style by popularity.
The similarity components damp popularity (power < 1), so rare items are reached mostly through their
photo and text: an ID-only model sees them too seldom to learn them, a content model can.
Timestamps: each session starts at a random second within `span_days`; gaps are floor(Exp(
`mean_gap_s`)) seconds, so timestamps never decrease within a session and are sometimes equal. Rows are
ordered by time (within a session, by position). Everything is vectorised numpy and seeded by `seed`:
the same config gives identical frames and identical PNG bytes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from odmt_t4r.data.base import RawData

CATEGORIES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandals", "shirt", "sneakers", "bag", "ankle boots")
SHADES = ("black", "charcoal", "grey", "silver", "white")  # dark to light, from mean garment brightness
STYLES = ("casual", "classic", "sporty", "elegant", "vintage", "minimalist")
MATERIALS = ("cotton", "denim", "leather", "wool", "linen", "silk", "canvas", "polyester")
BRANDS = ("Aurel", "Brisa", "Corvo", "Dunmore", "Elka", "Fjell", "Galen", "Halden", "Isola", "Juno", "Kestrel", "Lumo")
FILLERS = ("New season.", "Best seller.", "Limited stock.", "Free returns.", "Everyday essential.", "Gift idea.",
           "Online exclusive.", "Easy care.")
# Outfit flows: each category's two typical next categories (tops -> bottoms -> shoes -> bag -> tops).
OUTFIT_NEXT = {0: (1, 6), 1: (7, 9), 2: (1, 4), 3: (5, 8), 4: (9, 2), 5: (8, 3), 6: (1, 2), 7: (0, 8), 8: (3, 4), 9: (4, 8)}
_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_EPOCH0 = 1_700_000_000  # 2023-11-14: sessions fall in the `span_days` after this


@dataclass
class FashionConfig:
    n_items: int = 3000  # catalog size: 300 photos per class, big enough for a long popularity tail
    n_users: int = 6000  # one session each: ~6000 * 15 = ~90k interactions
    seed: int = 0  # drives photo choice, attributes, tastes and sessions
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
    zipf_alpha: float = 1.0  # popularity skew: top 10% of items get most of the popularity-driven clicks
    w_category: float = 0.40  # mixture weight of the category-transition move
    w_visual: float = 0.25  # mixture weight of the visual-neighbour move
    w_text: float = 0.20  # mixture weight of the text-neighbour move
    w_popular: float = 0.15  # mixture weight of the taste x popularity move
    mean_session_len: float = 15.0  # sessions of ~10-20 items
    min_session_len: int = 2  # a session needs an input and a target
    max_session_len: int = 60  # caps the NegBin tail
    visual_dim: int = 32  # PCA components kept for the visual embedding
    n_neighbours: int = 50  # candidate pool of the similarity moves
    recent_window: int = 3  # similarity moves anchor on one of the last few items, not only the last
    visual_temperature: float = 0.05  # sharper = stronger visual signal among the neighbours
    text_temperature: float = 0.5  # text similarity is a small integer-ish score, so a milder temperature
    neighbour_pop_power: float = 0.3  # <1: similarity moves reach rare items (content beats ID there)
    taste_concentration: float = 0.3  # Dirichlet over styles: small = users stick to one or two styles
    brand_style_tie: float = 0.6  # probability an item has its brand's house style (brand <-> style signal)
    text_noise: float = 0.1  # probability each attribute word in the text is replaced by a random one
    span_days: int = 30  # sessions start within this many days
    mean_gap_s: float = 40.0  # mean seconds between clicks; floor() makes some gaps 0 (equal timestamps)


def category_transitions(stay: float = 0.25, outfit: float = 0.60) -> np.ndarray:
    """10x10 row-stochastic matrix: `stay` in the category, `outfit` split over OUTFIT_NEXT, rest uniform."""
    t = np.full((10, 10), (1.0 - stay - outfit) / 10)
    for c, nxt in OUTFIT_NEXT.items():
        t[c, c] += stay
        t[c, list(nxt)] += outfit / len(nxt)
    return t


CATEGORY_TRANSITIONS = category_transitions()


def load_fashion_mnist(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70k photos (uint8, N x 28 x 28) and labels, train then t10k, parsed from the gz idx files."""
    folder = Path(folder)
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder} (missing {missing}): install the Debian package "
                                f"`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass --fashion-mnist-dir")
    images, labels = [], []
    for img_file, lab_file in (_FILES[:2], _FILES[2:]):
        img = np.frombuffer(gzip.decompress((folder / img_file).read_bytes()), dtype=np.uint8)
        lab = np.frombuffer(gzip.decompress((folder / lab_file).read_bytes()), dtype=np.uint8)
        assert img[:4].tobytes() == b"\x00\x00\x08\x03" and lab[:4].tobytes() == b"\x00\x00\x08\x01", "not idx files"
        images.append(img[16:].reshape(-1, 28, 28))
        labels.append(lab[8:])
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


class _Sampler:
    """Draws, for many buckets at once, one member of each bucket with probability proportional to its weight."""

    def __init__(self, bucket: np.ndarray, member: np.ndarray, weight: np.ndarray, n_buckets: int):
        order = np.argsort(bucket, kind="stable")
        self.member, self.cum = member[order], np.cumsum(weight[order])
        self.total = np.bincount(bucket, weights=weight, minlength=n_buckets)
        count = np.bincount(bucket, minlength=n_buckets)
        self.first = np.concatenate([[0], np.cumsum(count)[:-1]])
        self.last = self.first + count - 1
        self.lo = np.concatenate([[0.0], np.cumsum(self.total)[:-1]])
        self.nonempty = count > 0

    def sample(self, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        idx = np.searchsorted(self.cum, self.lo[b] + rng.random(len(b)) * self.total[b], side="right")
        return self.member[np.clip(idx, self.first[b], self.last[b])]  # clip: float rounding at bucket edges


def _top_k(emb: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows (by dot product) and their similarities, in row blocks (memory)."""
    n = len(emb)
    k = min(k, n - 1)
    idx, sim = np.empty((n, k), np.int64), np.empty((n, k))
    for s in range(0, n, block):
        sims = emb[s:s + block] @ emb.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # never your own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        idx[s:s + block], sim[s:s + block] = top, np.take_along_axis(sims, top, axis=1)
    return idx, sim


def neighbour_weights(emb: np.ndarray, pop: np.ndarray, cfg: FashionConfig, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Each item's `n_neighbours` most similar items [n k] and their unnormalised draw weights [n k]:
    exp(similarity / temperature) * popularity ** neighbour_pop_power."""
    idx, sim = _top_k(emb, cfg.n_neighbours)
    return idx, np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature) * pop[idx] ** cfg.neighbour_pop_power


def _neighbour_sampler(emb: np.ndarray, pop: np.ndarray, cfg: FashionConfig, temperature: float) -> _Sampler:
    idx, weight = neighbour_weights(emb, pop, cfg, temperature)
    n = len(emb)
    return _Sampler(np.repeat(np.arange(n), idx.shape[1]), idx.ravel(), weight.ravel(), n)


@dataclass
class Catalog:
    """The latent item factors the sessions are generated from (also handy for tests and analysis)."""

    pixels: np.ndarray  # n x 28 x 28 uint8
    category: np.ndarray  # Fashion-MNIST class
    visual: np.ndarray  # n x visual_dim, unit norm
    shade: np.ndarray
    style: np.ndarray
    material: np.ndarray
    brand: np.ndarray
    pop: np.ndarray  # Zipf popularity weight


def build_catalog(cfg: FashionConfig, rng: np.random.Generator) -> Catalog:
    photos, labels = load_fashion_mnist(cfg.fashion_mnist_dir)
    per_class = np.full(10, cfg.n_items // 10) + (rng.permutation(10) < cfg.n_items % 10)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class[c], replace=False) for c in range(10)])
    chosen = chosen[rng.permutation(len(chosen))]  # item ID order says nothing about the class
    pixels, n = photos[chosen], len(chosen)
    flat = pixels.reshape(n, -1).astype(np.float64) / 255.0
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    visual = centred @ vt[:cfg.visual_dim].T
    visual /= np.linalg.norm(visual, axis=1, keepdims=True) + 1e-12
    brightness = np.where(flat > 0, flat, np.nan)
    brightness = np.nanmean(brightness, axis=1)  # mean of the garment's pixels, not the black background
    shade = np.searchsorted(np.quantile(brightness, np.linspace(0, 1, len(SHADES) + 1)[1:-1]), brightness)
    brand = rng.integers(len(BRANDS), size=n)
    house_style = rng.integers(len(STYLES), size=len(BRANDS))
    style = np.where(rng.random(n) < cfg.brand_style_tie, house_style[brand], rng.integers(len(STYLES), size=n))
    material = rng.integers(len(MATERIALS), size=n)
    pop = (1.0 + rng.permutation(n)) ** -cfg.zipf_alpha
    return Catalog(pixels, labels[chosen], visual, shade, style, material, brand, pop)


def _text_vectors(cat: Catalog) -> np.ndarray:
    """Weighted one-hots: the dot product of two items = weighted count of shared text attributes."""
    parts = [(cat.style, len(STYLES), 1.0), (cat.brand, len(BRANDS), 0.7), (cat.material, len(MATERIALS), 0.5),
             (cat.shade, len(SHADES), 0.3)]
    return np.concatenate([np.eye(k)[a] * np.sqrt(w) for a, k, w in parts], axis=1)


def _item_texts(cat: Catalog, cfg: FashionConfig, rng: np.random.Generator) -> list[str]:
    def noisy(values: np.ndarray, vocab: tuple[str, ...]) -> np.ndarray:
        swap = rng.random(len(values)) < cfg.text_noise
        return np.asarray(vocab)[np.where(swap, rng.integers(len(vocab), size=len(values)), values)]

    brand, shade = noisy(cat.brand, BRANDS), noisy(cat.shade, SHADES)
    material, style = noisy(cat.material, MATERIALS), noisy(cat.style, STYLES)
    filler = np.asarray(FILLERS)[rng.integers(len(FILLERS), size=len(brand))]
    return [f"{b} {CATEGORIES[c]} in {sh} {m}, {st} style. {f}"
            for b, c, sh, m, st, f in zip(brand, cat.category, shade, material, style, filler)]


def _session_lengths(cfg: FashionConfig, rng: np.random.Generator) -> np.ndarray:
    extra = max(cfg.mean_session_len - cfg.min_session_len, 1e-6)
    return np.minimum(cfg.min_session_len + rng.negative_binomial(2, 2 / (2 + extra), size=cfg.n_users), cfg.max_session_len)


def _sessions(cat: Catalog, cfg: FashionConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Item indices of every session, n_users x max_len (-1 = past the end), and the session lengths."""
    n, n_styles = len(cat.category), len(STYLES)
    by_style = _Sampler(cat.style, np.arange(n), cat.pop, n_styles)
    by_cat = _Sampler(cat.category, np.arange(n), cat.pop, 10)
    by_cat_style = _Sampler(cat.category * n_styles + cat.style, np.arange(n), cat.pop, 10 * n_styles)
    visual = _neighbour_sampler(cat.visual, cat.pop, cfg, cfg.visual_temperature)
    text = _neighbour_sampler(_text_vectors(cat), cat.pop, cfg, cfg.text_temperature)
    taste_cdf = np.cumsum(rng.dirichlet(np.full(n_styles, cfg.taste_concentration), size=cfg.n_users), axis=1)
    trans_cdf = np.cumsum(CATEGORY_TRANSITIONS, axis=1)
    mix = np.array([cfg.w_category, cfg.w_visual, cfg.w_text, cfg.w_popular], dtype=float)
    mix_cdf = np.cumsum(mix / mix.sum())

    def draw(cdf_rows: np.ndarray) -> np.ndarray:  # one inverse-CDF draw per row
        return np.minimum((cdf_rows < rng.random((len(cdf_rows), 1))).sum(axis=1), cdf_rows.shape[1] - 1)

    def popular(users: np.ndarray) -> np.ndarray:
        styles = draw(taste_cdf[users])
        ok = by_style.nonempty[styles]
        return np.where(ok, by_style.sample(np.where(ok, styles, 0), rng), rng.integers(n, size=len(users)))

    lengths = _session_lengths(cfg, rng)
    hist = np.full((cfg.n_users, lengths.max()), -1, np.int64)
    hist[:, 0] = popular(np.arange(cfg.n_users))
    for t in range(1, lengths.max()):
        users = np.flatnonzero(lengths > t)
        move = draw(np.broadcast_to(mix_cdf, (len(users), 4)))
        nxt = np.empty(len(users), np.int64)
        anchor = hist[users, t - 1 - rng.integers(min(t, cfg.recent_window), size=len(users))]
        m = move == 0  # category transition, then taste and popularity within the category
        cats = draw(trans_cdf[cat.category[hist[users[m], t - 1]]])
        buckets = cats * n_styles + draw(taste_cdf[users[m]])
        ok = by_cat_style.nonempty[buckets]
        nxt[m] = np.where(ok, by_cat_style.sample(np.where(ok, buckets, 0), rng), by_cat.sample(cats, rng))
        nxt[move == 1] = visual.sample(anchor[move == 1], rng)
        nxt[move == 2] = text.sample(anchor[move == 2], rng)
        nxt[move == 3] = popular(users[move == 3])
        hist[users, t] = nxt
    return hist, lengths


def _write_pngs(pixels: np.ndarray, ids: list[str], image_dir: Path) -> list[str]:
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(image_dir / f"{i}.png") for i in ids]
    for px, p in zip(pixels, paths):
        Image.fromarray(px, mode="L").save(p, format="PNG")  # no metadata: byte-identical across runs
    return paths


def generate_fashion(cfg: FashionConfig, image_dir: Path) -> RawData:
    """The `fashion` store (unvalidated: the caller runs `.validate()`); writes one PNG per item to image_dir."""
    rng = np.random.default_rng(cfg.seed)
    cat = build_catalog(cfg, rng)
    n = len(cat.category)
    width = max(5, len(str(n - 1)))
    ids = [f"F{i:0{width}d}" for i in range(n)]
    image_dir = Path(image_dir).resolve()
    items = pd.DataFrame({"item_id": ids, "text": _item_texts(cat, cfg, rng), "image": _write_pngs(cat.pixels, ids, image_dir)})

    hist, lengths = _sessions(cat, cfg, rng)
    user_width = max(5, len(str(cfg.n_users - 1)))
    user = np.repeat(np.arange(cfg.n_users), lengths)
    pos = np.concatenate([np.arange(k) for k in lengths])
    start = _EPOCH0 + rng.integers(0, cfg.span_days * 86400, size=cfg.n_users)
    gaps = np.floor(rng.exponential(cfg.mean_gap_s, size=len(user))).astype(np.int64)
    gaps[pos == 0] = 0
    ts = start[user] + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(lengths) - lengths], lengths)
    order = np.lexsort((pos, user, ts))  # a time-ordered log; ties keep the session's click order
    interactions = pd.DataFrame({
        "user_id": np.asarray([f"U{u:0{user_width}d}" for u in range(cfg.n_users)])[user[order]],
        "item_id": np.asarray(ids)[hist[user, pos][order]],
        "timestamp": ts[order].astype(np.int64),
    })
    return RawData(name="fashion", interactions=interactions, items=items,
                   interactions_path=str(image_dir.parent / "fashion-interactions"),
                   items_path=str(image_dir.parent / "fashion-items"),
                   notes={"fashion": {"seed": cfg.seed, "n_items": n, "n_users": cfg.n_users,
                                      "fashion_mnist_dir": str(cfg.fashion_mnist_dir)}})
