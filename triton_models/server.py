"""`odmt serve`: run a real Triton Inference Server on a model repository (CPU is fine).

`TritonServer` starts `tritonserver` (a system install, else the binary bundled in `nvidia-pytriton`)
in its own process group on 127.0.0.1, tees its log, waits until the server and every model are
ready, and on `stop()` leaves no process (python-backend stubs included) and no /dev/shm region behind.

The server dies with its launcher, even when the launcher is SIGKILLed: tritonserver gets SIGTERM from
the kernel when its parent dies (prctl PR_SET_PDEATHSIG, set by a tiny exec wrapper), and a watchdog
process (_watchdog.py, in its own session) waits on a pipe only the launcher holds; when it closes, the
watchdog stops the whole process group (stubs included, SIGKILL after a grace period) and removes the
group's shared memory.

`odmt serve` checks the repository against its manifest (hashes of every file, the signature when
ODMT_SIGNING_KEY is set) before Triton loads anything from it: see odmt_t4r/trust.py.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

from triton_models._tritonenv import TritonInstall, find_triton, server_env

SHM_DIR = Path("/dev/shm")
WATCHDOG = Path(__file__).with_name("_watchdog.py")
PR_SET_PDEATHSIG = 1
# exec wrapper: ask for SIGTERM when the launcher dies, give up if it already did, then become tritonserver
_DIE_WITH_PARENT = ("import ctypes, os, sys\n"
                    "ctypes.CDLL(None).prctl({opt}, {sig}, 0, 0, 0)\n"
                    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
                    "os.execv(sys.argv[2], sys.argv[2:])\n").format(opt=PR_SET_PDEATHSIG, sig=int(signal.SIGTERM))
SHM_PREFIX = "triton_python_backend_shm_region_"
ERROR_LINE = re.compile(r"E\d{4} ")
GPU_NOISE = re.compile(r"(?i)cuda|gpu|nvml|dcgm")


class TritonServerError(OSError):
    """The server could not start, became unready, or exited; the message ends with its log tail
    (an environment error, as OSError: the CLI prints it as one line, exit 2)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _free_ports(host: str, count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:  # distinct ports: the kernel may hand the same one out twice
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def _check_free(host: str, ports: list[int]) -> None:
    # Another server on our port would answer the readiness poll in our place.
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise TritonServerError(f"port {port} on {host} is not free: {exc}") from None


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while scanning
        fields = stat[stat.rindex(")") + 2:].split()  # fields after "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class TritonServer:
    """A `tritonserver` process serving `repo`; use as a context manager or call start()/stop()."""

    def __init__(self, repo: str | os.PathLike, http_port: int | None = None, grpc_port: int | None = None,
                 host: str = "127.0.0.1", log_file: str | os.PathLike | None = None, *,
                 metrics_port: int | None = None, timeout: float = 120.0, exit_timeout: int = 5,
                 echo: TextIO | None = None, log_verbose: int = 0, extra_args: tuple[str, ...] = (),
                 model_control: str = "none"):
        if model_control not in ("none", "explicit"):
            raise ValueError(f"model_control must be 'none' or 'explicit', not {model_control!r}")
        self.repo = Path(repo).resolve()
        self.host = host
        picked = iter(_free_ports(host, 3))
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self.log_file = Path(log_file) if log_file else None
        self.timeout, self.exit_timeout, self.echo = timeout, exit_timeout, echo
        self.log_verbose, self.extra_args = log_verbose, tuple(extra_args)
        # explicit: every model is loaded at start, and `load()` swaps in a new version while serving
        self.model_control = model_control
        # A per-server shm prefix, so stop() removes exactly this server's python-backend regions.
        self.shm_prefix = f"{SHM_PREFIX}odmt{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self._watchdog_pipe: int | None = None  # write end: closing it (or dying) wakes the watchdog
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # connect to a wildcard bind via loopback

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "".join(list(self._tail)[-lines:])

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self, install: TritonInstall) -> list[str]:
        cmd = [str(install.binary), f"--model-repository={self.repo}",
               f"--backend-directory={install.backend_dir}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout}",
               f"--log-verbose={self.log_verbose}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if install.cache_dir and install.cache_dir.exists():
            cmd.append(f"--cache-directory={install.cache_dir}")
        if self.model_control == "explicit":
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
        return cmd + list(self.extra_args)

    def start(self) -> "TritonServer":
        if self.running:
            return self
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.repo}")
        _check_free(self.host, [self.http_port, self.grpc_port, self.metrics_port])
        install = find_triton()
        sink = open(self.log_file, "a", encoding="utf-8") if self.log_file else None  # fail here, not in the thread
        command = self.command(install)
        if threading.current_thread() is threading.main_thread():
            # PDEATHSIG fires when the forking THREAD exits: only tie the server to the main thread's life
            command = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        self.process = subprocess.Popen(
            command, env=server_env(install), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)  # own group: stop() can reach the stubs
        self._reader = threading.Thread(target=self._pump_log, args=(sink,), name="tritonserver-log", daemon=True)
        self._reader.start()
        atexit.register(self.stop)
        try:
            self._start_watchdog()
            self.wait_ready(self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_watchdog(self) -> None:
        read_end, write_end = os.pipe()  # both non-inheritable; Popen hands read_end over as stdin
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", str(WATCHDOG), str(self.process.pid), self.shm_prefix,
                 str(self.exit_timeout + 5)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # outside the launcher's group: a signal to that group spares it
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end

    def _stop_watchdog(self) -> None:
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)  # EOF: the watchdog checks the (stopped) group and exits
            self._watchdog_pipe = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
            self.watchdog = None

    def _pump_log(self, sink: TextIO | None) -> None:
        try:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                self._tail.append(line)
                for stream in (sink, self.echo):
                    try:
                        if stream is not None:
                            stream.write(line)
                            stream.flush()
                    except (OSError, ValueError):
                        pass  # keep draining the pipe, or a full pipe would block the server
        finally:
            if sink:
                sink.close()

    def log_errors(self, lines: int = 10) -> str:
        """The server's error lines (E...), minus the harmless CUDA/GPU ones of a CPU machine."""
        errors = [ln for ln in list(self._tail) if ERROR_LINE.match(ln) and not GPU_NOISE.search(ln)]
        return "".join(errors[-lines:])

    def _error(self, message: str) -> TritonServerError:
        if self.process.poll() is not None and self._reader is not None:
            self._reader.join(2)  # read the last lines before quoting them
        else:
            time.sleep(0.2)
        errors = self.log_errors()
        errors = f"\n--- tritonserver errors ---\n{errors}" if errors else ""
        return TritonServerError(f"{message}{errors}\n--- tritonserver log (tail) ---\n{self.log_tail(25)}")

    def _models_ready(self, client) -> bool:
        if not client.is_server_ready():
            return False
        ready: dict[str, bool] = {}  # a model is ready when one of its versions is (older ones are unloaded)
        for m in client.get_model_repository_index():
            ready[m["name"]] = ready.get(m["name"], False) or m.get("state") == "READY"
        return bool(ready) and all(ready.values())

    def load(self, model: str, timeout: float = 300.0) -> None:
        """(Re)load `model` from the repository (explicit model control): Triton loads the newest version
        while the current one keeps answering, then swaps; requests in flight are not dropped."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0, network_timeout=timeout)
        try:
            client.load_model(model)
        finally:
            client.close()

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=5.0)
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise self._error(f"tritonserver exited with code {code} before it was ready "
                                      f"(repository {self.repo})")
                try:
                    if self._models_ready(client):
                        return
                except Exception:  # not listening yet, or loading
                    pass
                if time.monotonic() > deadline:
                    raise self._error(f"tritonserver was not ready after {timeout:g} s (repository {self.repo})")
                time.sleep(0.1)
        finally:
            client.close()  # an open keep-alive connection would hold up the server's shutdown

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group; remove leftover shm regions. Returns the exit code."""
        atexit.unregister(self.stop)
        proc = self.process
        if proc is None:
            return None
        wait = timeout if timeout is not None else self.exit_timeout + 10
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the server alone: it shuts its stubs down gracefully
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._reap_group(proc.pid)
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout:
            proc.stdout.close()
        self._remove_shm()
        self._stop_watchdog()
        return proc.returncode

    def _reap_group(self, pgid: int, grace: float = 3.0) -> None:
        deadline = time.monotonic() + grace
        while group_pids(pgid):  # stubs orphaned by a killed server
            if time.monotonic() > deadline:
                _killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + grace
            time.sleep(0.05)

    def _remove_shm(self) -> None:
        for path in SHM_DIR.glob(f"{self.shm_prefix}*"):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- CLI ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True,
                        help="model repository written by `odmt export` (checked against its manifest first)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--log-file", default=None, help="also write the server log here")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--watch-seconds", type=float, default=1.0,
                        help="how often to look for a new version in the repository's manifest (odmt add-items "
                             "--repo); it is checked, then loaded without a restart. 0: never")


