"""The file contracts between stages, in one place: the prepared DIR and the RUN folder.

Prepared DIR (`odmt prepare`): manifest.json with `format` PREPARED_FORMAT; items.parquet; the
train/valid/test splits (parquet parts + schema.pbtxt) whose rows hold ITEM_LIST (the history ending with
its target), SEEN_LIST (every earlier item of the user) and USER_IDX; features/; workflows/.
A DIR prepared with `--cold-items F` also holds COLD_DIR: COLD_ITEMS, the held-out items in the catalog
file format (`odmt add-items --items`), and COLD_TEST, one row per user whose test target is a held-out
item (COLD_TEST_COLUMNS); manifest.json's `cold` says how they were chosen.
Item indices: PAD 0, NULL 1, OOV 2, then the catalog from RESERVED_ROWS on.

RUN folder (`odmt train`; read through RunFolder): config.json with `format` RUN_FORMAT (a model saved on its own carries
MODEL_FORMAT) and `data.dir`, the prepared DIR it was trained on; model.pt, item_vectors.pt, checkpoint.pt,
log.jsonl, fusion.json. A RUN of `odmt train --candidates` is the chosen candidate's RUN (its config.json,
model.pt, item_vectors.pt, fusion.json, log.jsonl copied) plus CANDIDATES/<preset>/, one RUN per candidate,
and SELECTION (`format` SELECTION_FORMAT: the settings, each candidate's valid score, the choice).
A RUN written by `odmt add-items` is a whole RUN too: its config.json names its `parent_run`, and
ADDED_ITEMS lists the items appended after the prepared DIR's catalog (item_id, item_idx from the DIR's
last index on, their content and attributes, `since`); `run_item_ids` is index -> raw ID over both.

Sessions are cut to their LAST `max_length` items and right-padded with PAD (`last_items`): the same rule
in training batches, evaluation, and the served graph.

Import-light on purpose (numpy only at import): every stage and the Triton python stub read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PREPARED_FORMAT = "odmt-prepared/1"
RUN_FORMAT = "odmt-run/1"
MODEL_FORMAT = "odmt-model/1"
SELECTION_FORMAT = "odmt-selection/1"
SELECTION = "selection.json"  # RUN file of a model selection (training/selection.py)
CANDIDATES = "candidates"  # RUN folder of a model selection's candidate RUNs

ITEM_LIST = "item_id-list"  # a split row: the history items, ending with the target
SEEN_LIST = "seen-list"  # every item of the user before the target (the evaluation's exclusion)
USER_IDX = "user_idx"
ADDED_ITEMS = "added_items.parquet"  # RUN file: items added after training (odmt add-items)
SPLITS = ("train", "valid", "test")
COLD_DIR = "cold"  # prepared DIR folder of the held-out (cold-start) items, `odmt prepare --cold-items`
COLD_ITEMS = f"{COLD_DIR}/items.csv"  # item_id, text, image (paths relative to this file's folder)
COLD_TEST = f"{COLD_DIR}/test.parquet"
# user_id; history: the user's earlier non-cold items as DIR indices, in time order; target_id: the raw ID
# of the held-out item; earlier_cold_ids: raw IDs of held-out items the user had before it (excluded too)
COLD_TEST_COLUMNS = ("user_id", "history", "target_id", "earlier_cold_ids")

PAD, NULL, OOV = 0, 1, 2  # NVTabular Categorify's reserved rows
RESERVED_ROWS = 3  # the catalog's items are indexed from here on


def read_split(folder: str | Path, columns: list[str] | None = None):
    """A split folder's parquet parts in order, as one pandas frame (the folder also holds schema files)."""
    import pandas as pd
    from dask.utils import natural_sort_key

    parts = sorted(map(str, Path(folder).glob("*.parquet")), key=natural_sort_key)  # part_2 before part_10
    if not parts:
        raise FileNotFoundError(f"{folder} holds no parquet parts: not a split of a prepared DIR")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def read_selection(run: str | Path) -> dict | None:
    """RUN/SELECTION of a model selection, or None when RUN is not one (or the file is not ours)."""
    try:
        saved = json.loads((Path(run) / SELECTION).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("format") == SELECTION_FORMAT else None


RUN_CONFIG = "config.json"  # RUN file: format, the model config, the training settings, the prepared DIR
RUN_WEIGHTS = ("model.pt", "item_vectors.pt")  # RUN files: the weights and the eval catalog's item vectors
# what training, a model selection and evaluation write into a RUN (patterns; atomic_write's temporary files)
RUN_WRITES = (RUN_CONFIG, *RUN_WEIGHTS, "checkpoint.pt", "log.jsonl", "fusion.json", "summary.json", SELECTION,
              "manifest.json", "metrics-*.json", ".*.tmp-*")


def is_run_write(name: str) -> bool:
    """A file name odmt's training, selection or evaluation writes into a RUN."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_WRITES)


class RunFolder:
    """A RUN (odmt train, add-items, or a model saved on its own): the one reader of its config.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def config(self) -> dict:
        """RUN/config.json; FileNotFoundError without one, ValueError when it is not a RUN's config."""
        path = self.path / RUN_CONFIG
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} holds no saved model ({RUN_CONFIG}); train one with `odmt train`") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a saved model's config ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict):
            raise ValueError(f"{path} is not a saved model's config (not a JSON object)")
        return payload

    def config_or_none(self) -> dict | None:
        """RUN/config.json, or None when it is missing or unreadable (a folder that is not, or not yet, a RUN)."""
        try:
            return self.config()
        except (OSError, ValueError):
            return None

    def format(self) -> str | None:
        return (self.config_or_none() or {}).get("format")

    def is_ours(self) -> bool:
        """config.json names one of odmt's formats (a RUN, a saved model)."""
        return str(self.format() or "").startswith("odmt-")

    def has_model(self) -> bool:
        return (self.path / RUN_CONFIG).is_file() and (self.path / RUN_WEIGHTS[0]).is_file()

    def can_resume(self) -> bool:
        """odmt train left a checkpoint of a finished epoch here."""
        return (self.path / "checkpoint.pt").is_file()

    def train_settings(self) -> dict:
        return (self.config_or_none() or {}).get("train", {})

    def recorded_data(self) -> dict:
        """{"dir", "manifest_sha256", "source"}: the prepared DIR the RUN was trained on ({} if none)."""
        data = (self.config_or_none() or {}).get("data") or {}
        return data if isinstance(data, dict) else {}


