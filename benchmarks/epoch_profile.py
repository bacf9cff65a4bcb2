"""Where one training epoch's time goes: seconds per part of one epoch of each model, on one torch thread.

    .venv/bin/python benchmarks/epoch_profile.py [--data ml-100k fashion] [--models sasrec odmt odmt-imt]
                                                 [--steps N] [--threads 1]

Parts: the feature lookup (frozen tokens from the ModalityStore), the item tower (the IMT or the independent
projections, lookup excluded), the branch MLPs, the sequence encoders, the loss (PeerDistillationTask: CE
and KD), the rest of the forward (index arithmetic, masks), the backward pass, the optimizer step, and
the validation after each epoch (the plain mean, each branch and the fusion chosen last), and the coarse
fusion grid's extra cost, spread over the `fusion_every` epochs it is run once in (TrainConfig).
Parts are timed with wall clocks around the modules' forwards (CPU: synchronous). Models are the presets
with the TrainConfig defaults (their default loss). Writes benchmarks/results/epoch_profile.json and prints
a markdown table (seconds per epoch, and each part as a share of the model's epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

RESULTS = Path(__file__).parent / "results" / "epoch_profile.json"
PARTS = ("feature lookup", "item tower", "branch MLPs", "sequence encoders", "loss", "other forward",
         "backward", "optimizer", "validation", "fusion grid")
TRAINING_PARTS = PARTS[:-2]  # one epoch's training steps: the step cost


class Clock:
    """Wall seconds per named part; nested parts are subtracted from the part that contains them."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._stack: list[list] = []  # [name, start, seconds of children]

    def start(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def stop(self) -> float:
        name, start, children = self._stack.pop()
        total = time.perf_counter() - start
        self.seconds[name] += total - children
        if self._stack:
            self._stack[-1][2] += total
        return total

    def wrap_module(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop() and None)  # None keeps the output

    def wrap_method(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            self.start(name)
            try:
                return fn(*a, **kw)
            finally:
                self.stop()
        setattr(obj, attr, timed)


def profile_epoch(data_dir: Path, preset: str, steps: int | None) -> dict:
    import torch
    from odmt_t4r.training.fusion import choose_fusion, epoch_candidates, evaluate_fusions
    from odmt_t4r.training.train import TrainConfig, _optimizer, build_model
    from odmt_t4r.training.data import PreparedData
    from dataclasses import asdict

    cfg = TrainConfig.from_dict({"model": preset})
    torch.manual_seed(0)
    data = PreparedData(data_dir)
    model = build_model(cfg.model, data.info, **{k: v for k, v in asdict(cfg.model_config).items()
                                                  if k not in cfg.model_config.DERIVED})
    optimizer = _optimizer(model, cfg)
    clock = Clock()
    if model.item_tower.store is not None:
        clock.wrap_method(model.item_tower.store, "lookup", "feature lookup")
    clock.wrap_module(model.item_tower, "item tower")
    for branch in model.branches.values():
        clock.wrap_module(branch.mlp, "branch MLPs")
        clock.wrap_module(branch.encoder, "sequence encoders")
    clock.wrap_module(model.task, "loss")
    model.train()
    n = 0
    for batch in data.batches("train", cfg.batch_size, shuffle=True, seed=0):
        clock.start("other forward")
        out = model(batch["items"], progress=0.5)
        clock.stop()
        optimizer.zero_grad(set_to_none=True)
        clock.start("backward")
        out["loss"].backward()
        clock.stop()
        clock.start("optimizer")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        clock.stop()
        n += 1
        if steps and n >= steps:
            break
    epoch_steps = data.num_batches("train", cfg.batch_size)
    scale = epoch_steps / n  # a partial epoch is scaled to a whole one
    seconds = {k: v * scale for k, v in clock.seconds.items()}
    model.eval()
    grid = evaluate_fusions(model, data, "valid", step=cfg.epoch_fusion_step, batch_size=cfg.eval_batch_size)
    incumbent = choose_fusion(grid)
    t0 = time.perf_counter()  # an epoch between two grids: the mean, each branch and the last grid's choice
    evaluate_fusions(model, data, "valid", candidates=epoch_candidates(model.branch_names, incumbent),
                     batch_size=cfg.eval_batch_size)
    seconds["validation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_fusions(model, data, "valid", step=cfg.epoch_fusion_step, batch_size=cfg.eval_batch_size)
    grid_seconds = time.perf_counter() - t0
    # the grid replaces an ordinary validation every `fusion_every` epochs: its extra cost, spread over them
    seconds["fusion grid"] = max(0.0, grid_seconds - seconds["validation"]) / cfg.fusion_every
    return {"preset": preset, "loss": model.config.loss, "item_tower": model.config.item_tower,
            "branches": model.branch_names, "steps_timed": n, "steps_per_epoch": epoch_steps,
            "fusion_candidates": len(results), "fusion_every": cfg.fusion_every,
            "grid_seconds": round(grid_seconds, 3), "seconds": {p: round(seconds.get(p, 0.0), 3) for p in PARTS},
            "epoch_seconds": round(sum(seconds.get(p, 0.0) for p in PARTS), 2),
            "step_seconds": round(sum(seconds.get(p, 0.0) for p in TRAINING_PARTS) / epoch_steps, 4)}


def table(result: dict) -> str:
    lines = []
    for dataset, models in result["datasets"].items():
        names = list(models)
        lines += [f"\n{dataset} (seconds per epoch; share of the epoch)\n",
                  "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for p in PARTS:
            cells = [f"{m['seconds'][p]:.2f} ({m['seconds'][p] / m['epoch_seconds']:.0%})" for m in models.values()]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        base = models.get("sasrec")
        lines.append("| **epoch** | " + " | ".join(
            f"**{m['epoch_seconds']:.1f}**" + (f" ({m['epoch_seconds'] / base['epoch_seconds']:.1f}x sasrec)" if base else "")
            for m in models.values()) + " |")
        lines.append("| step (training parts / steps) | " + " | ".join(
            f"{m['step_seconds'] * 1000:.0f} ms" + (f" ({m['step_seconds'] / base['step_seconds']:.2f}x sasrec)" if base else "")
            for m in models.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["ml-100k", "fashion"], help="prepared DIRs or source names")
    ap.add_argument("--models", nargs="+", default=["sasrec", "odmt", "odmt-imt"])
    ap.add_argument("--steps", type=int, default=None, help="time this many steps and scale to an epoch "
                                                            "(default: the whole epoch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--write-docs", action="store_true", help="also rewrite the table in docs/benchmarks/training-speed.md")
    args = ap.parse_args()
    import torch
    from train_speed import _prepared  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

    torch.set_num_threads(args.threads)
    result = {"benchmark": "epoch_profile", "threads": args.threads, "datasets": {}}
    for d in args.data:
        data_dir = Path(d) if Path(d).is_dir() else _prepared(d, Path(args.work))
        result["datasets"][d] = {}
        for preset in args.models:
            r = profile_epoch(data_dir, preset, args.steps)
            result["datasets"][d][preset] = r
            print(f"{d} {preset}: {r['epoch_seconds']:.1f}s per epoch", file=sys.stderr, flush=True)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.write_docs:
        from docs_page import write_block

        command = "python benchmarks/epoch_profile.py " + " ".join(a for a in sys.argv[1:] if a != "--write-docs")
        print(f"wrote {write_block('training-speed.md', 'epoch-profile', table(result), command)}", file=sys.stderr)


if __name__ == "__main__":
    main()
