"""Output folders that are replaced whole or not at all, and never take the user's files with them.

`odmt prepare --out DIR` and `odmt export --out REPO` write through `OutputFolder`:

1. **Lock.** `.<name>.lock` next to the folder is held (fcntl) for the whole run: a second writer to the
   same folder is refused at once. The kernel drops the lock when the process dies, even on SIGKILL.
2. **Check, before any work.** The folder may be absent, empty, or one this project wrote: its
   manifest.json has the expected format and records every file in it. Anything else is refused. With
   `--force` such a folder is moved aside whole to `<name>.backup-<time>` next to it, so nothing is deleted.
   An `--out` that is a file is always refused.
3. **Build.** Everything is written into `.<name>.odmt-partial` next to the folder, the manifest last.
4. **Swap.** One `renameat2(RENAME_EXCHANGE)` swaps the new folder in atomically; a reader sees the old
   output or the new one, never a mix. On filesystems without it, two renames are used. The old
   output is deleted afterwards, since it was checked to be the project's; a foreign one is kept as
   the backup above.

A run killed at any point leaves the previous output or the new one in place, plus at most a leftover
`.<name>.odmt-partial` / `.<name>.odmt-old` that the next run to the same folder cleans up (or restores).

`atomic_write` is the project's one way to replace a single file: tmp file + fsync + os.replace.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable

MANIFEST = "manifest.json"
FAULT_ENV = "ODMT_FAULT_POINT"  # tests only: SIGKILL this process at the named point (fault injection)


class OutputFolderError(ValueError):
    """An output folder that cannot be written: a file, someone else's files, or another writer at work."""


