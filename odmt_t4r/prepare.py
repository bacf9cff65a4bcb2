"""`odmt prepare`: a source -> DIR holding the fitted workflows, the leave-one-out parquet splits,
the item catalog, frozen item features and manifest.json (written last: its presence means DIR is whole).

DIR layout (the contract `odmt train` reads):
    manifest.json            format, source, config, counts, modalities, versions, file hashes, parent
    items.parquet            item_idx (categorified), item_id (raw), text, image (relative path), the catalog's
                             attribute columns (typed: data/attributes.py), train_count
    interactions.parquet     user_id, item_id, timestamp (epoch ms): every interaction the splits hold, in input order
    train/ valid/ test/      parquet + schema.pbtxt: item_id-list (ends with the target), user_idx, seen-list
    workflows/{sessions,train,valid,test,inference}/   saved nvt.Workflow objects
    categories/              the Categorify vocabularies
    features/                text.npy, text_mask.npy, image.npy, image_mask.npy, manifest.json
    raw_images/              the fashion source's product photos (generated sources only; not hashed)
    cold/items.csv, cold/test.parquet   with --cold-items F only: the held-out items and their test rows

Cold start (`--cold-items F`, see `hold_out_cold_items`): floor(F x N) of the N items with interactions,
those whose first interaction (timestamp, then input row) comes last, are held out. Every interaction
with them is dropped before the workflows run, so they are in no vocabulary, feature, split or count;
the train/valid/test splits are leave-one-out on the remaining interactions. A user whose last
interaction is a held-out item gets a cold test row: that item is the target, the user's earlier
non-held-out items the history (users with no such item get none). `odmt add-items` adds the held-out
items from cold/items.csv; `odmt evaluate --slice cold` scores the rows.

Append (`--append-to DIR`, odmt_t4r/append.py): DIR's interactions and catalog plus new ones -> a new
folder in which DIR's users and items keep their indices; `parent` in its manifest names DIR.

The folder is built next to DIR and swapped in whole (odmt_t4r/output_folder.py): an existing DIR is
replaced only when odmt wrote it, and a run killed at any point leaves the old DIR or the new one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from odmt_t4r.contract import COLD_DIR, COLD_ITEMS, COLD_TEST, COLD_TEST_COLUMNS, PREPARED_INTERACTIONS, RESERVED_ROWS
from odmt_t4r.contract import PREPARED_FORMAT as FORMAT, read_split  # noqa: F401 (re-exported)
from odmt_t4r.data.base import RawData, note_empty_image_cells
from odmt_t4r.data.sources import SOURCES
from odmt_t4r.flags import add_flags, flag, given

INTERACTIONS = PREPARED_INTERACTIONS  # DIR file: the interactions the splits hold, what --append-to extends


@dataclass
class PrepareConfig:
    """What `odmt prepare` does; its flags are generated from these fields (odmt_t4r/flags.py)."""

    source: str = field(default="fashion", metadata=flag("where the data comes from", choices=sorted(SOURCES)))
    out: str = field(default="data/fashion", metadata=flag(
        "output folder DIR (replaced only when preparation succeeds, and only if odmt wrote it)", required=True))
    interactions: str | None = field(default=None, metadata=flag(
        "csv/parquet: user_id (or session_id), item_id, timestamp"))
    items: str | None = field(default=None, metadata=flag("csv/parquet: item_id, optional text, optional image (file path)"))
    timestamp_format: str | None = field(default=None, metadata=flag(
        "csv/parquet: the timestamp column's strftime format (e.g. '%d/%m/%Y %H:%M'), or epoch-s / epoch-ms",
        none="epoch seconds or milliseconds (by magnitude) or ISO 8601"))
    max_length: int = field(default=20, metadata=flag("history length the model sees (the paper: 12 on short histories)"))
    min_interactions: int = field(default=3, metadata=flag("users with fewer interactions are left out"))
    seed: int = field(default=0, metadata=flag("fashion generator seed"))
    n_items: int | None = field(default=None, metadata=flag("fashion catalog size", none="the generator's"))
    fashion_mnist_dir: str | None = field(default=None, metadata=flag(
        "the Fashion-MNIST files of the fashion source's photos", none="the dataset-fashion-mnist package's"))
    features: bool = field(default=True, metadata=flag("the frozen text/image features (--no-features: ID only)"))
    max_text_tokens: int = 30
    image_size: int = 128
    partitions: int = field(default=1, metadata=flag(
        ">1 splits the interactions into Dask partitions (by user ranges first); a cluster: at least one per worker"))
    dask_workers: int = field(default=0, metadata=flag(
        "run the workflows on a local Dask cluster of N worker processes (LocalCUDACluster on GPUs), started on "
        "127.0.0.1 and closed at the end", metavar="N"))
    dask_scheduler: str | None = field(default=None, metadata=flag(
        "run the workflows on the running Dask cluster whose scheduler is at ADDRESS (tcp://host:port)", metavar="ADDRESS"))
    cold_items: float = field(default=0.0, metadata=flag(
        "hold out this share of the items with interactions, those whose first interaction comes last, from training "
        "entirely; DIR/cold/ then holds them and the test rows whose target is one of them (`odmt add-items`, "
        "`odmt evaluate --slice cold`)", metavar="FRACTION"))
    append_to: str | None = field(default=None, metadata=flag(
        "a prepared DIR to extend with the rows of --interactions (and the new catalog items of --items): its users "
        "and items keep their indices, new ones are appended, the splits are rebuilt over all interactions and only "
        "the new items are encoded; DIR's settings are kept, DIR is never modified, --out must be another folder",
        metavar="DIR"))
    allow_late: bool = field(default=False, metadata=flag(
        "with --append-to: accept new interactions older than DIR's newest (each history is ordered by time again)"))

    def validate(self) -> None:
        """Refuses, before any work, settings that would fail later or be silently ignored."""
        from odmt_t4r.data.base import EPOCH_UNITS

        for name in ("max_length", "partitions", "max_text_tokens", "image_size", "n_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.dask_workers < 0:
            raise ValueError(f"--dask-workers must be 0 or more, got {self.dask_workers}")
        if self.dask_workers and self.dask_scheduler:
            raise ValueError("--dask-workers starts a local cluster and --dask-scheduler uses a running one; give one of them")
        if not 0.0 <= self.cold_items < 1.0:
            raise ValueError(f"--cold-items is the share of the catalog held out, in [0, 1), got {self.cold_items}")
        if self.min_interactions < 3:
            raise ValueError(f"min_interactions must be at least 3 (a train item, a validation and a test target), got {self.min_interactions}")
        if self.append_to:
            if self.source not in ("csv", "parquet"):
                raise ValueError(f"--append-to reads new rows from csv or parquet files, not the '{self.source}' source: "
                                 "give --source csv (or parquet) and --interactions NEW")
            if not self.interactions:
                raise ValueError("--append-to needs --interactions NEW (the new rows), and --items NEW_ITEMS for new catalog items")
            if self.cold_items:
                raise ValueError("--cold-items applies to a fresh prepare, not to --append-to: prepare all the data afresh to hold items out")
        elif self.allow_late:
            raise ValueError("--allow-late applies to --append-to only")
        if self.source not in ("csv", "parquet") and (self.interactions or self.items or self.timestamp_format):
            raise ValueError(f"--interactions, --items and --timestamp-format apply to the csv and parquet sources, not '{self.source}'")
        fmt = self.timestamp_format
        if fmt is not None and fmt not in EPOCH_UNITS and "%" not in fmt:
            raise ValueError(f"--timestamp-format {fmt!r} is neither a strftime format (e.g. '%d/%m/%Y %H:%M') nor epoch-s / epoch-ms")


def _step(msg: str) -> float:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


@contextmanager
def dask_cluster(cfg: PrepareConfig):
    """The Dask client the workflows run on, set as merlin's global client: None (one process), a
    cluster of `dask_workers` one-thread workers started here on 127.0.0.1 (dask-cuda's
    LocalCUDACluster where NVTabular runs on cuDF, else a LocalCluster of processes), or the running
    scheduler at `dask_scheduler`. A cluster started here is closed on the way out, failures included;
    a running one is left running. On the way out merlin's global client is reset: merlin-core 23.08's
    `global_dask_client()` takes a client as alive while its cluster lists workers, closed or not, so
    the next workflow (the inference one, fitted after the cluster work) crashed in the executor's
    `_clear_worker_cache` (`client.run` on a closed client: 'NoneType' has no attribute 'broadcast')."""
    if cfg.dask_workers <= 0 and not cfg.dask_scheduler:
        yield None
        return
    from distributed import Client, LocalCluster
    from merlin.core.utils import set_dask_client

    from workflows.sessions import on_gpu

    with ExitStack() as stack:
        if cfg.dask_scheduler:
            try:
                client = stack.enter_context(Client(cfg.dask_scheduler, timeout="10s"))
            except (OSError, TimeoutError, ValueError) as exc:
                raise ValueError(f"--dask-scheduler {cfg.dask_scheduler}: cannot connect: {exc}") from None
        else:
            if on_gpu():
                from dask_cuda import LocalCUDACluster as cluster_type  # one worker per GPU
                options = {}
            else:
                cluster_type, options = LocalCluster, {"processes": True}
            cluster = stack.enter_context(cluster_type(n_workers=cfg.dask_workers, threads_per_worker=1,
                                                       host="127.0.0.1", dashboard_address=None, **options))
            client = stack.enter_context(Client(cluster))
        # Client.close() leaves a passed-in cluster running (dask/distributed#1307), and merlin-core 23.08 then hands out the closed client ('broadcast' crash)
        stack.callback(set_dask_client, "auto")
        set_dask_client(client)
        yield client


def _cluster_workers(client) -> int:
    return 0 if client is None else len(client.scheduler_info()["workers"])


# Generated product photos: the project's files, but only the feature build reads them, so they are
# listed as a generated folder instead of hashed one by one (thousands of PNGs in the manifest).
GENERATED_FOLDERS = ("raw_images",)


def run_workflows(inter: pd.DataFrame, vocab: pd.Series, scfg, stage: Path, client=None,
                  partitions: int = 1, users: pd.Series | None = None) -> tuple[dict, dict[str, int]]:
    """The session + split workflows on `inter` (with its input-row column) in one process or on `client`'s
    cluster (at least one partition per worker, split by user ranges), the splits written to stage/<split>
    and the vocabularies to stage/categories; returns (fitted workflows by name, rows per split). `users`:
    the user vocabulary (default: every user, sorted)."""
    import nvtabular as nvt

    from workflows import sessions as W

    npartitions = max(1, partitions, _cluster_workers(client))
    if client is not None:
        _step(f"  on Dask: {_cluster_workers(client)} workers at {client.scheduler.address}, {npartitions} partitions")
    ds = nvt.Dataset(inter, npartitions=npartitions)
    if npartitions > 1:
        ds = W.partition_by_user(ds, npartitions)  # the Groupby needs each user's rows in one partition
    workflows, splits = W.run_session_workflows(ds, vocab, scfg, str(stage / "categories"), users)
    split_rows = {}
    for split in W.SPLITS:
        # one file per partition, in order: merlin writes several partitions per file through a subgraph
        # that cannot hold a cluster's persisted futures ('Future' object is not subscriptable)
        splits[split].to_parquet(str(stage / split), output_files=splits[split].npartitions)
        split_rows[split] = len(read_split(stage / split, [W.USER_IDX]))
        _step(f"  {split}: {split_rows[split]:,} rows")
    return workflows, split_rows


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    names = ["odmt-t4r", "nvtabular", "merlin-core", "transformers4rec", "torch", "pandas", "numpy", "dask"]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except Exception:
            out[n] = "not installed"
    return out


def prepare(cfg: PrepareConfig, force: bool = False, given: set[str] | None = None) -> dict:
    """Runs the whole stage; returns the manifest. DIR is built in a sibling folder and swapped in only
    on success (see OutputFolder): on failure an earlier DIR is left as it was. An existing DIR is
    replaced only when odmt wrote it; `force` moves any other folder aside, deleting nothing.
    With `append_to`, the parent DIR is verified and only read (odmt_t4r/append.py); its settings are
    kept, and `given` names the fields the user set (None: those that differ from their defaults)."""
    from odmt_t4r.output_folder import OutputFolder

    cfg.validate()
    parent = None
    if cfg.append_to:
        from odmt_t4r.append import ParentDir

        parent = ParentDir.read(cfg.append_to, cfg.out)  # refuses --out equal to or nested with DIR
        cfg = parent.settings(cfg, PrepareConfig(), given)
    with OutputFolder(cfg.out, FORMAT, force=force, what="prepared folder",
                      log=lambda msg: _step(msg)) as folder:
        inputs = (_fresh_inputs(cfg, folder.stage) if parent is None
                  else PrepareInputs(**parent.inputs(cfg, folder.stage, _step)))
        manifest = _prepare(cfg, folder.stage, inputs)
        if parent is not None:
            parent.check_unchanged()  # what DIR2 was built from is still DIR
        folder.commit()
    return manifest


@dataclass
class PrepareInputs:
    """What the workflows, the catalog and the features are built from: every interaction and the whole
    catalog (`raw`), the interactions with their input-row column (`inter`) and the item vocabulary; for
    an append also the user vocabulary and the parent's features and manifest entry."""

    raw: RawData
    inter: pd.DataFrame
    vocab: pd.Series
    users: pd.Series | None = None  # None: every user, in sorted order
    cold: "ColdHoldout | None" = None
    parent_features: Path | None = None  # an append: the parent DIR's features, its rows kept as they are
    parent_n_index: int = RESERVED_ROWS  # rows below it are the parent's
    parent: dict | None = None  # an append: the manifest's `parent` entry


