"""The trust boundary: file hashes and an optional HMAC signature in every manifest, checked before
anything in a folder is unpickled.

Loading a prepared DIR or a model repository runs code stored in it: NVTabular's `workflow.pkl` and
merlin's `ensemble.pkl` are cloudpickles (our operators travel in them by value), and Triton imports each
model's `model.py`. Such folders must come from a trusted source (docs/operations.md, "Trust boundary").

* `write_manifest` records the full sha256 of every file of a folder in its manifest (`files`), and,
  when `ODMT_SIGNING_KEY` is set, signs the manifest with HMAC-SHA256 (`signature`).
* `verify_folder` checks, before loading: the manifest's kind; the signature when a key is set (an
  unsigned or wrongly signed manifest is refused); the hash of every recorded file; that no pickle,
  and in `strict` mode no file at all, is unrecorded. It raises `TrustError` naming what failed.
"""

from __future__ import annotations

import fnmatch
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


def file_hashes(root: str | os.PathLike, skip_folders: Iterable[str] = (), skip_files: Iterable[str] = ()) -> dict[str, str]:
    """{relative path: full sha256} of every file under `root` except manifest.json, `skip_folders` and
    the files matching a `skip_files` pattern (fnmatch, relative path)."""
    root = Path(root)
    skip = tuple(f"{s.rstrip('/')}/" for s in skip_folders)
    patterns = tuple(skip_files)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() and rel != MANIFEST and not rel.startswith(skip)
                and not any(fnmatch.fnmatchcase(rel, pat) for pat in patterns)):
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

def write_manifest(folder: str | os.PathLike, manifest: dict, generated_folders: Iterable[str] = (),
                   skip_files: Iterable[str] = ()) -> dict:
    """Record every file's sha256 in `manifest`, sign it when a key is set, and write it (atomically) as
    folder/manifest.json. `generated_folders` (e.g. the fashion source's photos) are the project's
    files too but are not hashed: nothing later loads them; nor are `skip_files` (patterns). Returns the
    manifest as written."""
    folder = Path(folder)
    generated = sorted(generated_folders)
    manifest = dict(manifest)
    manifest["files"] = file_hashes(folder, generated, skip_files)
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
    seen = _stat_key(folder, strict)
    if _VERIFIED.get((str(folder.resolve()), fmt, strict, _key_id(signing_key() or b""))) == seen:
        return manifest  # this process hashed it already, and no file changed since (ctime, size, inode)
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
    bad += _unrecorded_versions(folder, extra, files) if strict else []
    bad += [f"{rel} is not recorded in the manifest" for rel in extra if not _in_version_folder(rel, bad)]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TrustError(f"{folder} fails its manifest check: {'; '.join(bad[:3])}{more}. Refusing to load it: "
                         f"re-create it with odmt, or restore it from a trusted source")
    _VERIFIED[(str(folder.resolve()), fmt, strict, _key_id(signing_key() or b""))] = seen
    return manifest


_VERIFIED: dict[tuple, tuple] = {}  # folders this process verified -> the file stats they had then


