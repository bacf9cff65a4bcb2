"""`odmt train`: fit odmt / sasrec / late-fusion / ablations on a prepared DIR into a RUN folder.

    odmt train --data DIR --model odmt --out RUN [--config FILE.json] [--epochs N] [--seed S] [--resume]

A plain epoch loop over the Merlin dataloader drives the T4R blocks (item tower, TransformerBlock
branches, the PeerDistillationTask): the T4R/HF Trainer expects one `tr.Model` whose input block's masking
produces the targets and evaluates without the history exclusion this project's protocol needs, and the
KD ramp, per-branch logging and exact resume are simpler to get right here.

RUN/ holds:
    config.json        model config + TrainConfig + the prepared DIR and its manifest hash
    model.pt, item_vectors.pt   the best model so far (valid fused NDCG@10); OdmtRecommender.from_pretrained(RUN)
    checkpoint.pt      the last finished epoch: model, optimizer, epoch, best, patience count, RNG state
    log.jsonl          one line per epoch: branch losses, KD weight, valid metrics, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odmt_t4r.model import build_model, model_registry

from .data import PreparedData
from .evaluate import evaluate_model

RUN_FORMAT = "odmt-run/1"
MODEL_FIELDS = ("modalities", "d_model", "n_heads", "imt_layers", "imt_dropout", "text_tokens", "image_tokens", "seq_encoder", "seq_layers",
                "seq_dropout", "id_init", "loss", "tau", "kd_weight", "ramp_epochs")


@dataclass
class TrainConfig:
    """Defaults train fast on 2 CPU cores (the paper: d=768, lr 1e-4, tau 0.3-0.5, on a GPU)."""

    model: str = "odmt"
    # model (passed to the model registry; a preset's defining settings win)
    modalities: list[str] | None = None  # None = every modality the prepared DIR has features for
    d_model: int = 64
    n_heads: int = 2
    imt_layers: int = 2
    imt_dropout: float = 0.1
    text_tokens: int = 8  # IMT text span tokens per item (-1: all 30 stored, as the paper)
    image_tokens: int = 4  # IMT image grid tokens per item, 4 = 2x2 (-1: all 16 stored)
    seq_encoder: str = "gpt2"
    seq_layers: int = 2
    seq_dropout: float = 0.2
    id_init: str = "content"
    loss: str = "auto"  # "full" | "in_batch" | "auto": full softmax up to 2048 items, else in-batch
    tau: float = 0.4
    # 0.2, not 1: on ml-100k (seed 0, batch 128) weight 1 stalled the id branch's CE once the ramp reached
    # it (the undetached teacher is pushed to sharpen); valid NDCG@10 at epoch 10: 0.1192 (0.2) vs 0.1131 (1)
    kd_weight: float = 0.2
    ramp_epochs: float = 5.0
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.1
    # 128 windows of up to 20 targets: 42 steps per ml-100k epoch; 256 gave half the updates and learned slower
    batch_size: int = 128
    eval_batch_size: int = 512
    epochs: int = 30
    patience: int = 5  # epochs without a better valid NDCG@10 before stopping
    grad_clip: float = 5.0
    seed: int = 42
    # torch CPU threads. 1 by default: on a shared 2-core box two OpenMP threads were 10x slower per step
    # (14.5 s vs 1.5 s for odmt on ml-100k with other jobs running); set 2 on an idle machine. Results are
    # reproducible for a fixed thread count.
    threads: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json

    def model_overrides(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms, type vectors
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def train_run(cfg: TrainConfig, data_dir: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
              epochs: int | None = None, log=print) -> dict:
    """Train into `out`; returns {"best_epoch", "best": valid metrics, "epochs_run", "stopped"}.
    With `resume`, the RUN's saved TrainConfig is used (only `epochs` and `progress` may change)."""
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        saved = json.loads((out / "config.json").read_text())
        progress = cfg.progress
        cfg = TrainConfig.from_dict(saved["train"])
        cfg.progress = progress
    elif ckpt_path.is_file():
        raise FileExistsError(f"{out} already holds a training run; pass --resume or choose another --out")
    if epochs is not None:
        cfg.epochs = epochs
    if cfg.model not in model_registry:
        raise ValueError(f"unknown model '{cfg.model}'; choose one of {sorted(model_registry)}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _train(cfg, data_dir, out, resume, ckpt_path, log)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, data_dir, out: Path, resume: bool, ckpt_path: Path, log) -> dict:
    seed_everything(cfg.seed)

    data = PreparedData(data_dir)
    model = build_model(cfg.model, data.info, **cfg.model_overrides())
    optimizer = _optimizer(model, cfg)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"format": RUN_FORMAT, "train": asdict(cfg),
                "data": {"dir": str(data.root), "manifest_sha256": data.info.manifest_sha256,
                         "source": data.info.manifest.get("source")}}

    state = {"epoch": -1, "best_metric": -math.inf, "best_epoch": -1, "best": {}, "bad_epochs": 0, "stopped": False}
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["data_sha256"] != run_info["data"]["manifest_sha256"]:
            raise ValueError(f"{out} was trained on other prepared data (manifest hash differs); cannot resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
        log(f"resuming {out} after epoch {state['epoch'] + 1} (best valid NDCG@10 {state['best_metric']:.4f} "
            f"at epoch {state['best_epoch'] + 1})")
    else:
        (out / "log.jsonl").unlink(missing_ok=True)
    model_payload = {**run_info, "model": asdict(model.config)}
    (out / "config.json").write_text(json.dumps(model_payload, indent=2, default=str) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.model}: branches {model.branch_names}, {n_params:,} parameters, loss {model.config.loss}, "
        f"{data.num_rows('train'):,} train rows, L={data.max_length}, {data.info.n_index - 3:,} items")

    start = state["epoch"] + 1
    for epoch in range(start, cfg.epochs):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        batches = data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        bar = tqdm(batches, total=data.num_batches("train", cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False, file=sys.stderr)
        kd_w = model.task.weight(epoch)
        for batch in bar:
            outputs = model(batch["items"], epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            outputs["loss"].backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            n_batches += 1
            sums["loss"] = sums.get("loss", 0.0) + outputs["loss"].item()
            for name, value in outputs["losses"].items():
                sums[name] = sums.get(name, 0.0) + value.item()
            bar.set_postfix(loss=f"{outputs['loss'].item():.3f}")
        losses = {k: v / max(1, n_batches) for k, v in sums.items()}
        train_seconds = time.perf_counter() - t0
        metrics = evaluate_model(model, data, "valid", cfg.eval_batch_size)
        seconds = time.perf_counter() - t0

        improved = metrics["NDCG@10"] > state["best_metric"]
        if improved:
            state.update(best_metric=metrics["NDCG@10"], best_epoch=epoch, bad_epochs=0,
                         best={k: v for k, v in metrics.items() if isinstance(v, float)})
            model.save_pretrained(out, extra=run_info)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["stopped"] = state["bad_epochs"] >= cfg.patience

        record = {"epoch": epoch + 1, "losses": losses, "kd_weight": kd_w,
                  "valid": {k: v for k, v in metrics.items() if isinstance(v, float)},
                  "improved": improved, "train_seconds": round(train_seconds, 2), "seconds": round(seconds, 2)}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        per_branch = " ".join(f"{b} {_fmt(metrics[f'{b}/NDCG@10'])}" for b in model.branch_names
                              if f"{b}/NDCG@10" in metrics)
        branch_losses = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs} loss {losses['loss']:.3f} [{branch_losses}] kd_w {kd_w:.3f} | "
            f"valid NDCG@10 {_fmt(metrics['NDCG@10'])} HR@10 {_fmt(metrics['HR@10'])} ({per_branch})"
            f"{' *' if improved else ''} | {seconds:.1f}s")

        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                      "torch_rng": torch.get_rng_state(), "data_sha256": run_info["data"]["manifest_sha256"]},
                     ckpt_path)
        if state["stopped"]:
            log(f"early stop: no better valid NDCG@10 for {cfg.patience} epochs")

    log(f"best valid NDCG@10 {state['best_metric']:.4f} at epoch {state['best_epoch'] + 1}; model in {out}")
    return {"best_epoch": state["best_epoch"] + 1, "best": state["best"], "epochs_run": state["epoch"] + 1,
            "stopped": state["stopped"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a prepared DIR (odmt prepare)")
    p.add_argument("--model", choices=sorted(model_registry), default=None, help="default: odmt")
    p.add_argument("--out", required=True, help="the RUN folder")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue RUN from its last finished epoch")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    settings = {}
    if args.config:
        settings = json.loads(Path(args.config).read_text())
    for key in ("model", "seed"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.no_progress:
        settings["progress"] = False
    try:
        cfg = TrainConfig.from_dict(settings)
        summary = train_run(cfg, args.data, args.out, resume=args.resume, epochs=args.epochs)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"odmt train: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
