"""Locate a runnable `tritonserver` and prepare what it needs on CPU.

Two installs are supported: a container / system install (`/opt/tritonserver` plus `tritonserver` on
PATH, preferred when present) and the binary bundled in the `nvidia-pytriton` wheel (2.51, python
backend only), which needs its python-backend stub copied next to `libtriton_python.so`, the venv's
`bin` first on PATH and the base interpreter's libpython on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from odmt_t4r.output_folder import atomic_write

STUB = "triton_python_backend_stub"
SYSTEM_ROOT = Path("/opt/tritonserver")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    cache_dir: Path | None = None
    lib_dirs: tuple[Path, ...] = field(default_factory=tuple)


def pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locate without importing pytriton (slow, pulls in much)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _same_file(a: Path, b: Path) -> bool:
    return b.exists() and filecmp.cmp(a, b, shallow=False)  # byte compare: a new pytriton may ship a new stub


def _atomic_copy(src: Path, dst: Path) -> None:
    # Copy then rename, so concurrent servers never see a half-written stub.
    def copy(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)

    atomic_write(dst, copy)


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "odmt-t4r"


def ensure_python_stub(root: Path) -> Path:
    """Return a backend directory whose python backend has the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB
    if not stub.exists():
        raise FileNotFoundError(f"pytriton has no python backend stub for Python {version}: {stub}")
    backends = root / "backends"
    try:
        if not _same_file(stub, backends / "python" / STUB):
            _atomic_copy(stub, backends / "python" / STUB)
        return backends
    except OSError:
        pass  # read-only site-packages: use a private copy of the backends
    cached = _cache_home() / f"tritonserver-backends-py{version}-{stub.stat().st_size}"
    if not _same_file(stub, cached / "python" / STUB):
        shutil.copytree(backends, cached, dirs_exist_ok=True)
        _atomic_copy(stub, cached / "python" / STUB)
    return cached


def find_triton() -> TritonInstall:
    """The tritonserver to run: a system install when present, else the one in nvidia-pytriton."""
    on_path = shutil.which("tritonserver")
    if on_path and SYSTEM_ROOT.exists():
        return TritonInstall(Path(on_path), SYSTEM_ROOT / "backends", SYSTEM_ROOT / "caches")
    root = pytriton_root()
    if root is None:
        if on_path:
            return TritonInstall(Path(on_path), Path(on_path).resolve().parent.parent / "backends")
        raise FileNotFoundError("no tritonserver: install nvidia-pytriton or run inside a Triton container")
    libs = (root.parent.parent / "nvidia_pytriton.libs", root / "backends" / "python", root / "caches" / "local")
    return TritonInstall(root / "bin" / "tritonserver", ensure_python_stub(root), root / "caches",
                         tuple(p for p in libs if p.exists()))


def _prepend(paths: list[str], current: str | None) -> str:
    parts = [p for p in paths if p] + ([current] if current else [])
    return os.pathsep.join(dict.fromkeys(parts))  # dedupe, keep order


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its python-backend stubs."""
    env = dict(os.environ if base is None else base)
    # The stub ignores PYTHONPATH and finds its packages from the first `python` on PATH: the venv's.
    env["PATH"] = _prepend([str(Path(sys.prefix) / "bin")], env.get("PATH"))
    # The stub links libpython3.x; load the base interpreter's so the stdlib and libpython match.
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env["LD_LIBRARY_PATH"] = _prepend([libdir, *map(str, install.lib_dirs)], env.get("LD_LIBRARY_PATH"))
    env.pop("PYTHONHOME", None)  # would override the venv discovery above
    return env
