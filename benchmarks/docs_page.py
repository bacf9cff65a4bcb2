"""Benchmarks regenerate their tables in the docs pages: the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in docs/benchmarks/PAGE.md is replaced (the block is appended when the page has none)."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def write_block(page: str, name: str, text: str, command: str) -> Path:
    """Writes `text`, preceded by the `command` that produced it, into block `name` of docs/benchmarks/`page`."""
    path = DOCS / page
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = (f"{begin}\n<!-- written by {command}; do not edit by hand -->\n\n```bash\n{command}\n```\n\n"
             f"{text.strip()}\n\n{end}")
    page_text = path.read_text() if path.is_file() else f"# {page}\n"
    if begin in page_text and end in page_text:
        head, rest = page_text.split(begin, 1)
        page_text = head + block + rest.split(end, 1)[1]
    else:
        page_text = page_text.rstrip() + "\n\n" + block + "\n"
    path.write_text(page_text)
    return path