def _fresh_inputs(cfg: PrepareConfig, stage: Path) -> PrepareInputs:
    from odmt_t4r.data import load_source
    from workflows import sessions as W

    t0 = _step(f"loading source '{cfg.source}'")
    raw = load_source(cfg.source, interactions=cfg.interactions, items=cfg.items, seed=cfg.seed,
                      n_items=cfg.n_items, fashion_mnist_dir=cfg.fashion_mnist_dir, workdir=str(stage),
                      timestamp_format=cfg.timestamp_format)
    note_empty_image_cells(raw.items, raw.items_path, raw.notes)
    inter = raw.interactions.copy()
    inter[W.ROW_COL] = range(len(inter))  # input-file order: the tiebreak for equal timestamps
    cold = None
    if cfg.cold_items > 0:
        inter, raw.items, cold = hold_out_cold_items(inter, raw.items, cfg.cold_items)
        raw.interactions = inter.drop(columns=[W.ROW_COL])
        _step(f"  cold start: held out {len(cold.items):,} items (first interaction from {cold.first_interaction_from} ms), "
              f"{cold.interactions_dropped:,} interactions, {len(cold.test):,} cold test users")
    _step(f"  loaded in {time.perf_counter() - t0:.1f}s")
    return PrepareInputs(raw, inter, W.item_vocabulary(inter, raw.items), cold=cold)


