"""Session workflows: raw interactions -> one time-ordered list per user -> leave-one-out splits.

    interactions (user_id, item_id, timestamp, _row)
      session_workflow:  Categorify(item_id, fixed vocabulary) -> Groupby(user_id, sort by timestamp
                         then input row) -> item_id-list, item_id-count          [one row per user]
      split_workflow:    Filter(count >= 3) -> ListSlice per split -> Tags (list bounds in the schema)
                           test : item_id-list = last L+1 items (target = last),  seen-list = all before it
                           valid: item_id-list = L+1 items ending at the 2nd-to-last, seen-list = all before it
                           train: items[:-2] cut into windows of <= L+1 (TrainingWindows)
      inference_workflow: raw item_id-list -> Categorify(same vocabulary) -> ListSlice(-L); drops no row.

Item index: 0 padding, 1 null, 2 out-of-vocabulary, 3.. the catalog ordered by popularity (after an
`odmt prepare --append-to`: the parent's order, then the new items; see `extend_vocabulary`). The same
code runs on pandas (CPU) and cuDF (GPU, picked by `nvt.Dataset` itself where `on_gpu()`), in one
process or on the Dask cluster that is merlin's global client (odmt_t4r.prepare.dask_cluster).
Several partitions need `partition_by_user` first, so that no user's history is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import nvtabular as nvt
from merlin.schema import Tags
from nvtabular import ops

from odmt_t4r.contract import ITEM_LIST, RESERVED_ROWS, SEEN_LIST, SPLITS, USER_IDX
from workflows.ops import Groupby, ListSlice, TrainingWindows

# With pandas 2 (the GPU route: cuDF 24.04 needs it), dask turns object columns into pyarrow strings,
# NVTabular's list columns included ('[3 4 5]'); dask 2023.7 with pandas 1.5 (the CPU pins) never does.
dask.config.set({"dataframe.convert-string": False})

USER_COL, ITEM_COL, TIME_COL, ROW_COL = "user_id", "item_id", "timestamp", "_row"
ITEM_COUNT = "item_id-count"  # the Groupby's count of a user's items (the split rows do not keep it)
ITEM_TAGS = [Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.LIST]


@dataclass
class SessionConfig:
    max_length: int = 20  # history items the model sees; split lists hold max_length + 1 (history + target)
    min_interactions: int = 3  # leave-one-out needs one train item, a valid target and a test target


def on_gpu() -> bool:
    """True where NVTabular runs on cuDF: merlin.io.Dataset's own rule for `cpu=None` (a visible GPU and
    an importable cudf), so the cluster type and the data engine always agree."""
    from merlin.core.compat import HAS_GPU, cudf
    return bool(HAS_GPU) and cudf is not None


def item_vocabulary(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.Series:
    """The whole catalog, most interacted first (stable on catalog order), so items with no
    interactions still get an index and can be recommended from their content."""
    counts = interactions[ITEM_COL].value_counts(sort=False)
    order = pd.DataFrame({ITEM_COL: items[ITEM_COL].values, "n": items[ITEM_COL].map(counts).fillna(0).values})
    order = order.sort_values("n", ascending=False, kind="stable")
    return pd.Series(order[ITEM_COL].values, name=ITEM_COL)


def user_vocabulary(interactions) -> pd.Series:
    """Users in sorted order (a pandas or dask frame), fixed before the split workflows run."""
    users = interactions[USER_COL].drop_duplicates()
    users = users.compute() if hasattr(users, "compute") else users
    return pd.Series(np.sort(users.to_numpy()), name=USER_COL)


def fitted_vocabulary(workflow_dir, column: str) -> pd.Series:
    """The vocabulary a saved workflow's Categorify encodes `column` with, in index order (value k has
    index RESERVED_ROWS + k). `Workflow.save` copies it to <workflow_dir>/categories/unique.<column>.parquet
    (nvtabular/workflow/workflow.py:335, ops/categorify.py `_copy_storage`); read as data, nothing unpickled."""
    path = Path(workflow_dir) / "categories" / f"unique.{column}.parquet"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the fitted vocabulary of '{column}' ({exc}); prepare that DIR again") from None
    if column not in frame.columns or list(frame.index) != list(range(RESERVED_ROWS, RESERVED_ROWS + len(frame))):
        raise ValueError(f"{path} is not a Categorify vocabulary of '{column}' indexed from {RESERVED_ROWS}; prepare that DIR again")
    return pd.Series(frame[column].to_numpy(dtype=object), name=column)


def extend_vocabulary(fitted: pd.Series, values) -> pd.Series:
    """`fitted` followed by the `values` it lacks, in their order: every fitted value keeps its index.
    The one place a vocabulary grows. NVTabular has no incremental fit (NVTabular #798, #349): fitting a
    Categorify from data builds the whole vocabulary anew, reindexing every value, and a column given
    `vocabs` is skipped by `fit` (ops/categorify.py:381-389); a loaded workflow cannot even be refitted,
    since `Workflow.load` re-points `categories` but not `vocabs` (workflow/workflow.py:454), which still
    name the folder it was fitted in, and `clear()` restores those (ops/categorify.py:416-418). So the
    grown vocabulary is given to new workflows as `vocabs`, built like a fresh prepare's."""
    values = pd.Series(np.asarray(values, dtype=object))
    new = pd.unique(values[~values.isin(set(fitted))])
    return pd.Series(np.concatenate([fitted.to_numpy(dtype=object), np.asarray(new, dtype=object)]), name=fitted.name)


def partition_by_user(dataset: nvt.Dataset, npartitions: int) -> nvt.Dataset:
    """Moves every user's interactions into one partition (the Groupby needs whole histories), in
    one process or on a cluster. Partitions hold contiguous ranges of the sorted user ids, with about
    equal row counts, so the outputs come in the same user order as from one partition: row for row
    the single-process result (a hash shuffle would scatter that order)."""
    ddf = dataset.to_ddf()
    counts = ddf[USER_COL].value_counts().compute()
    counts = (counts.to_pandas() if hasattr(counts, "to_pandas") else counts).sort_index()
    users, rows = counts.index.to_numpy(), np.cumsum(counts.to_numpy())
    cuts = np.searchsorted(rows, rows[-1] * np.arange(1, npartitions) / npartitions, side="right")
    # partition k holds divisions[k] <= user < divisions[k + 1]; the last one includes its upper end
    divisions = sorted({users[0], *users[np.minimum(cuts, len(users) - 1)], users[-1]})
    if len(divisions) < 2:  # a single user
        return nvt.Dataset(ddf.repartition(npartitions=1), cpu=dataset.cpu)
    ddf = ddf.set_index(USER_COL, divisions=divisions).reset_index()
    return nvt.Dataset(ddf, cpu=dataset.cpu)


def fit_fixed_vocabulary(workflow: nvt.Workflow, dataset: nvt.Dataset, rows: int = 1000) -> nvt.Workflow:
    """Fits a workflow whose only statistics are fixed vocabularies (Categorify(vocabs=...)).
    Such a fit reads no statistics from the data, but merlin-core 23.08's `LocalExecutor.fit` still
    transforms a whole partition to sample output dtypes (`sample_dtypes()` after the stat phases),
    which doubles the ETL time; fitting on the first rows gives the same workflow."""
    ddf = dataset.to_ddf()
    head = ddf.head(rows, npartitions=ddf.npartitions)
    return workflow.fit(nvt.Dataset(head, schema=dataset.schema))


def session_workflow(item_vocab: pd.Series, categories_dir: str) -> nvt.Workflow:
    """One row per user: the items in time order; equal timestamps keep the input row order."""
    items = [ITEM_COL] >> ops.Categorify(vocabs={ITEM_COL: item_vocab}, out_path=categories_dir)
    sessions = (items + [USER_COL, TIME_COL, ROW_COL]) >> Groupby(
        groupby_cols=[USER_COL], sort_cols=[TIME_COL, ROW_COL],
        aggs={ITEM_COL: ["list", "count"]}, name_sep="-",
    )
    return nvt.Workflow(sessions)


def split_workflow(split: str, cfg: SessionConfig, user_vocab: pd.Series, categories_dir: str) -> nvt.Workflow:
    """Leave-one-out view `split` of the per-user sessions (see the module docstring). Every
    statistic is fixed up front (user vocabulary; list bounds from the slices), so
    `fit_fixed_vocabulary` fits it without a pass over the data."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    L = cfg.max_length
    users = [USER_COL, ITEM_LIST, ITEM_COUNT] >> ops.Filter(f=lambda df: df[ITEM_COUNT] >= cfg.min_interactions)
    user_idx = users[USER_COL] >> ops.Categorify(vocabs={USER_COL: user_vocab}, out_path=categories_dir) >> ops.Rename(name=USER_IDX) >> ops.TagAsUserID()
    if split == "train":
        history = users[ITEM_LIST] >> ListSlice(0, -2)
        out = (user_idx + history) >> TrainingWindows(L + 1)
        out = (out[ITEM_LIST] >> ops.AddTags(ITEM_TAGS)) + out[USER_IDX]
        return nvt.Workflow(out)
    end = None if split == "test" else -1  # the target: last item (test) or second-to-last (valid)
    window = users[ITEM_LIST] >> ListSlice(-(L + 1) if end is None else -(L + 2), end)
    seen = users[ITEM_LIST] >> ops.Rename(name=SEEN_LIST) >> ListSlice(0, -1 if end is None else -2)
    out = user_idx + (window >> ops.AddTags(ITEM_TAGS)) + seen
    return nvt.Workflow(out)


def inference_workflow(item_vocab: pd.Series, cfg: SessionConfig, categories_dir: str) -> nvt.Workflow:
    """Serving: a raw `item_id-list` per request -> the training encoding of its last L items.
    Only row-preserving ops, so no request is ever dropped; unknown items map to the OOV index 2."""
    vocab = pd.Series(item_vocab.values, name=ITEM_LIST)
    out = [ITEM_LIST] >> ops.Categorify(vocabs={ITEM_LIST: vocab}, out_path=categories_dir) \
        >> ListSlice(-cfg.max_length) >> ops.AddTags(ITEM_TAGS)
    return nvt.Workflow(out)


def run_session_workflows(interactions: nvt.Dataset, item_vocab: pd.Series, cfg: SessionConfig,
                          categories_dir: str, user_vocab: pd.Series | None = None
                          ) -> tuple[dict[str, nvt.Workflow], dict[str, nvt.Dataset]]:
    """Fits and runs the session workflow once (its output is persisted, so the three split
    workflows do not recompute the Groupby), then returns the fitted workflows by name
    ("sessions", "train", "valid", "test") and the lazy split datasets. `user_vocab` (every user of
    `interactions`) defaults to the users in sorted order."""
    sessions_wf = fit_fixed_vocabulary(session_workflow(item_vocab, categories_dir), interactions)
    sessions_ddf = sessions_wf.transform(interactions).to_ddf().persist()
    sessions = nvt.Dataset(sessions_ddf, schema=sessions_wf.output_schema)
    users = user_vocabulary(sessions_ddf) if user_vocab is None else user_vocab
    workflows, splits = {"sessions": sessions_wf}, {}
    for split in SPLITS:
        wf = fit_fixed_vocabulary(split_workflow(split, cfg, users, categories_dir), sessions)
        workflows[split], splits[split] = wf, wf.transform(sessions)
    return workflows, splits
