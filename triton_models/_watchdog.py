"""Watchdog of one tritonserver, so the server never outlives the process that started it.

    python _watchdog.py PGID SHM_PREFIX GRACE_SECONDS   (stdin: the read end of a pipe the launcher holds)

`TritonServer.start` runs this script (by path: no package imports, quick to start) in its own session,
with stdin the read end of a pipe whose write end only the launcher holds. The read returns when the
launcher closes it (`stop()`) or dies in any way, SIGKILL included. Then, if the server's process group
is still alive: SIGTERM to the group (tritonserver stops its python-backend stubs and frees their shared
memory), SIGKILL after GRACE_SECONDS; last, the group's /dev/shm regions (SHM_PREFIX*) are removed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    pgid, prefix, grace = int(argv[1]), argv[2], float(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the launcher's to handle
    try:
        while os.read(0, 4096):  # EOF: the launcher closed the pipe or died
            pass
    except OSError:
        pass
    if group_alive(pgid):
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while group_alive(pgid):
            if time.monotonic() > deadline:
                _killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + grace
            time.sleep(0.05)
    if prefix:
        for path in Path("/dev/shm").glob(f"{prefix}*"):
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
