"""`odmt prepare --append-to DIR`: new interactions and items appended to a prepared DIR give DIR2, which
equals a fresh prepare of the old and new rows together once mapped through the raw IDs; DIR's users and
items keep their indices, only the new items are encoded, and bad input leaves DIR as it was."""

import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odmt_t4r.cli import main
from odmt_t4r.contract import RESERVED_ROWS, read_split
from odmt_t4r.features.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from odmt_t4r.output_folder import FAULT_ENV
from workflows.sessions import fitted_vocabulary

T0 = 1_700_000_000
# (user, item, second) in file order. u9 has 2 interactions (left out of DIR) until NEW gives it more; u1's
# last two share a timestamp (the file order decides); i10 is in the catalog but never seen.
OLD = [
    ("u0", "i0", 1), ("u0", "i1", 2), ("u0", "i2", 3), ("u0", "i3", 4),
    ("u1", "i1", 5), ("u1", "i2", 6), ("u1", "i4", 7), ("u1", "i0", 7),
    ("u2", "i2", 8), ("u2", "i3", 9), ("u2", "i5", 10), ("u2", "i6", 11), ("u2", "i7", 12),
    ("u3", "i3", 13), ("u3", "i8", 14), ("u3", "i9", 15),
    ("u4", "i0", 16), ("u4", "i2", 17), ("u4", "i4", 18), ("u4", "i6", 19), ("u4", "i8", 20), ("u4", "i9", 21),
    ("u5", "i9", 22), ("u5", "i1", 23), ("u5", "i0", 24),
    ("u9", "i5", 25), ("u9", "i6", 26),
]
NEW = [
    ("u0", "n0", 30), ("u0", "i4", 31),  # an old user: a new item, then an old one
    ("u9", "n1", 32),  # completes u9's history
    ("u7", "n0", 33), ("u7", "n1", 34), ("u7", "i2", 34), ("u7", "i3", 35),  # a new user
    ("u2", "n1", 36),
    ("u6", "i0", 37), ("u6", "i1", 38),  # a new user with too few interactions
]
OLD_ITEMS = [f"i{k}" for k in range(11)]
NEW_ITEMS = ["n0", "n1", "n2"]  # n2 has no interaction yet
IMAGED = {"i1", "i4", "i8", "n1"}  # items with a photo; the others have none
SMALL = ["--max-length", "3", "--max-text-tokens", "4", "--image-size", "64"]


def _text(item: str) -> str:
    return f"product {item}, a {'new' if item.startswith('n') else 'classic'} piece"


def _write(folder: Path, name: str, rows, items) -> dict[str, Path]:
    """name-inter.csv and, for `items`, name-items.csv (photos in folder/img, paths relative to the file)."""
    paths = {"inter": folder / f"{name}-inter.csv"}
    pd.DataFrame([(u, i, T0 + s) for u, i, s in rows], columns=["user_id", "item_id", "timestamp"]).to_csv(
        paths["inter"], index=False)
    if items:
        paths["items"] = folder / f"{name}-items.csv"
        pd.DataFrame({"item_id": items, "text": [_text(i) for i in items],
                      "image": [f"img/{i}.png" if i in IMAGED else None for i in items]}).to_csv(paths["items"], index=False)
    return paths


class CountingText:
    """A frozen-text-encoder stand-in: tokens from the text alone, every text it encodes recorded."""

    name, version, dim = "counting-text", "1", 8

    def __init__(self, config, seen: list):
        self.tokens, self.seen = config.max_text_tokens, seen

    def encode(self, texts):
        self.seen.extend(texts)
        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=(self.tokens, self.dim)) for t in texts]
        mask = np.arange(self.tokens)[None, :] < np.array([min(self.tokens, len(t.split())) for t in texts])[:, None]
        return np.stack(rows), mask


class CountingImage:
    name, version, dim = "counting-image", "1", 4

    def __init__(self, config, seen: list):
        self.seen = seen

    def encode(self, images):
        self.seen.extend(images)
        means = np.array([np.asarray(im, dtype=np.float64).mean(axis=(0, 1)) for im in images])  # [B 3]
        tokens = np.concatenate([means, means.sum(1, keepdims=True)], axis=1)[:, None, :] * np.arange(1, 6)[None, :, None]
        return tokens / 255.0, np.ones(tokens.shape[:2], dtype=bool)


def _prepare(args: list[str]) -> None:
    assert main(["prepare", "--source", "csv", *args]) == 0