def _stat_key(folder: Path, strict: bool) -> tuple:
    """Every file's (path, size, inode, ctime): any write, rename or swap changes one (ctime cannot be set back)."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_size, st.st_ino, st.st_ctime_ns, st.st_mtime_ns))
    return tuple(sorted(out))


def _unrecorded_versions(folder: Path, extra: list[str], files: dict) -> list[str]:
    """A model repository's version folder (MODEL/<n>/) that the manifest does not record at all: what an
    interrupted `odmt add-items` leaves (killed between moving it in and recording it)."""
    recorded = {"/".join(rel.split("/")[:2]) for rel in files}
    models = {rel.split("/")[0] for rel in files if "/" in rel}  # another, unrecorded model is no version of ours
    folders = sorted({"/".join(rel.split("/")[:2]) for rel in extra if len(rel.split("/")) > 2
                      and rel.split("/")[1].isdigit() and rel.split("/")[0] in models} - recorded)
    return [f"{v} is a version folder the manifest does not record (left by an interrupted `odmt add-items`?): "
            f"remove it (rm -r {folder / v}) and run add-items again" for v in folders]


def _in_version_folder(rel: str, bad: list[str]) -> bool:
    return any(b.startswith("/".join(rel.split("/")[:2]) + " is a version folder") for b in bad)


# -- RUN folders and prepared DIRs at load -----------------------------------------------------------

from odmt_t4r.contract import RUN_FORMAT  # noqa: E402  (import-light)
RUN_LATER_FILES = ("metrics-*.json",)  # what `odmt evaluate` / `odmt run` add to a finished RUN: not loaded
RUN_SKIPPED_FOLDERS = ("candidates",)  # a model selection's candidate RUNs (their own folders; never loaded)
RUN_LOADED = ("config.json", "model.pt", "item_vectors.pt", "added_items.parquet", "fusion.json", "selection.json")
SIGN_HINT = ("if you trust it, sign it with the key set: `python -m odmt_t4r.trust sign RUN` (`odmt sign --run RUN`), "
             "or train it again with the key set")


def write_run_manifest(run_dir: str | os.PathLike, extra: dict | None = None) -> dict:
    """RUN/manifest.json: the sha256 of every file of a finished RUN (but metrics-*.json and candidates/),
    signed when ODMT_SIGNING_KEY is set. Call it last, when training (or add-items) has written the RUN."""
    run_dir = Path(run_dir)
    return write_manifest(run_dir, {"format": RUN_FORMAT, **(extra or {})}, skip_files=RUN_LATER_FILES,
                          generated_folders=[f for f in RUN_SKIPPED_FOLDERS if (run_dir / f).is_dir()])


def verify_run(run_dir: str | os.PathLike) -> dict | None:
    """Check a RUN before anything in it is loaded (model.pt, item_vectors.pt, config.json, added items):
    every recorded file's hash, the signature when a key is set, no file the loaders read left unrecorded.
    A RUN without manifest.json (trained before RUNs had one) is trusted only when no key is set.
    Returns the manifest (None for such a RUN); raises TrustError."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        if signing_key():
            raise TrustError(f"{run_dir} has no signed manifest.json, but {SIGNING_KEY_ENV} is set: refusing to "
                             f"load it; {SIGN_HINT.replace('RUN', str(run_dir))}")
        return None
    manifest = verify_folder(run_dir, RUN_FORMAT, "RUN (from odmt train or add-items)")
    loaded = [f for f in RUN_LOADED if (run_dir / f).exists() and f not in manifest["files"]]
    if loaded:
        raise TrustError(f"{run_dir} fails its manifest check: {', '.join(loaded)} is not recorded in the manifest. "
                         "Refusing to load it: re-create it with odmt, or restore it from a trusted source")
    return manifest


def verify_prepared(root: str | os.PathLike) -> dict | None:
    """Check a prepared DIR before its splits, features or workflows are read (train, evaluate, add-items,
    export). A DIR whose manifest records no file hashes (hand-made, or from an older odmt) is trusted only
    when no key is set. Returns the manifest, or None for such a DIR; raises TrustError."""
    from odmt_t4r.contract import PREPARED_FORMAT

    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not signing_key() and isinstance(manifest, dict) and not manifest.get("files"):
        return None
    return verify_folder(root, PREPARED_FORMAT, "prepared folder")


# -- `odmt sign`: sign a RUN one trusts (trained before RUNs had a manifest, or with another key) ---------

def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="a RUN you trust: its files are hashed and the manifest signed "
                                                f"with {SIGNING_KEY_ENV}")


def run(args) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "model.pt").is_file() or not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} holds no trained model (config.json, model.pt): not a RUN")
    if not signing_key():
        raise ValueError(f"{SIGNING_KEY_ENV} is not set: there is nothing to sign with")
    manifest = write_run_manifest(run_dir, {"signed_by": "odmt sign"})
    print(f"signed {run_dir}: {len(manifest['files'])} files (key {manifest['signature']['key_id']})")
    return 0


if __name__ == "__main__":  # python -m odmt_t4r.trust sign RUN = odmt sign RUN
    import sys

    from odmt_t4r.cli import main

    sys.exit(main(sys.argv[1:] if sys.argv[1:2] == ["sign"] else ["sign", *sys.argv[1:]]))