def _prepare(cfg: PrepareConfig, stage: Path, inputs: PrepareInputs) -> dict:
    import nvtabular as nvt

    from odmt_t4r.trust import write_manifest
    from workflows import sessions as W

    raw, inter, vocab, cold = inputs.raw, inputs.inter, inputs.vocab, inputs.cold
    raw.check_history_lengths(cfg.min_interactions)
    _step(f"  {len(inter):,} interactions, {inter.user_id.nunique():,} users, {len(raw.items):,} catalog items")
    inter.drop(columns=[W.ROW_COL]).to_parquet(stage / INTERACTIONS, index=False)

    with dask_cluster(cfg) as client:
        t = _step("NVTabular workflows: Categorify + Groupby (by timestamp, then input row) + leave-one-out splits")
        scfg = W.SessionConfig(max_length=cfg.max_length, min_interactions=cfg.min_interactions)
        workflows, split_rows = run_workflows(inter, vocab, scfg, stage, client, cfg.partitions, inputs.users)
        for name, wf in workflows.items():
            wf.save(str(stage / "workflows" / name))
        _step(f"  done ({time.perf_counter() - t:.1f}s)")

    cats = str(stage / "categories")
    inf = W.inference_workflow(vocab, scfg, cats)
    inf.fit(nvt.Dataset(pd.DataFrame({W.ITEM_LIST: [[str(vocab.iloc[0])]]})))  # fixed vocabulary: no statistics
    inf.save(str(stage / "workflows" / "inference"))

    items = _item_table(raw.items, vocab, stage)
    train_items = read_split(stage / "train", [W.ITEM_LIST])[W.ITEM_LIST]
    counts = pd.Series(pd.Series(list(train_items)).explode().dropna().astype("int64")).value_counts()
    items["train_count"] = items["item_idx"].map(counts).fillna(0).astype("int64")
    items.to_parquet(stage / "items.parquet", index=False)
    if cold is not None:
        cold.write(stage, pd.Series(items["item_idx"].to_numpy(), index=items["item_id"].to_numpy()))

    n_index = int(items["item_idx"].max()) + 1
    feature_manifest = None
    modalities = raw.modalities
    if cfg.features and len(modalities) > 1:
        from odmt_t4r.features.build import FeatureConfig, build_item_features, extend_item_features
        fcfg = FeatureConfig(modalities=tuple(m for m in modalities if m != "id"),
                             max_text_tokens=cfg.max_text_tokens, image_size=cfg.image_size)
        abs_items = items.copy()
        if "image" in abs_items:
            abs_items["image"] = abs_items["image"].map(lambda p: None if pd.isna(p) else p if os.path.isabs(p) else str(stage / p))
        if inputs.parent_features is None:
            t = _step(f"frozen item features for {modalities[1:]}")
            feature_manifest = build_item_features(abs_items, n_index, stage / "features", fcfg)
        else:
            t = _step(f"frozen item features for {modalities[1:]}: the parent's {inputs.parent_n_index - RESERVED_ROWS:,} "
                      f"items kept, {n_index - inputs.parent_n_index:,} new items encoded")
            feature_manifest = extend_item_features(inputs.parent_features, inputs.parent_n_index, abs_items, n_index,
                                                    stage / "features", fcfg)
        _step(f"  done ({time.perf_counter() - t:.1f}s)")

    seq_len = read_split(stage / "test", [W.SEEN_LIST])[W.SEEN_LIST].map(len) + 1
    manifest = {
        "format": FORMAT,
        "source": cfg.source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(cfg),
        "max_length": cfg.max_length,
        "n_index": n_index,
        "modalities": modalities if cfg.features else ["id"],
        "counts": {
            "users": int(inter.user_id.nunique()),
            "users_evaluated": split_rows["test"],
            "users_dropped_too_short": int(inter.user_id.nunique()) - split_rows["test"],
            "items": len(raw.items),
            "interactions": len(inter),
            "mean_sequence_length": round(float(seq_len.mean()), 2),
            "rows": split_rows,
        },
        "notes": raw.notes,
        "features": feature_manifest,
        "cold": None if cold is None else cold.summary(cfg.cold_items),
        "parent": inputs.parent,  # an append's parent DIR: its path and the sha256 of its manifest.json
        "versions": _versions(),
    }
    generated = [g for g in GENERATED_FOLDERS if (stage / g).is_dir()]
    return write_manifest(stage, manifest, generated_folders=generated)  # last: hashes, signature