def _csv(paths: dict[str, Path]) -> list[str]:
    return ["--interactions", str(paths["inter"])] + (["--items", str(paths["items"])] if "items" in paths else [])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DIR (the old rows), DIR2 (DIR + the new rows) and FRESH (old and new rows in one prepare), each built
    with its own empty feature cache, with the texts and photos each encoded."""
    root = tmp_path_factory.mktemp("append")
    (root / "img").mkdir()
    for k, item in enumerate(sorted(IMAGED)):
        Image.fromarray(np.full((12, 12, 3), 40 * k + 10, dtype=np.uint8)).save(root / "img" / f"{item}.png")
    src = SimpleNamespace(old=_write(root, "old", OLD, OLD_ITEMS), new=_write(root, "new", NEW, NEW_ITEMS),
                          all=_write(root, "all", OLD + NEW, OLD_ITEMS + NEW_ITEMS))
    w = SimpleNamespace(root=root, src=src, dir=root / "dir", dir2=root / "dir2", fresh=root / "fresh", encoded={},
                        dir_unchanged_by_append=None)
    import odmt_t4r.features.image  # noqa: F401  (the real encoders register on import: before they are replaced)
    import odmt_t4r.features.text  # noqa: F401
    with pytest.MonkeyPatch.context() as mp:
        for name, out, args in (("dir", w.dir, _csv(src.old)),
                                ("dir2", w.dir2, [*_csv(src.new), "--append-to", str(w.dir)]),
                                ("fresh", w.fresh, _csv(src.all))):
            texts, images = [], []
            mp.setitem(TEXT_ENCODERS, "minilm", lambda cfg, seen=texts: CountingText(cfg, seen))
            mp.setitem(IMAGE_ENCODERS, "efficientnet-lite0", lambda cfg, seen=images: CountingImage(cfg, seen))
            mp.setenv("ODMT_CACHE_DIR", str(root / f"cache-{name}"))  # empty: every row not copied is encoded
            before = _hashes(w.dir) if name == "dir2" else None
            _prepare([*args, "--out", str(out), *(SMALL if name != "dir2" else [])])
            w.encoded[name] = SimpleNamespace(texts=texts, images=len(images))
            if before is not None:
                w.dir_unchanged_by_append = _hashes(w.dir) == before
    return w


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _by_raw_ids(d: Path) -> SimpleNamespace:
    """A prepared DIR with every index replaced by its raw ID: what must not depend on index order."""
    items = pd.read_parquet(d / "items.parquet")
    item_ids = dict(zip(items["item_idx"], items["item_id"]))
    users = fitted_vocabulary(d / "workflows" / "train", "user_id")
    user_ids = dict(zip(range(RESERVED_ROWS, RESERVED_ROWS + len(users)), users))
    splits = {}
    for split in ("train", "valid", "test"):
        frame = read_split(d / split)
        splits[split] = [(user_ids[u], [item_ids[i] for i in lst], [item_ids[i] for i in seen])
                         for u, lst, seen in zip(frame["user_idx"], frame["item_id-list"],
                                                 frame["seen-list"] if "seen-list" in frame else [[]] * len(frame))]
    features = {}
    for name in ("text.npy", "text_mask.npy", "image.npy", "image_mask.npy") if (d / "features").is_dir() else ():
        array = np.load(d / "features" / name)
        assert not array[:RESERVED_ROWS].any()  # padding, null and OOV rows stay zero
        features[name] = {item_ids[i]: array[i] for i in item_ids}
    manifest = json.loads((d / "manifest.json").read_text())
    catalog = items.drop(columns="item_idx").assign(image=items["image"].map(lambda p: None if p is None else Path(p).name))
    return SimpleNamespace(splits=splits, features=features, counts=manifest["counts"], manifest=manifest,
                           catalog=catalog.set_index("item_id").sort_index(), item_idx=dict(zip(items["item_id"], items["item_idx"])),
                           users=list(users))


def test_appended_dir_equals_a_fresh_prepare_of_all_rows_through_raw_ids(world):
    got, want = _by_raw_ids(world.dir2), _by_raw_ids(world.fresh)
    assert got.splits == want.splits  # same rows in the same order, same histories and targets
    assert ("u9", ["i5", "i6", "n1"], ["i5", "i6"]) in got.splits["test"]  # left out of DIR, completed by NEW
    assert got.counts == want.counts
    assert got.counts["interactions"] == len(OLD) + len(NEW) and got.counts["items"] == len(OLD_ITEMS) + len(NEW_ITEMS)
    pd.testing.assert_frame_equal(got.catalog, want.catalog)  # text, photo, train count of every item
    for name, rows in want.features.items():
        assert rows.keys() == got.features[name].keys()
        for item, row in rows.items():
            np.testing.assert_array_equal(got.features[name][item], row, err_msg=f"{name} {item}")
    assert got.manifest["modalities"] == want.manifest["modalities"] == ["id", "text", "image"]


def test_old_users_and_items_keep_their_indices_and_new_ones_come_after(world):
    old, new = _by_raw_ids(world.dir), _by_raw_ids(world.dir2)
    assert {i: new.item_idx[i] for i in old.item_idx} == old.item_idx
    assert sorted(new.item_idx[i] for i in NEW_ITEMS) == list(range(RESERVED_ROWS + len(OLD_ITEMS),
                                                                    RESERVED_ROWS + len(OLD_ITEMS) + len(NEW_ITEMS)))
    assert new.users[:len(old.users)] == old.users and new.users[len(old.users):] == ["u6", "u7"]
    served = fitted_vocabulary(world.dir2 / "workflows" / "inference", "item_id-list").tolist()
    assert served[:len(OLD_ITEMS)] == fitted_vocabulary(world.dir / "workflows" / "inference", "item_id-list").tolist()
    assert sorted(served[len(OLD_ITEMS):]) == NEW_ITEMS
    # the fresh prepare orders by popularity instead: the indices differ, which is why the test above maps them
    assert _by_raw_ids(world.fresh).item_idx != new.item_idx


def test_only_the_new_items_are_encoded(world):
    assert sorted(world.encoded["dir"].texts) == sorted(_text(i) for i in OLD_ITEMS)
    assert sorted(world.encoded["dir2"].texts) == sorted(_text(i) for i in NEW_ITEMS)  # DIR's rows copied
    assert world.encoded["dir2"].images == 1  # n1's photo; DIR's three are not read again
    assert sorted(world.encoded["fresh"].texts) == sorted(_text(i) for i in OLD_ITEMS + NEW_ITEMS)
    image = json.loads((world.dir2 / "features" / "manifest.json").read_text())["modalities"]["image"]
    assert image["appended"]["encoded"] == 1 and image["n_items"] == len(IMAGED)


def test_manifest_records_the_parent_and_dir2_keeps_dirs_settings(world):
    assert world.dir_unchanged_by_append is True  # every file of DIR, byte for byte, and no file added
    parent = json.loads((world.dir2 / "manifest.json").read_text())["parent"]
    assert parent["dir"] == str(world.dir.resolve())
    assert parent["manifest_sha256"] == hashlib.sha256((world.dir / "manifest.json").read_bytes()).hexdigest()
    assert parent["appended"] == {"interactions": len(NEW), "items": len(NEW_ITEMS), "users": 2, "late_interactions": 0}
    config = json.loads((world.dir2 / "manifest.json").read_text())["config"]
    assert (config["max_length"], config["max_text_tokens"], config["image_size"]) == (3, 4, 64)  # no flag given: DIR's
    assert json.loads((world.dir / "manifest.json").read_text())["parent"] is None


def test_appended_dir_passes_verification_and_trains(world, tmp_path, one_torch_thread):
    from odmt_t4r.model.prepared import read_prepared
    from odmt_t4r.trust import verify_prepared

    assert verify_prepared(world.dir2)["files"]
    info = read_prepared(world.dir2)
    assert info.n_index == RESERVED_ROWS + len(OLD_ITEMS) + len(NEW_ITEMS) and info.modalities == ["id", "text", "image"]
    assert main(["train", "--data", str(world.dir2), "--model", "odmt", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--d-model", "16", "--n-heads", "2", "--seq-layers", "1", "--no-progress"]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()


def test_late_interactions_need_allow_late_and_are_sorted_into_the_histories(world, capsys):
    late = _write(world.root, "late", [("u0", "i9", 2), ("u3", "i1", 40), ("u3", "i5", 41)], [])  # u0's at second 2
    before = _hashes(world.dir)
    assert main(["prepare", "--source", "csv", *_csv(late), "--append-to", str(world.dir),
                 "--out", str(world.root / "late-dir")]) == 2
    assert "1 interactions are older than" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (world.root / "late-dir").exists() and _hashes(world.dir) == before
    _prepare([*_csv(late), "--append-to", str(world.dir), "--allow-late", "--out", str(world.root / "late-dir")])
    combined = _write(world.root, "late-all", OLD + [("u0", "i9", 2), ("u3", "i1", 40), ("u3", "i5", 41)], [])
    _prepare(["--interactions", str(combined["inter"]), "--items", str(world.src.old["items"]), *SMALL,
              "--no-features", "--out", str(world.root / "late-fresh")])
    got, want = _by_raw_ids(world.root / "late-dir"), _by_raw_ids(world.root / "late-fresh")
    assert got.splits == want.splits and got.counts == want.counts
    assert ("u0", ["i1", "i9", "i2", "i3"], ["i0", "i1", "i9", "i2"]) in got.splits["test"]  # second 2: after i1 (file order)
    assert json.loads((world.root / "late-dir" / "manifest.json").read_text())["parent"]["appended"]["late_interactions"] == 1
    assert _hashes(world.dir) == before


def _bad(world, name: str, rows: list[tuple] | None = None, items: list[str] | None = None,
         inter_frame: pd.DataFrame | None = None) -> list[str]:
    paths = _write(world.root, name, rows or [("u0", "i1", 50)], items or [])
    if inter_frame is not None:
        inter_frame.to_csv(paths["inter"], index=False)
    return _csv(paths)


@pytest.mark.parametrize("case, expected", [
    ("an item already in DIR", "1 item IDs are already in"),
    ("an unknown item", "2 interactions refer to items in neither"),
    ("a missing column", "missing required column(s) ['timestamp']"),
    ("a timestamp of the wrong type", "1 unparsable timestamps"),
    ("--out is DIR", "is the --append-to DIR: an append writes a new folder"),
    ("--out inside DIR", "is inside the --append-to DIR"),
    ("a setting that differs from DIR's", "--max-length 5 differs from --append-to"),
    ("no --source csv", "--append-to reads new rows from csv or parquet files"),
])
def test_bad_input_is_one_error_line_and_dir_is_never_modified(world, case, expected, capsys):
    out = world.root / ("bad-" + "-".join(case.strip("-").split()[:3]))
    source = ["--source", "csv"]
    extra = []
    if case == "an item already in DIR":
        args = _bad(world, "clash", [("u0", "n9", 50)], ["n9", "i3"])
    elif case == "an unknown item":
        args = _bad(world, "unknown", [("u0", "zz", 50), ("u1", "i2", 51), ("u1", "zz", 52)])
    elif case == "a missing column":
        args = _bad(world, "nocol", inter_frame=pd.DataFrame({"user_id": ["u0"], "item_id": ["i1"]}))
    elif case == "a timestamp of the wrong type":
        args = _bad(world, "badtime", inter_frame=pd.DataFrame({"user_id": ["u0", "u1"], "item_id": ["i1", "i2"],
                                                                  "timestamp": [T0 + 60, "yesterday"]}))
    else:
        args = _bad(world, "fine")
        out = {"--out is DIR": world.dir, "--out inside DIR": world.dir / "next"}.get(case, out)
        extra = ["--max-length", "5"] if case == "a setting that differs from DIR's" else []
        source = [] if case == "no --source csv" else source
    before = _hashes(world.dir)
    assert main(["prepare", *source, *args, "--append-to", str(world.dir), "--out", str(out), *extra]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("odmt prepare: error: ") and expected in last, last
    assert _hashes(world.dir) == before
    assert not out.exists() or out == world.dir
    assert not list(world.root.glob(f".{out.name}.odmt-*"))


def test_a_killed_append_leaves_no_dir2_and_the_next_one_completes(world):
    late_free = _write(world.root, "kill", [("u3", "i0", 60), ("u3", "i2", 61)], [])
    out = world.root / "killed"
    before = _hashes(world.dir)
    cmd = [sys.executable, "-m", "odmt_t4r.cli", "prepare", "--source", "csv", *_csv(late_free),
           "--append-to", str(world.dir), "--out", str(out)]
    env = {**os.environ, FAULT_ENV: "before-swap"}
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILLed with DIR2 staged, before the swap
    assert not out.exists() and _hashes(world.dir) == before
    assert main(cmd[3:]) == 0  # the next run cleans up what the killed one left
    assert (out / "manifest.json").is_file() and not list(world.root.glob(f".{out.name}.odmt-*"))
    assert _hashes(world.dir) == before