def run_data_dir(run: str | Path, data: str | Path | None = None) -> Path:
    """The prepared DIR of a RUN: `data` if given, else the one recorded in RUN/config.json."""
    recorded = RunFolder(run).recorded_data().get("dir")
    chosen = Path(data or recorded or "")
    if not str(chosen) or not PreparedDir(chosen).is_prepared():
        raise FileNotFoundError(f"no prepared DIR for {run}: pass --data (recorded: {recorded!r})")
    return chosen.resolve()


def last_items(values: np.ndarray, offsets: np.ndarray, width: int | None = None) -> np.ndarray:
    """Ragged sessions (values [V], offsets [B+1]) -> [B W] int64: each session's last W items,
    left-aligned and right-padded with PAD. W = the longest session when `width` is None."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    lengths = np.diff(offsets)
    W = int(width if width is not None else (lengths.max() if len(lengths) else 0))
    keep = np.minimum(lengths, W)
    out = np.full((len(lengths), W), PAD, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), keep)
    cols = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    out[rows, cols] = values[np.repeat(offsets[1:] - keep, keep) + cols]
    return out


PREPARED_MANIFEST = "manifest.json"  # DIR file: format, source, counts, modalities, max_length, n_index, hashes
PREPARED_INTERACTIONS = "interactions.parquet"  # DIR file: every interaction the splits hold (--append-to extends it)
PREPARED_ITEMS = "items.parquet"  # DIR file: the catalog (item_idx, item_id, content columns, attributes, train_count)
FEATURES_DIR = "features"  # DIR folder: the frozen modality features (features/store.py reads it)
WORKFLOWS_DIR = "workflows"  # DIR folder: the fitted NVTabular workflows (workflows/, the served transform)


class PreparedDir:
    """A prepared DIR (odmt prepare): the one place that names its files and reads its manifest and catalog.
    Verification (signature, hashes) is trust.verify_prepared's job; model.prepared.read_prepared does both."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def file(self, name: str) -> Path:
        return self.root / name

    @property
    def manifest_path(self) -> Path:
        return self.root / PREPARED_MANIFEST

    @property
    def features(self) -> Path:
        return self.root / FEATURES_DIR

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: choose from {', '.join(SPLITS)}")
        return self.root / name

    def workflow(self, name: str) -> Path:
        return self.root / WORKFLOWS_DIR / name

    def is_prepared(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        """manifest.json, checked to be a prepared DIR's; FileNotFoundError / ValueError say what to do."""
        path = self.manifest_path
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a prepared DIR (no {PREPARED_MANIFEST}); run `odmt prepare` first")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); prepare DIR again") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise ValueError(f"{path}: format {got!r}, expected {PREPARED_FORMAT!r}")
        return manifest

    def manifest_sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.manifest_path.read_bytes()).hexdigest()

    def items(self, columns: list[str] | None = None):
        """The catalog (items.parquet) as a pandas DataFrame, optionally only `columns`."""
        import pandas as pd

        return pd.read_parquet(self.root / PREPARED_ITEMS, columns=columns)

    def missing(self) -> list[str]:
        """The catalog and splits a complete DIR holds that this one lacks."""
        return [name for name in (PREPARED_ITEMS, *SPLITS) if not (self.root / name).exists()]