@dataclass
class ColdHoldout:
    """The held-out items of `--cold-items` and their test rows (raw IDs until `write` maps the history)."""

    items: pd.DataFrame  # catalog rows of the held-out items, by first interaction
    test: pd.DataFrame  # user_id, history_ids (raw, time order), target_id, earlier_cold_ids
    items_with_interactions: int
    first_interaction_from: int  # epoch ms: the earliest first interaction among the held-out items
    interactions_dropped: int
    users_without_history: int  # cold-target users whose every earlier item is held out too: no row

    def write(self, stage: Path, index: pd.Series) -> None:
        """COLD_ITEMS (image paths relative to it when inside DIR, so DIR can move) and COLD_TEST, whose
        history is mapped through `index` (raw item ID -> DIR index)."""
        folder = stage / COLD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        items = self.items.copy()
        if "image" in items:
            items["image"] = items["image"].map(lambda p: None if pd.isna(p) else
                                                os.path.relpath(p, folder) if str(p).startswith(str(stage)) else p)
        items.to_csv(stage / COLD_ITEMS, index=False)
        test = self.test.assign(history=self.test["history_ids"].map(lambda ids: index[list(ids)].to_numpy(dtype="int64")))
        test[list(COLD_TEST_COLUMNS)].to_parquet(stage / COLD_TEST, index=False)

    def summary(self, fraction: float) -> dict:
        return {"fraction": fraction, "items": len(self.items), "items_with_interactions": self.items_with_interactions,
                "rule": "floor(fraction x items with interactions) items with the latest first interaction "
                        "(timestamp, then input row); all their interactions dropped",
                "first_interaction_from_ms": self.first_interaction_from, "interactions_dropped": self.interactions_dropped,
                "test_users": len(self.test), "cold_target_users_without_history": self.users_without_history,
                "files": [COLD_ITEMS, COLD_TEST]}


