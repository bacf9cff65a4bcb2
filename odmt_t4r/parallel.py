"""Independent trainings at once, one spawned process each: `odmt train --candidates ... --candidate-jobs N`.

Training uses one torch thread by default (TrainConfig.threads), so on a machine with more cores the
candidates of a model selection can train side by side. Each job runs `fn(*args, log=...)` in its own
process; its log lines are relayed to the caller's `log` (prefixed with the job's name), its result is
returned, and its error is raised here. When one job fails (or the caller is interrupted) the others are
stopped: every job writes only its own resumable RUN, so `--resume` continues them.
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import warnings
from typing import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """This process stops when its parent dies, so a killed caller leaves no job training behind
    (Linux prctl PR_SET_PDEATHSIG; elsewhere stop the whole process group)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_jobs(jobs: dict[str, tuple[Callable, tuple]], at_once: int, log: Callable[[str], None]) -> dict:
    """{name: (fn, args)} -> {name: fn(*args, log=...)}, at most `at_once` processes at a time, started in
    the order given. fn must be a module-level function (the spawned process imports it by name)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch or thread state
    messages = ctx.Queue()
    waiting, running, results = list(jobs), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                name = waiting.pop(0)
                fn, args = jobs[name]
                # fn by name, imported after the caller's warning filters are in place (Merlin warns at import)
                running[name] = ctx.Process(target=_job, name=f"odmt-{name}",
                                            args=(messages, name, f"{fn.__module__}:{fn.__qualname__}", args,
                                                  list(warnings.filters)))
                running[name].start()
            try:
                kind, name, value = messages.get(timeout=1.0)
            except queue.Empty:
                for name, proc in list(running.items()):
                    if not proc.is_alive() and messages.empty():  # died without a word: killed, out of memory
                        raise RuntimeError(f"{name}: its training process stopped with exit code {proc.exitcode}")
                continue
            if kind == "log":
                log(f"[{name}] {value}")
            else:
                running.pop(name).join()
                if kind == "error":
                    raise value
                results[name] = value
    finally:
        for proc in running.values():  # a failure or an interrupt: the others stop, their RUNs resume
            proc.terminate()
        for proc in running.values():
            proc.join()
        messages.close()
    return results


def _job(messages, name: str, fn_name: str, args: tuple, warning_filters: list) -> None:
    die_with_parent()
    warnings.filters[:] = warning_filters  # a spawned interpreter starts without the caller's (cli's quiet imports)
    try:
        module, _, qualname = fn_name.partition(":")
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        result = fn(*args, log=lambda m: messages.put(("log", name, m)))
    except BaseException as exc:  # noqa: BLE001 - every failure reaches the caller
        messages.put(("error", name, _sendable(exc)))
    else:
        messages.put(("result", name, result))


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (so the caller's one-line errors still apply)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