# -- one file ----------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Replace `path` so a reader (or a crash) sees the old file or the new one, never a part.

    `data` is text (written as UTF-8), bytes, or a callable that writes the temporary path it is
    given, e.g. `atomic_write(p, lambda tmp: torch.save(obj, tmp))`. The temporary file sits next to
    `path` with the same suffix (np.save and friends keep the name) and is removed if writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(data)
        else:
            data(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- whose folder is it ------------------------------------------------------------------------------

def format_family(fmt: object) -> str | None:
    """"odmt-prepared/1" -> "odmt-prepared" (versions of one kind may replace each other)."""
    return fmt.split("/", 1)[0] if isinstance(fmt, str) and fmt.startswith("odmt-") else None


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def bytecode_source(rel: str) -> str | None:
    """"a/__pycache__/model.cpython-311.pyc" -> "a/model.py" (Python's cache of that file), else None."""
    p = PurePosixPath(rel)
    if p.parent.name != "__pycache__" or p.suffix != ".pyc":
        return None
    return str(p.parent.parent / f"{p.name.split('.', 1)[0]}.py")


def unrecorded_files(folder: Path, manifest: dict | None, bytecode_caches: bool = True) -> list[str]:
    """Paths (relative, sorted) under `folder` that its manifest does not record as the project's:
    files not in manifest["files"] and not under a manifest["generated_folders"] entry. Python's
    bytecode cache of a recorded .py file (Triton imports model.py) counts as recorded when
    `bytecode_caches`. Symlinks always count. Empty directories hold nothing and are ignored."""
    manifest = manifest or {}
    recorded = set(manifest.get("files") or {}) | {MANIFEST}
    generated = tuple(f"{d.rstrip('/')}/" for d in manifest.get("generated_folders") or [])
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():
                out.append((base / name).relative_to(folder).as_posix())
        for name in filenames:
            rel = (base / name).relative_to(folder).as_posix()
            ours = rel in recorded or rel.startswith(generated) or (
                bytecode_caches and bytecode_source(rel) in recorded)
            if (base / name).is_symlink() or not ours:
                out.append(rel)
    return sorted(out)


# -- swapping folders --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def fault_point(name: str) -> None:
    """Fault injection for tests: a process started with ODMT_FAULT_POINT=<name> dies here by SIGKILL."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class FolderLock:
    """`.<name>.lock` next to a folder, held (fcntl) by its one writer: `odmt prepare`/`export` (OutputFolder)
    and `odmt add-items --repo` (a live repository) take the same lock, so no two of them interleave.

        with FolderLock(repo):
            ...read the manifest, write, record...

    A second writer is refused at once; the kernel drops the lock when the process dies (SIGKILL too)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser().resolve()
        self.path = self.folder.with_name(f".{self.folder.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> int:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputFolderError(f"another odmt process is writing {self.folder} "
                                    f"({holder or 'see ' + str(self.path)}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv[:3])}\n".encode(), 0)
        self._fd = fd
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class OutputFolder:
    """Build an output folder next to `out` and swap it in (see the module docstring).

        with OutputFolder(out, "odmt-prepared/1", force=force) as folder:
            ...write into folder.stage, manifest.json last...
            folder.commit()

    Leaving the block without commit() removes the stage and leaves `out` as it was."""

    def __init__(self, out: str | os.PathLike, fmt: str, *, force: bool = False, what: str = "output folder",
                 log: Callable[[str], None] | None = None, refuse_hint: str | None = None):
        self.out = Path(out).expanduser().resolve()
        self.family = format_family(fmt)
        self.force, self.what = force, what
        # what a refusal suggests; commands without --force (add-items) give their own way out
        self.refuse_hint = refuse_hint or "Choose another --out, or pass --force to move the existing folder aside (nothing is deleted)"
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stage = self.out.with_name(f".{self.out.name}.odmt-partial")
        self.old = self.out.with_name(f".{self.out.name}.odmt-old")
        self.lock_path = FolderLock(self.out).path
        self.backup: Path | None = None
        self._lock_fd: int | None = None
        self._committed = False

    # -- the check -------------------------------------------------------------------------------
    def check(self) -> str:
        """"new", "replace" (the project's own folder) or "backup" (--force on anything else); raises
        OutputFolderError when `out` cannot be written."""
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            kind = "a symlink" if out.is_symlink() else "a file"
            raise OutputFolderError(f"--out {out} is {kind}, not a folder; give a folder path")
        if not out.exists() or not any(out.iterdir()):
            return "new"
        manifest = read_manifest(out)
        family = format_family((manifest or {}).get("format"))
        if family == self.family:
            foreign = unrecorded_files(out, manifest)
            if not foreign:
                return "replace"
            reason = (f"holds {len(foreign)} file(s) that odmt did not write "
                      f"(e.g. {', '.join(foreign[:3])})")
        elif family is not None:
            reason = f"is another odmt folder ({manifest.get('format')}), not a {self.what}"
        else:
            entries = sorted(p.name for p in out.iterdir())
            reason = (f"is not a {self.what} written by odmt (no odmt manifest.json) and holds "
                      f"{len(entries)} entries (e.g. {', '.join(entries[:3])})")
        if not self.force:
            raise OutputFolderError(f"--out {out} {reason}; refusing to replace it. {self.refuse_hint}")
        cwd = Path.cwd().resolve()
        if out == Path(out.anchor) or out == Path.home().resolve() or out == cwd or out in cwd.parents:
            raise OutputFolderError(f"--out {out} {reason}; even with --force, odmt will not move the root, "
                                    "home or current folder aside. Choose another --out")
        return "backup"

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._recover()
            self.check()  # fail before any work; checked again at commit
            self.stage.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._committed:
                shutil.rmtree(self.stage, ignore_errors=True)
        finally:
            self._unlock()

    def commit(self) -> Path:
        """Swap the finished stage in for `out`; returns `out`."""
        if not (self.stage / MANIFEST).is_file():
            raise RuntimeError(f"{self.stage} has no {MANIFEST}: the manifest is written last, before commit()")
        plan = self.check()  # the folder may have changed since the run started
        fault_point("before-swap")
        if plan == "backup":
            self.backup = self._backup_name()
            os.rename(self.out, self.backup)  # moved aside whole: the user's files stay as they were
            self.log(f"moved the existing {self.out} aside to {self.backup} (--force; nothing was deleted)")
        if self.out.exists():
            if _exchange(self.stage, self.out):  # out <- new, stage <- old, in one step
                self._committed = True
                fault_point("after-swap")
                _remove_tree(self.stage, fault=True)
            else:
                os.rename(self.out, self.old)
                fault_point("between-renames")
                os.rename(self.stage, self.out)
                self._committed = True
                _remove_tree(self.old, fault=True)
        else:
            os.rename(self.stage, self.out)
            self._committed = True
        return self.out

    # -- pieces ----------------------------------------------------------------------------------
    def _lock(self) -> None:
        self._lock_fd = FolderLock(self.out).acquire()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the lock file stays (removing it would race)
            self._lock_fd = None

    def _recover(self) -> None:
        """Leftovers of a killed run (we hold the lock, so no other run owns them)."""
        if self.old.is_dir() and not self.old.is_symlink():
            if self.out.exists():
                _remove_tree(self.old)  # the new output made it in; this is the old one
            else:
                os.rename(self.old, self.out)  # killed between the two renames: put the old output back
                self.log(f"restored {self.out} from an interrupted earlier run")
        if self.stage.is_symlink() or self.stage.is_file():
            self.stage.unlink()
        elif self.stage.exists():
            _remove_tree(self.stage)

    def _backup_name(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidate, n = self.out.with_name(f"{self.out.name}.backup-{stamp}"), 1
        while candidate.exists():
            candidate, n = self.out.with_name(f"{self.out.name}.backup-{stamp}-{n}"), n + 1
        return candidate


def _remove_tree(path: Path, fault: bool = False) -> None:
    if fault and os.environ.get(FAULT_ENV) == "removing-old":  # die with the old folder half deleted
        victim = next((p for p in sorted(path.rglob("*")) if p.is_file()), None)
        if victim is not None:
            victim.unlink()
        fault_point("removing-old")
    shutil.rmtree(path)
