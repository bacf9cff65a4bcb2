"""`odmt prepare --append-to DIR`: a prepared DIR plus new interactions (and new items) -> a new DIR2 in
which every user and item of DIR keeps its index.

    odmt prepare --source csv --interactions NEW.csv [--items NEW_ITEMS.csv] --append-to DIR --out DIR2

NEW.csv and NEW_ITEMS.csv have the formats of `--source csv` (or parquet). DIR2 is made of:
  - interactions: DIR's (DIR/interactions.parquet, in their input order), then NEW.csv's rows. The
    leave-one-out splits are rebuilt over all of them by the workflows of a fresh prepare, so DIR2 is what
    `odmt prepare` gives on the old and new rows together, up to the order of the indices;
  - vocabularies: DIR's fitted ones (its saved Categorify files), the new users and items appended
    (workflows.sessions.extend_vocabulary): raw IDs map as before, new ones come after;
  - counts: recounted over all interactions as the splits are rebuilt (train counts, users, rows);
  - features: DIR's rows copied, only the new items encoded (features.build.extend_item_features);
  - settings: DIR's history length, minimum interactions and feature settings; a flag that differs is refused;
  - manifest.json: `parent` names DIR and the sha256 of its manifest.json, so later stages can check lineage.

Refused with one error line before DIR2 is swapped in; DIR is only read, never modified: an interaction
older than DIR's newest (unless --allow-late), an item of NEW_ITEMS.csv already in DIR, an interaction whose
item is in neither catalog, a missing column or a value of the wrong type, --out equal to DIR or nested with
it, and a DIR that cannot be extended (prepared with --cold-items, or before DIRs kept their interactions).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from odmt_t4r.contract import FEATURES_DIR, PREPARED_INTERACTIONS as INTERACTIONS, RESERVED_ROWS, PreparedDir
from odmt_t4r.data.attributes import attribute_kinds, normalize_attributes
from odmt_t4r.data.base import DataValidationError, RawData, note_empty_image_cells

# DIR's settings an append keeps: they decide its indices, splits and features
INHERITED = ("max_length", "min_interactions", "features", "max_text_tokens", "image_size")
CATALOG_ONLY = ("item_idx", "train_count")  # items.parquet columns prepare derives; not the catalog's own


def _check_out(out: Path, parent: Path) -> None:
    """--out is a new folder beside DIR: not DIR, not inside it, not around it (a --force would move DIR aside)."""
    if out == parent:
        raise ValueError(f"--out {out} is the --append-to DIR: an append writes a new folder and never modifies DIR; "
                         f"choose another --out (e.g. {out.name}.v2)")
    if parent in out.parents or out in parent.parents:
        where = "inside" if parent in out.parents else "around"
        raise ValueError(f"--out {out} is {where} the --append-to DIR {parent}: an append never writes into DIR; "
                         "choose an --out beside it")


@dataclass
class ParentDir:
    """The prepared DIR an append extends: checked against its manifest, then read, never written."""

    root: Path
    manifest: dict
    manifest_sha256: str
    interactions: pd.DataFrame  # user_id, item_id, timestamp (epoch ms), in input order
    items: pd.DataFrame  # items.parquet in index order
    item_vocab: pd.Series  # the fitted Categorify vocabularies: value k has index RESERVED_ROWS + k
    user_vocab: pd.Series

    @classmethod
    def read(cls, path: str | Path, out: str | Path) -> "ParentDir":
        from odmt_t4r.trust import verify_prepared
        from workflows.sessions import ITEM_COL, USER_COL, fitted_vocabulary

        root = Path(path).expanduser().resolve()
        _check_out(Path(out).expanduser().resolve(), root)
        prepared = PreparedDir(root)
        manifest = prepared.manifest()
        sha = prepared.manifest_sha256()
        verify_prepared(root)  # its signature and file hashes, before anything in it is read
        if manifest.get("cold"):
            raise ValueError(f"--append-to {root} was prepared with --cold-items: its held-out items are in no vocabulary; "
                             "append to a DIR prepared without --cold-items")
        if not (root / INTERACTIONS).is_file():
            raise ValueError(f"--append-to {root} holds no {INTERACTIONS} (prepared by an older odmt): prepare it again "
                             "with this odmt, then append to it")
        items = prepared.items().sort_values("item_idx", kind="stable").reset_index(drop=True)
        item_vocab = fitted_vocabulary(prepared.workflow("sessions"), ITEM_COL)
        user_vocab = fitted_vocabulary(prepared.workflow("train"), USER_COL)
        if (items["item_idx"].tolist() != list(range(RESERVED_ROWS, RESERVED_ROWS + len(items)))
                or items["item_id"].astype(str).tolist() != item_vocab.astype(str).tolist()):
            raise ValueError(f"--append-to {root}: its item vocabulary and items.parquet disagree; prepare it again")
        interactions = pd.read_parquet(root / INTERACTIONS)
        return cls(root, manifest, sha, interactions, items, item_vocab, user_vocab)

    @property
    def n_index(self) -> int:
        return RESERVED_ROWS + len(self.items)

    def settings(self, cfg, defaults, given: set[str] | None = None):
        """`cfg` (a PrepareConfig) with DIR's INHERITED settings. One the user set (`given`; None: any that
        differs from `defaults`) to another value than DIR's is refused: DIR2's indices and features must
        match DIR's. (prepare.py passes its types in: it imports this module, not the reverse.)"""
        recorded = self.manifest.get("config") or {}
        kept = {}
        for name in INHERITED:
            theirs, mine = recorded.get(name, getattr(defaults, name)), getattr(cfg, name)
            asked = name in given if given is not None else mine != getattr(defaults, name)
            if asked and mine != theirs:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {mine} differs from --append-to {self.root}'s {theirs}: an append keeps DIR's "
                                 f"settings; drop {flag}, or prepare all the data afresh")
            kept[name] = theirs
        return replace(cfg, **kept)

    def inputs(self, cfg, stage: Path, step) -> dict:
        """DIR's interactions and catalog followed by the new ones, the vocabularies grown from DIR's: the
        fields of prepare's PrepareInputs. `step` logs a step of the stage."""
        from odmt_t4r.data.sources import load_new_rows
        from workflows.sessions import ROW_COL, extend_vocabulary, item_vocabulary, user_vocabulary

        step(f"appending {cfg.interactions}" + (f" and {cfg.items}" if cfg.items else "") + f" to {self.root}")
        kinds = attribute_kinds(self.items)  # DIR's attributes keep their kinds; new ones are DIR2's
        new = load_new_rows(cfg.source, cfg.interactions, cfg.items, cfg.timestamp_format, kinds)
        late = self._check(new, cfg.allow_late)
        catalog = pd.concat([self._catalog(stage), new.items], ignore_index=True)
        catalog = normalize_attributes(catalog, new.items_path, {**attribute_kinds(new.items), **kinds})
        inter = pd.concat([self.interactions, new.interactions], ignore_index=True)
        raw = RawData(cfg.source, inter, catalog, new.interactions_path, new.items_path, notes=self._notes(new.notes))
        note_empty_image_cells(raw.items, f"{self.root / 'items.parquet'} + {new.items_path}", raw.notes)
        rows = inter.assign(**{ROW_COL: range(len(inter))})  # DIR's rows first: the tiebreak of a concatenated file
        users = extend_vocabulary(self.user_vocab, user_vocabulary(rows))
        vocab = extend_vocabulary(self.item_vocab, item_vocabulary(rows, catalog))
        parent = {"dir": str(self.root), "manifest_sha256": self.manifest_sha256,
                  "appended": {"interactions": len(new.interactions), "items": len(new.items),
                               "users": len(users) - len(self.user_vocab), "late_interactions": late}}
        step(f"  {parent['appended']['interactions']:,} new interactions ({late:,} late), {len(new.items):,} new items, "
              f"{parent['appended']['users']:,} new users")
        return dict(raw=raw, inter=rows, vocab=vocab, users=users, parent_features=self.root / FEATURES_DIR,
                    parent_n_index=self.n_index, parent=parent)

    def _check(self, new: RawData, allow_late: bool) -> int:
        """Refuses new items already in DIR and interactions with unknown items; returns the count of late
        interactions (older than DIR's newest), refused unless `allow_late`."""
        ids = new.items["item_id"]
        clash = ids.isin(set(self.items["item_id"]))
        if clash.any():
            raise DataValidationError(new.items_path, "item_id", f"{int(clash.sum())} item IDs are already in {self.root}'s "
                                      f"catalog (e.g. {ids[clash].head(3).tolist()}); --items lists only new items, DIR's "
                                      "items keep their content: remove those rows", new.items[clash])
        known = set(self.items["item_id"]) | set(ids)
        unknown = ~new.interactions["item_id"].isin(known)
        if unknown.any():
            raise DataValidationError(new.interactions_path, "item_id", f"{int(unknown.sum())} interactions refer to items "
                                      f"in neither {self.root}'s catalog nor {new.items_path}: add them to --items",
                                      new.interactions[unknown])
        newest = int(self.interactions["timestamp"].max())
        late = new.interactions["timestamp"] < newest
        if late.any() and not allow_late:
            when = datetime.fromtimestamp(newest / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            raise DataValidationError(new.interactions_path, "timestamp", f"{int(late.sum())} interactions are older than "
                                      f"{self.root}'s newest ({when}); pass --allow-late to sort them into the histories, "
                                      "or remove them", new.interactions[late])
        return int(late.sum())

    def _catalog(self, stage: Path) -> pd.DataFrame:
        """DIR's catalog as a source gives it: image paths inside DIR (a generated source's photos, whose
        folders are copied into the stage) resolved against the stage, where prepare makes them relative."""
        items = self.items.drop(columns=[c for c in CATALOG_ONLY if c in self.items.columns])
        for folder in self.manifest.get("generated_folders") or []:
            if (self.root / folder).is_dir():
                shutil.copytree(self.root / folder, stage / folder)
        if "image" in items:
            items["image"] = items["image"].map(lambda p: p if p is None or pd.isna(p) or Path(p).is_absolute() else str(stage / p))
        return items

    def _notes(self, new_notes: dict) -> dict:
        """DIR's notes with the new files' unreadable images added (empty image cells are counted again)."""
        notes = {k: v for k, v in (self.manifest.get("notes") or {}).items() if not k.startswith("empty_image_cell")}
        if new_notes.get("unreadable_images"):
            notes["unreadable_images"] = notes.get("unreadable_images", 0) + new_notes["unreadable_images"]
            notes["unreadable_image_sample"] = [*notes.get("unreadable_image_sample", []),
                                                *new_notes["unreadable_image_sample"]][:5]
        return notes

    def check_unchanged(self) -> None:
        """DIR's manifest is still the one read at the start (no one replaced DIR while DIR2 was built)."""
        if PreparedDir(self.root).manifest_sha256() != self.manifest_sha256:
            raise ValueError(f"--append-to {self.root} was replaced while it was read; append to it again")
