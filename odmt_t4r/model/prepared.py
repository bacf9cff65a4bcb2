"""What a model needs to know about a prepared DIR, read from its merlin schema and manifest.

The item column is found by its Tags.ITEM_ID tag (not by name); the index size comes from the column's
int_domain (max = N - 1) and the history length from manifest.json (each row holds L history items
plus its target).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from odmt_t4r.contract import PreparedDir
from odmt_t4r.features.store import built_modalities


@dataclass
class PreparedInfo:
    root: Path
    item_column: str  # the list column tagged ITEM_ID, e.g. "item_id-list"
    n_index: int  # rows of the item index, the 3 reserved rows included
    max_length: int  # L: history items the model sees
    modalities: list[str]  # ["id", "text"(, "image")] with features present on disk
    manifest: dict

    @property
    def dir(self) -> PreparedDir:
        return PreparedDir(self.root)

    @property
    def features_dir(self) -> Path:
        return self.dir.features

    @property
    def manifest_sha256(self) -> str:
        return self.dir.manifest_sha256()


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
    prepared = PreparedDir(root)
    manifest = prepared.manifest()
    from odmt_t4r.trust import verify_prepared

    verify_prepared(root)  # its signature and file hashes, before a split, feature or catalog is read
    missing = prepared.missing()
    if missing:
        raise FileNotFoundError(f"{root} is not a complete prepared DIR: it has a manifest but no {missing}; "
                                "run `odmt prepare` again")
    schema = load_schema(prepared.split("train"))
    col = item_column(schema)
    domain = schema[col].int_domain
    n_index = int(manifest["n_index"])
    if domain is not None and domain.max is not None and int(domain.max) + 1 != n_index:
        raise ValueError(f"{root}: schema int_domain max {domain.max} disagrees with manifest n_index {n_index}")
    built = built_modalities(prepared.features)
    modalities = ["id"] + [m for m in manifest.get("modalities", ["id"]) if m != "id" and m in built]
    return PreparedInfo(root=root, item_column=col, n_index=n_index, max_length=int(manifest["max_length"]),
                        modalities=modalities, manifest=manifest)
