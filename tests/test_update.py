"""`odmt update`: a trained RUN warm-started on a newer prepared DIR2 (new items, new users) and fine-tuned into
RUN2. RUN's weights carry over through the raw item IDs (DIR2 from an append keeps the indices, a fresh prepare
reorders them), new items start from their content as `odmt add-items` gives them, the popularity counts are
DIR2's; RUN is never modified, a killed update resumes to the uninterrupted result, and bad input is one error
line."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from odmt_t4r.catalog_update import add_items, assumed_train_count
from odmt_t4r.cli import main
from odmt_t4r.contract import (ITEM_LIST, RESERVED_ROWS, SEEN_LIST, SPLITS, RunFolder, catalog_item_ids, last_items,
                               run_item_ids)
from odmt_t4r.model import OdmtRecommender
from odmt_t4r.model.modality_store import ModalityStore
from odmt_t4r.model.prepared import read_prepared
from odmt_t4r.output_folder import FAULT_ENV
from odmt_t4r.training import train
from odmt_t4r.training.data import PreparedData
from odmt_t4r.training.evaluate import evaluate_model, evaluate_run
from odmt_t4r.training.selection import train_model
from odmt_t4r.training.update import (COUNTS, ID_TABLE, UpdateConfig, fine_tune_config, recent_users, served_on,
                                      update_run, warm_start_model)
from odmt_t4r.trust import verify_run, write_run_manifest
from tests.synthetic import make_synthetic_prepared
from tests.test_append import CountingImage, CountingText, world  # noqa: F401 (world: DIR, its append DIR2, a fresh prepare)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SIZES = dict(max_length=6, text_tokens=4, image_tokens=4, text_dim=16, image_dim=16, jump=0.05)
FAST = {"d_model": 16, "n_heads": 2, "imt_layers": 1, "seq_layers": 1, "batch_size": 16, "eval_batch_size": 64,
        "patience": 100, "progress": False}
N_OLD, N_NEW = 30, 45  # items of the old DIR, and of DIR2 (the old ones plus 15)
OLD_IDS = [f"item-{k}" for k in range(N_OLD)]  # tests/synthetic.py's raw IDs
NEW_IDS = [f"item-{k}" for k in range(N_OLD, N_NEW)]


def quiet(*_):
    pass


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def keep_content(old: Path, new: Path) -> None:
    """DIR2's copies of the old items keep their frozen features (as an append copies them and a fresh prepare
    encodes the same content again)."""
    n_old = RESERVED_ROWS + N_OLD
    for f in (old / "features").glob("*.npy"):
        grown = np.load(new / "features" / f.name)
        grown[:n_old] = np.load(f)
        np.save(new / "features" / f.name, grown)


def reindexed(src: Path, out: Path, seed: int) -> Path:
    """A copy of a prepared DIR whose items have other indices (as a fresh prepare of all the data gives)."""
    shutil.copytree(src, out)
    items = pd.read_parquet(out / "items.parquet")
    to = np.arange(RESERVED_ROWS + len(items))  # old index -> new index
    to[RESERVED_ROWS:] = RESERVED_ROWS + np.random.default_rng(seed).permutation(len(items))
    for split in SPLITS:
        part = out / split / "part_0.parquet"
        frame = pd.read_parquet(part)
        for col in (ITEM_LIST, SEEN_LIST):
            if col in frame:
                frame[col] = frame[col].map(lambda v: to[np.asarray(v, dtype=np.int64)])
        frame.to_parquet(part, index=False)
    items["item_idx"] = to[items["item_idx"].to_numpy()]
    items.sort_values("item_idx").to_parquet(out / "items.parquet", index=False)
    for f in (out / "features").glob("*.npy"):
        rows = np.load(f)
        moved = np.empty_like(rows)
        moved[to] = rows
        np.save(f, moved)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The old DIR, DIR2 with its indices kept (an append) and DIR2 with them reordered (a fresh prepare)."""
    root = tmp_path_factory.mktemp("update")
    old = make_synthetic_prepared(root / "old", n_users=80, n_items=N_OLD, seed=0, **SIZES)
    stable = make_synthetic_prepared(root / "stable", n_users=120, n_items=N_NEW, seed=1, **SIZES)
    keep_content(old, stable)
    reordered = reindexed(stable, root / "reordered", seed=2)
    assert catalog_item_ids(reordered).tolist() != catalog_item_ids(stable).tolist()
    return SimpleNamespace(root=root, old=old, stable=stable, reordered=reordered)