def hold_out_cold_items(inter: pd.DataFrame, items: pd.DataFrame, fraction: float
                        ) -> tuple[pd.DataFrame, pd.DataFrame, ColdHoldout]:
    """(interactions with `_row`, catalog) -> (interactions without the held-out items, catalog without
    them, the hold-out). Held out: floor(fraction x N) of the N items with interactions whose first
    interaction, ordered by (timestamp, input row) like the sessions, comes last."""
    from workflows.sessions import ITEM_COL, ROW_COL, TIME_COL, USER_COL

    timeline = inter.sort_values([TIME_COL, ROW_COL], kind="stable")
    first = timeline.drop_duplicates(ITEM_COL)  # each item's first interaction, in time order
    n_cold = int(fraction * len(first) + 1e-9)  # floor, without float error turning 29.0 into 28
    if n_cold < 1:
        raise ValueError(f"--cold-items {fraction} holds out no item: only {len(first)} items have interactions")
    cold_ids = first[ITEM_COL].iloc[len(first) - n_cold:]
    cold = set(cold_ids)
    is_cold = timeline[ITEM_COL].isin(cold)
    last = timeline.drop_duplicates(USER_COL, keep="last")
    targets = last.loc[last[ITEM_COL].isin(cold), [USER_COL, ITEM_COL]]
    # the cold-target users' rows before their target (the timeline is in each user's session order)
    earlier = timeline[timeline[USER_COL].isin(set(targets[USER_COL])) & ~timeline.index.isin(targets.index)]
    cold_earlier = is_cold[earlier.index]

    def lists(rows: pd.DataFrame) -> pd.Series:  # user -> their items, in session order
        return rows.groupby(USER_COL, sort=False)[ITEM_COL].agg(list)

    test = targets.rename(columns={ITEM_COL: "target_id"}).set_index(USER_COL)
    test["history_ids"] = lists(earlier[~cold_earlier])
    test["earlier_cold_ids"] = lists(earlier[cold_earlier])
    has_history = test["history_ids"].notna()
    test = test[has_history].reset_index()
    test["earlier_cold_ids"] = test["earlier_cold_ids"].map(lambda v: v if isinstance(v, list) else [])
    cold_items = items.set_index(ITEM_COL).loc[cold_ids].reset_index()
    holdout = ColdHoldout(items=cold_items, test=test, items_with_interactions=len(first),
                          first_interaction_from=int(first[TIME_COL].iloc[len(first) - n_cold]),
                          interactions_dropped=int(is_cold.sum()), users_without_history=int((~has_history).sum()))
    kept_items = items[~items[ITEM_COL].isin(cold)].reset_index(drop=True)
    return inter[~inter[ITEM_COL].isin(cold)].reset_index(drop=True), kept_items, holdout


