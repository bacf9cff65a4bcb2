"""The trust boundary: file hashes and an optional HMAC signature in every manifest, checked before
anything in a folder is unpickled.

Loading a prepared DIR or a model repository runs code stored in it: NVTabular's `workflow.pkl` and
merlin's `ensemble.pkl` are cloudpickles (our operators travel in them by value), and Triton imports each
model's `model.py`. Such folders must come from a trusted source (see the README, "Trust boundary").

* `write_manifest` records the full sha256 of every file of a folder in its manifest (`files`), and,
  when `ODMT_SIGNING_KEY` is set, signs the manifest with HMAC-SHA256 (`signature`).
* `verify_folder` checks, before loading: the manifest's kind; the signature when a key is set (an
  unsigned or wrongly signed manifest is refused); the hash of every recorded file; that no pickle,
  and in `strict` mode no file at all, is unrecorded. It raises `TrustError` naming what failed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Iterable

from odmt_t4r.output_folder import MANIFEST, atomic_write, bytecode_source, format_family, unrecorded_files

SIGNING_KEY_ENV = "ODMT_SIGNING_KEY"
PICKLE_SUFFIXES = (".pkl", ".pickle")
ALGORITHM = "hmac-sha256"


class TrustError(ValueError):
    """A folder that fails its manifest check: missing or changed files, a bad or missing signature."""


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_hashes(root: str | os.PathLike, skip_folders: Iterable[str] = ()) -> dict[str, str]:
    """{relative path: full sha256} of every file under `root` except manifest.json and `skip_folders`."""
    root = Path(root)
    skip = tuple(f"{s.rstrip('/')}/" for s in skip_folders)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(skip):
            out[rel] = sha256_file(p)
    return out


# -- signatures --------------------------------------------------------------------------------------

def signing_key() -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode("utf-8") if key else None


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"odmt-key-id:" + key).hexdigest()[:8]


def signed(manifest: dict, key: bytes | None = None) -> dict:
    """`manifest` as plain JSON values, with a `signature` when a key is given or set in the environment."""
    manifest = json.loads(json.dumps(manifest, default=str))  # what the file will hold, byte for byte
    manifest.pop("signature", None)
    key = key if key is not None else signing_key()
    if key:
        mac = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
        manifest["signature"] = {"algorithm": ALGORITHM, "key_id": _key_id(key), "value": mac}
    return manifest


def check_signature(manifest: dict, where: str, key: bytes | None = None) -> None:
    """With a key (argument or environment), the manifest must carry a matching signature."""
    key = key if key is not None else signing_key()
    if not key:
        return
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise TrustError(f"{where} is not signed, but {SIGNING_KEY_ENV} is set: refusing to load it. "
                         "Re-create it with the key set, or unset the key to trust it unsigned")
    want = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, str(sig.get("value", ""))):
        hint = ("it was signed with another key" if sig.get("key_id") != _key_id(key)
                else "the manifest was changed after it was signed")
        raise TrustError(f"{where}: the signature does not match {SIGNING_KEY_ENV} ({hint}): refusing to load it")


# -- writing and checking folders --------------------------------------------------------------------

def write_manifest(folder: str | os.PathLike, manifest: dict, generated_folders: Iterable[str] = ()) -> dict:
    """Record every file's sha256 in `manifest`, sign it when a key is set, and write it (atomically) as
    folder/manifest.json. `generated_folders` (e.g. the fashion source's photos) are the project's
    files too but are not hashed: nothing later loads them. Returns the manifest as written."""
    folder = Path(folder)
    generated = sorted(generated_folders)
    manifest = dict(manifest)
    manifest["files"] = file_hashes(folder, generated)
    if generated:
        manifest["generated_folders"] = generated
    manifest = signed(manifest)
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def clear_bytecode_caches(folder: str | os.PathLike) -> int:
    """Remove Python's caches (__pycache__/*.pyc) of the .py files in `folder`; returns how many. A
    planted .pyc would run instead of the checked model.py, and Triton's python stub writes them
    (it ignores PYTHONDONTWRITEBYTECODE), so `odmt serve` clears them before checking a repository."""
    removed = 0
    for pyc in Path(folder).rglob("__pycache__/*.pyc"):
        source = bytecode_source(pyc.relative_to(folder).as_posix())
        if source and (Path(folder) / source).is_file() and not pyc.is_symlink():
            pyc.unlink()
            removed += 1
    for cache in Path(folder).rglob("__pycache__"):
        if cache.is_dir() and not cache.is_symlink() and not any(cache.iterdir()):
            cache.rmdir()
    return removed


def verify_folder(folder: str | os.PathLike, fmt: str, what: str, strict: bool = False) -> dict:
    """Check `folder` against its manifest before loading anything from it; returns the manifest.
    `fmt` is the expected format (its family, e.g. "odmt-prepared", must match); `what` names the folder
    in errors; `strict` refuses any file the manifest does not record (a model repository: Triton
    would run an added model.py). Raises TrustError."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrustError(f"{folder} has no {MANIFEST}: not a {what} written by odmt; refusing to load it") from None
    except (OSError, ValueError) as exc:
        raise TrustError(f"{path} cannot be read ({exc}); refusing to load {folder}") from None
    if not isinstance(manifest, dict) or format_family(manifest.get("format")) != format_family(fmt):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise TrustError(f"{path}: format {found!r}, expected a {what} ({fmt})")
    check_signature(manifest, str(path))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise TrustError(f"{path} records no file hashes (written by an older odmt?): re-create {folder}")
    bad = []
    for rel, digest in sorted(files.items()):
        target = folder / rel
        if not target.is_file() or target.is_symlink():
            bad.append(f"{rel} is missing")
        elif len(str(digest)) != 64:
            bad.append(f"{rel} has a short hash (written by an older odmt)")
        elif not hmac.compare_digest(sha256_file(target), str(digest)):
            bad.append(f"{rel} changed since it was written (sha256 mismatch)")
    extra = (unrecorded_files(folder, {**manifest, "generated_folders": []}, bytecode_caches=False) if strict
             else unrecorded_files(folder, manifest))
    if not strict:
        extra = [rel for rel in extra if rel.endswith(PICKLE_SUFFIXES)]
    bad += [f"{rel} is not recorded in the manifest" for rel in extra]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TrustError(f"{folder} fails its manifest check: {'; '.join(bad[:3])}{more}. Refusing to load it: "
                         f"re-create it with odmt, or restore it from a trusted source")
    return manifest