@pytest.fixture(scope="module")
def run(dirs):
    """RUN: odmt trained on the old DIR."""
    out = dirs.root / "run"
    train.train_run(train.TrainConfig.from_dict({**FAST, "epochs": 12}), dirs.old, out, log=quiet)
    return out


def rows_of(ids: np.ndarray, raw: list[str]) -> torch.Tensor:
    where = {item: row for row, item in enumerate(ids) if item}
    return torch.tensor([where[i] for i in raw])


def grown(run: Path, dir2: Path):
    parent = OdmtRecommender.from_pretrained(run)
    cfg = fine_tune_config(run, parent, UpdateConfig(), {})
    model, kept, new = warm_start_model(run, parent, read_prepared(dir2), cfg)
    return parent, model, kept, new, cfg


def added_like_add_items(parent: OdmtRecommender, dir2: Path, rows: torch.Tensor, seed: int) -> torch.Tensor:
    """The ID vectors `odmt add-items` gives DIR2's items `rows` (in that order) added to RUN."""
    content = [m for m in parent.config.modalities if m != "id"]
    store = ModalityStore.load(dir2 / "features", content, layout=parent.config.token_layout()) if content else None
    feats = store.lookup(rows) if store is not None else {}
    with_added = parent.with_added_items(feats, len(rows), seed=seed)
    return with_added.state_dict()[ID_TABLE][parent.config.n_index:]


def assert_carried_over(parent: OdmtRecommender, model: OdmtRecommender, run: Path, dir2: Path, seed: int) -> None:
    """Every weight of RUN in the grown model, the ID table row by row through the raw IDs; new items' ID rows are
    add-items'; the popularity counts are DIR2's."""
    theirs, mine = run_item_ids(run), catalog_item_ids(dir2)
    old, state = parent.state_dict(), model.state_dict()
    assert set(old) == set(state)
    for name, value in old.items():
        if name not in (ID_TABLE, *COUNTS):
            assert torch.equal(state[name], value), name
    if ID_TABLE in old:
        assert torch.equal(state[ID_TABLE][rows_of(mine, OLD_IDS)], old[ID_TABLE][rows_of(theirs, OLD_IDS)])
        new_rows = rows_of(mine, [i for i in mine if i and i not in set(OLD_IDS)])
        assert torch.equal(state[ID_TABLE][new_rows], added_like_add_items(parent, dir2, new_rows, seed))
    counts = pd.read_parquet(dir2 / "items.parquet", columns=["item_idx", "train_count"])
    assert model.train_count[counts["item_idx"].to_numpy()].tolist() == counts["train_count"].astype(float).tolist()


@pytest.mark.parametrize("which", ["stable", "reordered"])
def test_the_grown_model_holds_runs_weights_and_scores_runs_items_as_run_does(dirs, run, which):
    dir2 = getattr(dirs, which)
    parent, model, kept, new, cfg = grown(run, dir2)
    assert (kept, new) == (N_OLD, N_NEW - N_OLD) and model.config.n_index == RESERVED_ROWS + N_NEW
    assert_carried_over(parent, model, run, dir2, cfg.seed)
    if parent.config.id_init == "content":  # the content rule: RUN's trained projections of the new items' features
        rows = rows_of(catalog_item_ids(dir2), NEW_IDS)
        assert torch.allclose(model.state_dict()[ID_TABLE][rows],
                              parent.item_tower.content_id_vectors(model.item_tower.store.lookup(rows)))

    # before fine-tuning, RUN's items score as in RUN, once RUN's popularity counts are put back
    theirs, mine = run_item_ids(run), catalog_item_ids(dir2)
    src, dst = rows_of(theirs, OLD_IDS), rows_of(mine, OLD_IDS)
    counts = torch.zeros(model.config.n_index)
    counts[dst] = parent.train_count[src]
    model.set_popularity(counts)
    sessions = [["item-3", "item-4", "item-5"], ["item-20", "item-21"], ["item-29", "item-0", "item-1", "item-2", "item-3",
                                                                         "item-4", "item-5", "item-6"]]

    def padded(ids):
        where = {item: row for row, item in enumerate(ids) if item}
        flat = [where[i] for s in sessions for i in s]
        return torch.from_numpy(last_items(np.array(flat), np.cumsum([0] + [len(s) for s in sessions])))

    before, after = parent.score(padded(theirs)), model.score(padded(mine))
    for branch in parent.branch_names:
        torch.testing.assert_close(after[branch][:, dst], before[branch][:, src], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["stable", "reordered"])
