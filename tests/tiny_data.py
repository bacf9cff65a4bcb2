"""Tiny csv sources, prepared folders and untrained RUNs for tests that care about folders, not quality."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_csv_source(folder: Path, n_items: int = 6, n_users: int = 8, length: int = 5) -> list[str]:
    """interactions.csv + items.csv in `folder` (user u walks the catalog from item u); returns the
    `odmt prepare` arguments that read them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"u{u}", f"i{(u + s) % n_items}", 1_700_000_000 + s) for u in range(n_users) for s in range(length)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                  "text": [f"product number {k}" for k in range(n_items)]}).to_csv(folder / "items.csv", index=False)
    return ["--source", "csv", "--interactions", str(folder / "inter.csv"), "--items", str(folder / "items.csv")]


def prepare_tiny(folder: Path, out: Path, max_length: int = 4, **source) -> Path:
    """A prepared DIR (ID only) from `write_csv_source(folder, **source)`."""
    from odmt_t4r.cli import main

    args = write_csv_source(folder, **source)
    assert main(["prepare", *args, "--no-features", "--max-length", str(max_length), "--out", str(out)]) == 0
    return out


def untrained_run(data_dir: Path, out: Path, seed: int = 0) -> Path:
    """A small untrained sasrec RUN for `data_dir` (serving only has to reproduce it)."""
    import torch

    from odmt_t4r.model import build_model

    torch.manual_seed(seed)
    model = build_model("sasrec", data_dir, d_model=16, n_heads=2, seq_layers=1)
    model.save_pretrained(out, extra={"data": {"dir": str(data_dir)}})
    return out
