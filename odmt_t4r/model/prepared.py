"""What a model needs to know about a prepared DIR, read from its merlin schema and manifest.

The item column is found by its Tags.ITEM_ID tag (not by name); the index size comes from the column's
int_domain (max = N - 1) and the history length from manifest.json (each row holds L history items
plus its target).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from odmt_t4r.contract import PREPARED_FORMAT as FORMAT


@dataclass
class PreparedInfo:
    root: Path
    item_column: str  # the list column tagged ITEM_ID, e.g. "item_id-list"
    n_index: int  # rows of the item index, the 3 reserved rows included
    max_length: int  # L: history items the model sees
    modalities: list[str]  # ["id", "text"(, "image")] with features present on disk
    manifest: dict

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.root / "manifest.json").read_bytes()).hexdigest()


def load_schema(split_dir: str | os.PathLike):
    """The merlin Schema NVTabular wrote next to a split's parquet files (schema.pbtxt)."""
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    return TensorflowMetadata.from_proto_text_file(str(split_dir)).to_merlin_schema()


def item_column(schema) -> str:
    from merlin.schema import Tags

    names = schema.select_by_tag(Tags.ITEM_ID).column_names
    if len(names) != 1:
        raise ValueError(f"expected exactly one column tagged ITEM_ID in the schema, found {names}")
    return names[0]


def read_prepared(root: str | os.PathLike) -> PreparedInfo:
    root = Path(root).resolve()
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{root} is not a prepared DIR (no manifest.json); run `odmt prepare` first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{manifest_path} is not valid JSON ({exc}); prepare DIR again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_path}: format {got!r}, expected {FORMAT!r}")
    from odmt_t4r.trust import verify_prepared

    verify_prepared(root)  # its signature and file hashes, before a split, feature or catalog is read
    missing = [name for name in ("items.parquet", "train", "valid", "test") if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete prepared DIR: it has a manifest but no {missing}; "
                                "run `odmt prepare` again")
    schema = load_schema(root / "train")
    col = item_column(schema)
    domain = schema[col].int_domain
    n_index = int(manifest["n_index"])
    if domain is not None and domain.max is not None and int(domain.max) + 1 != n_index:
        raise ValueError(f"{root}: schema int_domain max {domain.max} disagrees with manifest n_index {n_index}")
    feats = root / "features"
    modalities = ["id"] + [
        m for m in manifest.get("modalities", ["id"])
        if m != "id" and (feats / f"{m}.npy").is_file() and (feats / f"{m}_mask.npy").is_file()
    ]
    return PreparedInfo(root=root, item_column=col, n_index=n_index, max_length=int(manifest["max_length"]),
                        modalities=modalities, manifest=manifest)