def test_served_on_scores_dir2s_catalog_exactly_as_run_with_add_items_does(dirs, run, which):
    """What promotion and the continual benchmark compare an update with: RUN, its popularity counts kept, DIR2's
    new items added by add-items' rule (ID vectors, the median count), every item scored on its DIR2 row."""
    dir2 = getattr(dirs, which)
    parent, cfg = OdmtRecommender.from_pretrained(run), fine_tune_config(run, OdmtRecommender.from_pretrained(run),
                                                                          UpdateConfig(), {})
    served = served_on(run, dir2)
    theirs, mine = run_item_ids(run), catalog_item_ids(dir2)
    new_rows = rows_of(mine, NEW_IDS)
    content = [m for m in parent.config.modalities if m != "id"]
    store = ModalityStore.load(dir2 / "features", content, layout=parent.config.token_layout()) if content else None
    count = assumed_train_count("median", parent.train_count[RESERVED_ROWS:].numpy())
    added = parent.with_added_items(store.lookup(new_rows) if store else {}, len(NEW_IDS), seed=cfg.seed,
                                    assumed_count=count)
    ids_added = np.array([*theirs, *NEW_IDS], dtype=object)
    every = OLD_IDS + NEW_IDS
    sessions = [["item-3", "item-40"], ["item-31", "item-32", "item-0"]]

    def padded(ids):
        where = {item: row for row, item in enumerate(ids) if item}
        flat = [where[i] for s in sessions for i in s]
        return torch.from_numpy(last_items(np.array(flat), np.cumsum([0] + [len(s) for s in sessions])))

    want, got = added.score(padded(ids_added)), served.score(padded(mine))
    assert served.train_count[rows_of(mine, NEW_IDS)].tolist() == [count] * len(NEW_IDS)
    for key in [*parent.branch_names, "fused"]:
        torch.testing.assert_close(got[key][:, rows_of(mine, every)], want[key][:, rows_of(ids_added, every)],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["odmt-imt", "sasrec", "late-fusion", "odmt-auto"])
def test_every_model_odmt_train_makes_updates(dirs, preset, tmp_path):
    run = tmp_path / "run"
    train_model({**FAST, "model": preset, "epochs": 2, "candidate_jobs": 1, "selection_rung": 1}, dirs.old, run,
                log=quiet)
    parent, model, _, _, cfg = grown(run, dirs.reordered)
    assert model.config.name == parent.config.name and model.branch_names == parent.branch_names
    assert_carried_over(parent, model, run, dirs.reordered, cfg.seed)
    summary = update_run(run, dirs.reordered, tmp_path / "run2", {"epochs": 1, "progress": False}, log=quiet)
    assert summary["epochs_run"] == 1
    metrics = evaluate_run(tmp_path / "run2", split="test")
    assert metrics["model"] == parent.config.name and metrics["n_users"] == 120


def test_update_fine_tunes_on_dir2_beats_run_with_added_items_and_leaves_run_unchanged(dirs, run, tmp_path):
    before = hashes(run), hashes(dirs.old)
    run2 = tmp_path / "run2"
    summary = update_run(run, dirs.stable, run2, {"progress": False}, log=quiet)
    assert (hashes(run), hashes(dirs.old)) == before  # RUN and its DIR, byte for byte, no file added

    config = RunFolder(run2).config()
    assert config["parent_run"] == str(run.resolve()) and summary["parent_run"] == str(run.resolve())
    assert config["data"]["dir"] == str(dirs.stable.resolve())
    assert config["update"]["items_kept"] == N_OLD and config["update"]["items_new"] == N_NEW - N_OLD
    assert config["update"]["parent_manifest_sha256"] == hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    defaults = UpdateConfig()
    assert config["train"]["epochs"] == defaults.epochs and config["train"]["patience"] == defaults.patience
    assert config["train"]["lr"] == pytest.approx(train.TrainConfig().lr * defaults.lr_factor)
    # the fusion chosen again on DIR2's validation split; a whole RUN that evaluate reads
    fusion = json.loads((run2 / "fusion.json").read_text())
    assert config["model"]["fusion_weights"] == fusion["weights"]
    assert verify_run(run2)["files"]
    valid = evaluate_run(run2, split="valid")
    assert valid["NDCG@10"] == pytest.approx(fusion["valid_NDCG@10"], abs=1e-6)
    assert summary["fusion"]["valid_NDCG@10"] == fusion["valid_NDCG@10"]
    updated = OdmtRecommender.from_pretrained(run2)
    counts = pd.read_parquet(dirs.stable / "items.parquet", columns=["item_idx", "train_count"])
    assert updated.train_count[counts["item_idx"].to_numpy()].tolist() == counts["train_count"].astype(float).tolist()

    # the stale model: RUN with add-items for the new items (DIR2 keeps RUN's indices: they come after RUN's)
    parent = OdmtRecommender.from_pretrained(run)
    rows = torch.arange(parent.config.n_index, RESERVED_ROWS + N_NEW)
    store = ModalityStore.load(dirs.stable / "features", ["text", "image"], layout=parent.config.token_layout())
    old_counts = pd.read_parquet(dirs.old / "items.parquet")["train_count"].to_numpy()
    stale = parent.with_added_items(store.lookup(rows), len(rows), assumed_count=assumed_train_count("median", old_counts))
    stale_valid = evaluate_model(stale, PreparedData(dirs.stable), "valid")
    print(f"valid NDCG@10 on DIR2: updated {valid['NDCG@10']:.4f}, RUN with add-items {stale_valid['NDCG@10']:.4f}")
    assert valid["NDCG@10"] >= stale_valid["NDCG@10"]