def _item_table(items: pd.DataFrame, vocab: pd.Series, stage: Path) -> pd.DataFrame:
    idx = pd.Series(range(RESERVED_ROWS, RESERVED_ROWS + len(vocab)), index=vocab.values)
    table = items.copy()
    table.insert(0, "item_idx", table["item_id"].map(idx).astype("int64"))
    if "image" in table:  # store paths relative to DIR when they live inside it, so DIR can move
        table["image"] = table["image"].map(
            lambda p: None if pd.isna(p) else os.path.relpath(p, stage) if str(p).startswith(str(stage)) else p)
    return table.sort_values("item_idx").reset_index(drop=True)


def summary(m: dict) -> str:
    c = m["counts"]
    return (f"prepared {m['source']}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions; "
            f"mean sequence length {c['mean_sequence_length']}; modalities {', '.join(m['modalities'])}; "
            f"rows train {c['rows']['train']:,} / valid {c['rows']['valid']:,} / test {c['rows']['test']:,}"
            + (f"; {c['users_dropped_too_short']} users with < 3 interactions left out" if c['users_dropped_too_short'] else "")
            + (f"; cold start: {m['cold']['items']:,} items held out, {m['cold']['test_users']:,} cold test users"
               if m.get("cold") else "")
            + (f"; appended to {m['parent']['dir']}: {m['parent']['appended']['interactions']:,} interactions, "
               f"{m['parent']['appended']['items']:,} new items, {m['parent']['appended']['users']:,} new users"
               if m.get("parent") else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, PrepareConfig)
    p.add_argument("--force", action="store_true",
                   help="replace an --out folder odmt did not write: it is moved aside to DIR.backup-<time>, never deleted")


def run(args: argparse.Namespace) -> int:
    chosen = given(args, PrepareConfig)
    cfg = PrepareConfig(**chosen)
    manifest = prepare(cfg, force=args.force, given=set(chosen))  # errors: one `odmt prepare: error:` line from odmt_t4r.cli
    print(summary(manifest))
    print(f"wrote {Path(cfg.out).resolve()}")
    return 0