def catalog_item_ids(data_dir: str | Path) -> np.ndarray:
    """index -> raw item ID (str) from a prepared DIR's items.parquet; "" for the reserved and unused rows."""
    items = PreparedDir(data_dir).items(["item_idx", "item_id"])
    ids = np.full(int(items["item_idx"].max()) + 1 if len(items) else RESERVED_ROWS, "", dtype=object)
    ids[items["item_idx"].to_numpy()] = items["item_id"].astype(str).to_numpy()
    return ids


def run_item_ids(run: str | Path, data_dir: str | Path | None = None) -> np.ndarray:
    """index -> raw item ID (str) of a RUN: the prepared DIR's catalog, then the RUN's added items."""
    import pandas as pd

    ids = catalog_item_ids(run_data_dir(run, data_dir))
    added_path = Path(run) / ADDED_ITEMS
    if not added_path.is_file():
        return ids
    added = pd.read_parquet(added_path, columns=["item_idx", "item_id"])
    out = np.full(max(len(ids), int(added["item_idx"].max()) + 1), "", dtype=object)
    out[: len(ids)] = ids
    out[added["item_idx"].to_numpy()] = added["item_id"].astype(str).to_numpy()
    return out


def _cold_file(data_dir: str | Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no cold-start items ({name}): prepare it with --cold-items FRACTION")
    return path


def read_cold_test(data_dir: str | Path):
    """A prepared DIR's cold-start test rows (COLD_TEST_COLUMNS); FileNotFoundError when DIR holds none."""
    import pandas as pd

    return pd.read_parquet(_cold_file(data_dir, COLD_TEST), columns=list(COLD_TEST_COLUMNS))


def cold_item_ids(data_dir: str | Path) -> list[str]:
    """The raw IDs of the items a prepared DIR holds out for cold-start evaluation (COLD_ITEMS)."""
    import pandas as pd

    # IDs exactly as written ("007", "NA"), as the csv source reads them
    return pd.read_csv(_cold_file(data_dir, COLD_ITEMS), usecols=["item_id"], dtype=str, keep_default_na=False)["item_id"].tolist()