def killed_after_logging_epoch_2(message):
    if "epoch   2/" in message:
        raise KeyboardInterrupt


def epochs(run: Path) -> list[dict]:
    return [{k: r[k] for k in ("epoch", "losses", "kd_weight", "valid")}
            for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def without_path(summary: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(summary, default=str)).items() if k != "run"}


def test_an_interrupted_update_resumes_to_the_uninterrupted_result(dirs, run, tmp_path):
    settings = {"epochs": 3, "progress": False}
    straight = update_run(run, dirs.reordered, tmp_path / "a", settings, log=quiet)
    with pytest.raises(KeyboardInterrupt):  # after epoch 2 is logged, before its checkpoint
        update_run(run, dirs.reordered, tmp_path / "b", settings, log=killed_after_logging_epoch_2)
    assert RunFolder(tmp_path / "b").can_resume()
    resumed = update_run(run, dirs.reordered, tmp_path / "b", settings, resume=True, log=quiet)
    assert without_path(resumed) == without_path(straight)
    assert epochs(tmp_path / "b") == epochs(tmp_path / "a")  # every epoch once, as without the interruption
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "fusion.json").read_text() == (tmp_path / "b" / "fusion.json").read_text()


def odmt_update(*args, point=None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if point:
        env[FAULT_ENV] = point
    proc = subprocess.run([sys.executable, "-m", "odmt_t4r.cli", "update", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_odmt_update_killed_by_sigkill_resumes_with_resume(dirs, run, tmp_path):
    straight = update_run(run, dirs.stable, tmp_path / "a", {"epochs": 2, "progress": False}, log=quiet)
    args = ["--run", run, "--data", dirs.stable, "--out", tmp_path / "b", "--epochs", 2]
    code, _, err = odmt_update(*args, point="train-after-checkpoint")  # dies after epoch 1's checkpoint
    assert code == -signal.SIGKILL, err
    code, out, err = odmt_update(*args, "--resume")
    assert code == 0, err
    assert without_path(json.loads(out)) == without_path(straight)
    assert epochs(tmp_path / "b") == epochs(tmp_path / "a")


@pytest.fixture(scope="module")
def bad_dirs(dirs):
    root = dirs.root / "bad"
    other = dict(SIZES, seed=3, n_users=40)
    return {"fewer-items": make_synthetic_prepared(root / "fewer", n_items=N_OLD - 5, **other),
            "text-only": make_synthetic_prepared(root / "text-only", n_items=N_NEW, modalities=("text",), **other),
            "other-tokens": make_synthetic_prepared(root / "tokens", n_items=N_NEW, **{**other, "text_tokens": 5}),
            "other-length": make_synthetic_prepared(root / "length", n_items=N_NEW, **{**other, "max_length": 5})}


@pytest.mark.parametrize("case, expected", [
    ("fewer-items", "lacks 5 of the 30 items --run"),
    ("text-only", "modalities ['id', 'text'] differs from ['id', 'text', 'image']"),
    ("other-tokens", "text features"),
    ("other-length", "max_length 5 differs from 6"),
    ("out-is-run", "is the --run"),
    ("out-inside-run", "is inside the --run"),
    ("out-not-empty", "is not empty; pass --resume"),
    ("epochs-0", "--epochs must be >= 1, got 0"),
    ("negative-lr", "--lr and --lr-factor must be > 0"),
    ("no-run", "holds no trained model"),
    ("no-data", "is not a prepared DIR"),
])
def test_bad_input_is_one_error_line_and_run_is_never_modified(dirs, run, bad_dirs, tmp_path, capsys, case, expected):
    before = hashes(run)
    data, out, extra = dirs.stable, tmp_path / "run2", []
    if case in bad_dirs:
        data = bad_dirs[case]
    elif case == "out-is-run":
        out = run
    elif case == "out-inside-run":
        out = run / "update"
    elif case == "out-not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "epochs-0":
        extra = ["--epochs", "0"]
    elif case == "negative-lr":
        extra = ["--lr", "-0.1"]
    args = ["--run", run, "--data", data, "--out", out, *extra]
    if case == "no-run":
        args[1] = tmp_path / "nothing"
    if case == "no-data":
        args[3] = tmp_path
    assert main(["update", *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("odmt update: error: ") and expected in err[-1], err[-1]
    assert sum("error:" in line for line in err) == 1
    assert hashes(run) == before
    if case not in ("out-is-run", "out-inside-run", "out-not-empty"):
        assert not out.exists()


def test_resume_continues_only_an_update_of_the_same_unchanged_run(dirs, run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    settings = {"epochs": 1, "progress": False}
    update_run(run, dirs.stable, tmp_path / "run2", settings, log=quiet)
    with pytest.raises(ValueError, match=f"holds an update of {run.resolve()}, not an update of --run"):
        update_run(other, dirs.stable, tmp_path / "run2", settings, resume=True, log=quiet)
    with pytest.raises(ValueError, match="holds a run of `odmt train`, not an update"):
        update_run(other, dirs.stable, run, settings, resume=True, log=quiet)
    update_run(other, dirs.stable, tmp_path / "from-other", settings, log=quiet)
    (other / "log.jsonl").write_text("")  # RUN changed (and re-signed) after the update started from it
    write_run_manifest(other)
    with pytest.raises(ValueError, match="changed since the update"):
        update_run(other, dirs.stable, tmp_path / "from-other", settings, resume=True, log=quiet)
    with pytest.raises(ValueError, match="unknown update settings"):
        update_run(run, dirs.stable, tmp_path / "x", {"epochs": 1, "model": "sasrec"}, log=quiet)
    with pytest.raises(ValueError, match="must be <class 'int'>"):
        update_run(run, dirs.stable, tmp_path / "x", {"epochs": "ten"}, log=quiet)


def test_real_append_and_fresh_prepare_warm_start_alike_and_run2_is_a_whole_run(world, tmp_path, monkeypatch):  # noqa: F811
    """On DIRs of `odmt prepare`: DIR2 from --append-to (RUN's indices kept) and a fresh prepare of all the data
    (reordered by popularity) give the same grown model through the raw IDs; RUN2 evaluates, takes add-items
    and exports as any RUN."""
    run = tmp_path / "run"
    train.train_run(train.TrainConfig.from_dict({**FAST, "batch_size": 4, "epochs": 2}), world.dir, run, log=quiet)
    parent = OdmtRecommender.from_pretrained(run)
    cfg = fine_tune_config(run, parent, UpdateConfig(), {})
    appended, _, new = warm_start_model(run, parent, read_prepared(world.dir2), cfg)
    fresh, _, _ = warm_start_model(run, parent, read_prepared(world.fresh), cfg)
    assert new == 3
    ids_a, ids_f = catalog_item_ids(world.dir2), catalog_item_ids(world.fresh)
    raw = [i for i in ids_a if i]
    assert [i for i in ids_f if i] != raw  # the fresh prepare's order differs
    a, f = rows_of(ids_a, raw), rows_of(ids_f, raw)
    assert torch.equal(appended.state_dict()[ID_TABLE][a], fresh.state_dict()[ID_TABLE][f])
    assert torch.equal(appended.train_count[a], fresh.train_count[f])
    for branch, vectors in appended.catalog_vectors().items():
        torch.testing.assert_close(vectors[a], fresh.catalog_vectors()[branch][f], rtol=0, atol=1e-6)

    run2 = tmp_path / "run2"
    update_run(run, world.dir2, run2, {"epochs": 1, "progress": False}, log=quiet)
    assert evaluate_run(run2, split="test")["n_users"] > 0
    # add-items on RUN2, its encoders the stand-ins DIR2 was prepared with
    import odmt_t4r.features.image  # noqa: F401  (the real encoders register on import: before they are replaced)
    import odmt_t4r.features.text  # noqa: F401
    from odmt_t4r.features.encoders import IMAGE_ENCODERS, TEXT_ENCODERS

    monkeypatch.setitem(TEXT_ENCODERS, "minilm", lambda cfg: CountingText(cfg, []))
    monkeypatch.setitem(IMAGE_ENCODERS, "efficientnet-lite0", lambda cfg: CountingImage(cfg, []))
    monkeypatch.setenv("ODMT_CACHE_DIR", str(tmp_path / "cache"))
    Image.fromarray(np.full((12, 12, 3), 200, dtype=np.uint8)).save(tmp_path / "x9.png")
    pd.DataFrame({"item_id": ["x9"], "text": ["product x9, a newer piece"], "image": ["x9.png"]}).to_csv(
        tmp_path / "more.csv", index=False)
    added = add_items(run2, tmp_path / "more.csv", out=tmp_path / "run3", log=quiet)
    assert added["parent_run"] == str(run2.resolve()) and run_item_ids(tmp_path / "run3")[-1] == "x9"
    from triton_models.export import ServingConfig, export

    manifest = export(run2, tmp_path / "repo", ServingConfig(k=5), check_sessions=5, log=quiet)
    assert manifest["run"] == str(run2.resolve()) and manifest["data_dir"] == str(world.dir2.resolve())


def test_the_recent_window_trains_only_the_rows_of_users_with_new_interactions(world, tmp_path, monkeypatch):  # noqa: F811
    """--window recent: DIR2's users with an interaction DIR lacks (the same raw users whether DIR2 is an append or
    a fresh prepare), and the fine-tune's batches hold exactly their train rows; the setting survives a resume."""
    from workflows.sessions import USER_COL, fitted_vocabulary

    from odmt_t4r.contract import PreparedDir
    vocab_dir = PreparedDir(world.dir2).workflow("train")
    touched = recent_users(world.dir, world.dir2)
    vocab = fitted_vocabulary(vocab_dir, USER_COL)
    assert sorted(str(vocab[r - RESERVED_ROWS]) for r in touched) == ["u0", "u2", "u6", "u7", "u9"]
    fresh_vocab = fitted_vocabulary(PreparedDir(world.fresh).workflow("train"), USER_COL)
    assert sorted(str(fresh_vocab[r - RESERVED_ROWS]) for r in recent_users(world.dir, world.fresh)) == \
        ["u0", "u2", "u6", "u7", "u9"]
    with pytest.raises(ValueError, match="no interaction"):
        recent_users(world.dir, world.dir)

    run = tmp_path / "run"
    train.train_run(train.TrainConfig.from_dict({**FAST, "batch_size": 4, "epochs": 1}), world.dir, run, log=quiet)
    seen: list[tuple] = []
    forward = OdmtRecommender.forward

    def spy(self, items, *args, **kwargs):
        seen.extend(tuple(int(i) for i in row if i) for row in items)
        return forward(self, items, *args, **kwargs)

    monkeypatch.setattr(OdmtRecommender, "forward", spy)
    update_run(run, world.dir2, tmp_path / "run2", {"epochs": 1, "window": "recent", "progress": False}, log=quiet)
    split = pd.read_parquet(PreparedDir(world.dir2).split("train") / "part_0.parquet")
    width = read_prepared(world.dir2).max_length + 1
    rows = [(u, tuple(int(i) for i in items[-width:])) for u, items in zip(split["user_idx"], split[ITEM_LIST])]
    want = sorted(row for u, row in rows if u in set(touched.tolist()))
    assert want and sorted(seen) == want  # exactly the touched users' rows, once each (one epoch)
    assert len(want) < len(rows)
    assert RunFolder(tmp_path / "run2").config()["update"]["settings"]["window"] == "recent"
    seen.clear()  # resumed without --window: RUN2's own window, not the default
    update_run(run, world.dir2, tmp_path / "run2", {"epochs": 2, "progress": False}, resume=True, log=quiet)
    assert sorted(seen) == want


def test_fine_tuning_starts_from_the_grown_model(dirs, run, tmp_path):
    _, model, _, _, _ = grown(run, dirs.reordered)
    update_run(run, dirs.reordered, tmp_path / "run2", {"epochs": 1, "lr": 1e-12, "progress": False}, log=quiet)
    saved = torch.load(tmp_path / "run2" / "model.pt", weights_only=True)
    start = model.state_dict()
    assert saved.keys() == start.keys()
    for name, value in start.items():  # one epoch at a vanishing learning rate: where it started
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)