def _interrupt(signum, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from odmt_t4r.output_folder import format_family, read_manifest
    from odmt_t4r.trust import clear_bytecode_caches, verify_folder
    from triton_models.repository import FORMAT

    # before Triton unpickles ensemble.pkl or imports a model.py from the repository
    if format_family((read_manifest(Path(args.repo)) or {}).get("format")) == format_family(FORMAT):
        clear_bytecode_caches(args.repo)  # left by an earlier server; a planted one would bypass the check
    verify_folder(args.repo, FORMAT, "model repository (from odmt export)", strict=True)
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.host, args.log_file,
                          metrics_port=args.metrics_port, timeout=args.timeout, echo=sys.stderr,
                          log_verbose=args.log_verbose,
                          model_control="explicit" if args.watch_seconds > 0 else "none")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    watcher = VersionWatcher(Path(args.repo))
    try:
        server.start()
        print(f"HTTP  {server.http_url}\nGRPC  {server.grpc_url}\nmetrics  {server.metrics_url}", flush=True)
        next_look = time.monotonic() + args.watch_seconds
        while server.process.poll() is None:
            time.sleep(0.2)
            if args.watch_seconds > 0 and time.monotonic() >= next_look:
                watcher.poll(server)
                next_look = time.monotonic() + args.watch_seconds
        raise TritonServerError(f"tritonserver exited with code {server.process.returncode}")
    except KeyboardInterrupt:
        return 0  # asked to stop: a clean exit
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class VersionWatcher:
    """Loads a repository's new version into a running server: when manifest.json changes (odmt add-items
    --repo writes it last), the repository is checked as at start, then Triton reloads the entry model.
    A repository that fails the check is reported and the served version stays."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.seen = self._stamp()
        self.loaded = self._served(self._manifest())

    def _manifest(self) -> dict:
        try:
            return json.loads((self.repo / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _served(manifest: dict) -> tuple:
        """What the loaded model is made of: the version and every file but the availability state, which the
        executor reads by itself on each request (availability.py): a change of it alone reloads nothing."""
        from triton_models.availability import AVAILABILITY

        files = {k: v for k, v in (manifest.get("files") or {}).items() if k != AVAILABILITY}
        return manifest.get("version"), json.dumps(files, sort_keys=True)

    def _stamp(self):
        try:
            st = (self.repo / "manifest.json").stat()
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def poll(self, server: TritonServer) -> bool:
        """True when a new version was loaded."""
        from odmt_t4r.trust import TrustError, clear_bytecode_caches, verify_folder
        from triton_models.repository import FORMAT

        stamp = self._stamp()
        if stamp is None or stamp == self.seen:
            return False
        self.seen = stamp
        try:
            clear_bytecode_caches(self.repo)  # written by the running stubs; a planted one would bypass the check
            manifest = verify_folder(self.repo, FORMAT, "model repository (from odmt export)", strict=True)
        except TrustError as exc:
            print(f"odmt serve: the repository changed but fails its check; still serving the loaded version: {exc}",
                  file=sys.stderr, flush=True)
            return False
        served = self._served(manifest)
        if served == self.loaded:
            return False  # only the availability state changed: the executor applies it without a reload
        t0 = time.perf_counter()
        try:
            server.load(manifest.get("entry_model", "executor_model"))
        except Exception as exc:  # noqa: BLE001 - Triton keeps the old version when a load fails
            print(f"odmt serve: loading version {manifest.get('version')} failed, still serving the previous one: "
                  f"{exc}", file=sys.stderr, flush=True)
            return False
        self.loaded = served
        print(f"odmt serve: now serving version {manifest.get('version')} ({manifest.get('n_items', '?'):,} items, "
              f"run {manifest.get('run')}), loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return True


def main(argv: list[str] | None = None) -> int:
    """`python -m triton_models.server` = `odmt serve`."""
    from odmt_t4r.cli import main as odmt_main
    return odmt_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
