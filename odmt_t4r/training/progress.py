"""Progress of long loops: a tqdm bar on a terminal, plain lines in logs.

When stderr is not a terminal (CI, `2> file`, a pipe), tqdm's carriage-return refreshes would each land
in the log; there a line with the count, the rate and the estimated time left is printed every
`every_s` seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm


class PlainProgress:
    """Iterates `items`, printing `desc: n/total (rate/s, ETA)` to stderr at most every `every_s` seconds."""

    def __init__(self, items: Iterable, total: int | None, desc: str, every_s: float = 10.0):
        self.items, self.total, self.desc, self.every_s = items, total, desc, every_s
        self.postfix = ""

    def set_postfix(self, **kwargs) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def __iter__(self) -> Iterator:
        start = last = time.perf_counter()
        n = 0
        for item in self.items:
            yield item
            n += 1
            now = time.perf_counter()
            if now - last >= self.every_s:
                last = now
                rate = n / (now - start)
                eta = f", {(self.total - n) / rate:.0f}s left" if self.total and rate > 0 else ""
                of = f"/{self.total}" if self.total else ""
                print(f"{self.desc}: {n}{of} ({rate:.1f}/s{eta}) {self.postfix}".rstrip(), file=sys.stderr, flush=True)


class _Silent(PlainProgress):
    def __iter__(self) -> Iterator:
        yield from self.items


def progress_bar(items: Iterable, total: int | None = None, desc: str = "", enabled: bool = True,
                 every_s: float = 10.0):
    """A tqdm bar on a terminal, plain periodic lines otherwise, nothing when disabled."""
    if not enabled:
        return _Silent(items, total, desc)
    if sys.stderr.isatty():
        return tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr)
    return PlainProgress(items, total, desc, every_s)
