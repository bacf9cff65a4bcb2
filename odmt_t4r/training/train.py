"""`odmt train`: fit odmt / sasrec / late-fusion / ablations on a prepared DIR into a RUN folder.

    odmt train --data DIR --model odmt --out RUN [--config FILE.json] [--epochs N] [--seed S] [--resume]
               [--<any TrainConfig or OdmtConfig field>, e.g. --kd-mode mutual --d-model 128]

A plain epoch loop over the Merlin dataloader drives the T4R blocks (item tower, TransformerBlock
branches, the PeerDistillationTask): the T4R/HF Trainer expects one `tr.Model` whose input block's masking
produces the targets and evaluates without the history exclusion this project's protocol needs, and the
KD ramp, per-branch logging and exact resume are simpler to get right here.

After each epoch every branch, the plain mean and the fusion chosen last are scored on the validation split
(training/fusion.py), and every `fusion_every` epochs a coarse grid of fusions. The model kept is the epoch
with the best fused validation NDCG@10; training stops when that score has not improved for `patience`
epochs. The final fusion is then chosen on a finer grid and saved.

RUN/ holds:
    config.json        model config (with the chosen fusion) + TrainConfig + the prepared DIR and its hash
    model.pt, item_vectors.pt   the best model (valid fused NDCG@10; its averaged weights when --average-epochs
                       is set); OdmtRecommender.from_pretrained(RUN)
    checkpoint.pt      the last finished epoch: model, optimizer, epoch, best, patience count, RNG state,
                       weight average
    log.jsonl          one line per finished epoch: branch losses, KD weight, valid metrics, seconds
    fusion.json        every candidate fusion's validation metrics and the choice

`odmt train --candidates A B ...` / `--model odmt-auto` choose among several models: selection.py, a layer
above this one; the command line is training/command.py.
"""

from __future__ import annotations

import contextlib
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

from odmt_t4r.flags import flag, typed
from odmt_t4r.model import OdmtConfig, build_model, model_registry
from odmt_t4r.model.prepared import PreparedInfo
from odmt_t4r.output_folder import atomic_write, fault_point
from odmt_t4r.trust import write_run_manifest

from . import distributed
from .averaging import WeightAverage
from .data import PreparedData
from .fusion import choose_fusion, epoch_candidates, evaluate_fusions, select_fusion
from .progress import progress_bar

MODEL_CHOICES = sorted(model_registry)
STOP_ON = ("fused", "any")  # TrainConfig.stop_on: what counts as progress for early stopping

from odmt_t4r.contract import RUN_CONFIG, RUN_FORMAT, RunFolder, is_run_write  # noqa: E402
SUMMARY = "summary.json"  # a multi-process run's summary, left by rank 0 for the launcher


@dataclass
class TrainConfig:
    """How to train one model. `model_config` is the model (OdmtConfig); a preset's defining settings win
    over it. Defaults train on 2 CPU cores (the paper: d=768, lr 1e-4, tau 0.3-0.5, on a GPU). Choosing
    among several models is a layer above this one (selection.py)."""

    model: str = "odmt"
    model_config: OdmtConfig = field(default_factory=OdmtConfig)
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.1
    # 128 windows of up to 20 targets: 42 steps per ml-100k epoch; 256 gave half the updates and learned slower
    batch_size: int = 128
    eval_batch_size: int = 512
    # a ceiling, not the schedule: early stopping ends runs (the KD ramp is a fraction of this budget)
    epochs: int = 100
    patience: int = 5  # epochs without a better valid score (see stop_on) before the run stops
    # what counts as progress for early stopping: "any" = the fused valid NDCG@10 or any branch's (a branch
    # still improving keeps the run going); "fused" = the fused score alone. "any" scored higher on validation
    # on ml-100k and fashion (equal on sparse-text) for 3-8% more wall time (benchmarks/quality.py, odmt-stop-fused)
    stop_on: str = field(default="any", metadata=flag("what counts as progress for early stopping: the fused "
                                                        "valid NDCG@10 or any branch's, or the fused score alone",
                                                        choices=STOP_ON))
    # the coarse fusion grid is scored after the first epoch and every this many; the epochs in between
    # score the plain mean, each branch and the last grid's choice (the final fusion always uses the fine grid)
    fusion_every: int = 5
    grad_clip: float = 5.0
    # evaluate, keep and serve an exponential moving average of the weights over about this many epochs
    # of steps (averaging.py); 0 = the last step's weights
    average_epochs: float = 0.0
    # with average_epochs: score the raw weights beside the averaged ones after every epoch and keep
    # whichever is better on validation (averaging helps on some catalogs and not on others)
    average_select: bool = False
    seed: int = 42
    fusion_step: float = 0.1  # weight grid of the final fusion choice (twice as coarse after each epoch)
    # torch CPU threads. 1 by default: on a shared 2-core box two OpenMP threads were 10x slower per step
    # (14.5 s vs 1.5 s for odmt on ml-100k with other jobs running); set 2 on an idle machine. Results are
    # reproducible for a fixed thread count.
    threads: int = 1
    # processes training together (torch DDP: gloo on CPU, NCCL on GPU); each reads its own shard of the
    # training batches, rank 0 evaluates and writes the RUN. Also set by torchrun (WORLD_SIZE).
    nproc: int = 1
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda"
    amp: str = "off"  # mixed precision: "off", "bf16" (CPU or GPU), "fp16" (GPU only, with loss scaling)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json

    @property
    def epoch_fusion_step(self) -> float:
        """The coarser grid scored after every epoch: a subset of the final grid, so the final choice is
        never worse on validation than the epoch's."""
        return 2 * self.fusion_step if 2 * self.fusion_step <= 0.5 else self.fusion_step

    def validate(self) -> "TrainConfig":
        if self.model not in MODEL_CHOICES:
            raise ValueError(f"unknown model '{self.model}'; choose one of {MODEL_CHOICES}")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "threads", "nproc", "fusion_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.average_epochs >= 0:
            raise ValueError(f"average_epochs must be >= 0, got {self.average_epochs}")
        if self.average_select and not self.average_epochs:
            raise ValueError("average_select needs average_epochs > 0 (there is no average to choose)")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.stop_on not in STOP_ON:
            raise ValueError(f"stop_on={self.stop_on!r}; choose one of {STOP_ON}")
        if not 0 < self.fusion_step <= 0.5:
            raise ValueError(f"fusion_step must be in (0, 0.5], got {self.fusion_step}")
        if self.device not in ("auto", "cpu", "cuda") or self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"device must be auto/cpu/cuda and amp off/bf16/fp16; got {self.device!r}, {self.amp!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")
        if self.amp == "fp16" and self.torch_device().type != "cuda":
            raise ValueError("amp fp16 needs a CUDA device (on CPU use amp bf16)")
        return self

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The device to train on: CUDA when asked for or present (auto), else the CPU."""
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From JSON: TrainConfig keys, model keys nested under "model_config" or given flat; every value
        is type-checked, so a typo or a wrong type is a clear error rather than a late crash."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a JSON object, got {type(d).__name__}")
        own = {f.name for f in fields(cls)}
        model_keys = {f.name for f in fields(OdmtConfig)}
        nested = d.get("model_config") or {}
        if not isinstance(nested, dict):
            raise ValueError("model_config must be a JSON object")
        flat_model = {k: v for k, v in d.items() if k in model_keys and k not in own}
        unknown = sorted(set(d) - own - model_keys) + sorted(set(nested) - model_keys)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(own | model_keys)}")
        top = {k: typed(cls, k, v) for k, v in d.items() if k in own and k != "model_config"}
        model = {k: typed(OdmtConfig, k, v) for k, v in {**nested, **flat_model}.items()}
        return cls(**top, model_config=OdmtConfig(**model))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WarmStart:
    """Where a run starts from instead of a fresh initialisation (`odmt update`, training/update.py): `weights`, a
    state dict of the model the TrainConfig builds on the prepared DIR, and `record`, top-level config.json keys
    that say where they came from (`parent_run`). A run resumed from its checkpoint restores that instead."""

    weights: dict[str, torch.Tensor]
    record: dict = field(default_factory=dict)
    train_users: torch.Tensor | None = None  # int64 user indices: train on their rows only (None: every row)


def fresh_model(cfg: TrainConfig, info: PreparedInfo):
    """The model `cfg` trains, freshly initialised for a prepared DIR."""
    return build_model(cfg.model, info, **{k: v for k, v in asdict(cfg.model_config).items() if k not in OdmtConfig.DERIVED})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms, priors
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _quiet(message: str) -> None:
    pass


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_out(out: Path, resume: bool) -> bool:
    """RUN must be new, empty, one of our own runs with a checkpoint (resumed with --resume), or one of our
    own runs stopped before its first checkpoint (started again). Returns True to start again."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if (out / "checkpoint.pt").is_file():
        if not resume:
            raise FileExistsError(f"{out} already holds a training run; pass --resume or choose another --out")
        return False
    if resume and _unfinished_own_run(out):
        return True
    raise FileExistsError(f"{out} is not empty and holds no resumable run (no checkpoint.pt); choose another "
                          "--out (train never overwrites a folder it cannot resume)")


def _unfinished_own_run(out: Path) -> bool:
    """A RUN that odmt train started and that was killed before its first epoch's checkpoint: its
    config.json says so and every file in it is one train writes."""
    fmt = RunFolder(out).format()
    return fmt == RUN_FORMAT and all(is_run_write(p.name) for p in out.iterdir())


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupted / foreign file
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}); it is corrupted or not a checkpoint "
                         "of odmt train: remove the RUN folder and train again") from exc
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "state", "torch_rng"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of odmt train")
    return ckpt


def train_run(cfg: TrainConfig, data_dir: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
              epochs: int | None = None, log=_log_to_stderr, until: int | None = None,
              warm_start: WarmStart | None = None) -> dict:
    """Train into `out`; returns {"best_epoch", "best": valid metrics, "epochs_run", "stopped", "paused", "fusion"}
    ("fusion" is None when paused: the final fusion is chosen when the run ends).
    With `resume`, the RUN's saved TrainConfig is used (only `epochs` and `progress` may change).
    `until`: pause after this many epochs (a later resume continues; the budget and the schedule stay).
    `warm_start`: the weights to start from (a run resumed from its checkpoint restores those instead)."""
    out = Path(out)
    cfg = TrainConfig.from_dict(cfg.to_dict())  # a copy: the caller's config is not changed
    if _check_out(out, resume):
        log(f"{out} was stopped before its first epoch finished: starting it again")
        for p in out.iterdir():
            p.unlink()
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        progress = cfg.progress
        cfg = TrainConfig.from_dict(RunFolder(out).train_settings())
        cfg.progress = progress
    if epochs is not None:
        cfg.epochs = epochs
    cfg.validate()
    torchrun = distributed.from_environment()
    if cfg.nproc > 1 and torchrun is None:  # local processes; rank 0 leaves its summary in the RUN
        distributed.spawn(_train_worker, cfg.nproc, cfg, str(data_dir), str(out), resume, until, warm_start)
        return json.loads((out / SUMMARY).read_text())
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _train(cfg, data_dir, out, resume, ckpt_path, log, torchrun or distributed.Ranks(), until, warm_start)
    finally:
        torch.set_num_threads(threads_before)


def _train_worker(ranks: distributed.Ranks, cfg: TrainConfig, data_dir: str, out: str, resume: bool,
                  until: int | None = None, warm_start: WarmStart | None = None) -> None:
    torch.set_num_threads(max(1, cfg.threads))
    _train(cfg, data_dir, Path(out), resume, Path(out) / "checkpoint.pt", _log_to_stderr, ranks, until, warm_start)


def _valid_metrics(results: dict, branches: list[str]) -> tuple[dict, dict]:
    """Per-epoch fusion results -> (flat valid metrics: chosen fusion, "mean/..", "<branch>/..", choice)."""
    choice = choose_fusion(results)
    metrics = {k: v for k, v in results[choice["name"]].items() if k != "candidate"}
    for name in ["mean", *branches]:
        if name in results:
            metrics.update({f"{name}/{k}": v for k, v in results[name].items() if k != "candidate"})
    return metrics, choice


def _train(cfg: TrainConfig, data_dir, out: Path, resume: bool, ckpt_path: Path, log,
           ranks: distributed.Ranks, until: int | None = None, warm_start: WarmStart | None = None) -> dict | None:
    """The loop, top to bottom: set up (or restore), then per epoch train, validate, log, checkpoint."""
    seed_everything(cfg.seed)
    if not ranks.main:
        log = _quiet  # rank 0 speaks and writes for the group
    run = _Training(cfg, PreparedData(data_dir), out, ckpt_path, log, ranks, warm_start)
    run.start(resume)
    state = run.state
    for epoch in range(state["epoch"] + 1, min(cfg.epochs, until or cfg.epochs)):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        losses, kd_w = run.train_epoch(epoch)
        train_seconds = time.perf_counter() - t0
        if not ranks.main:  # rank 0 evaluates and decides; the others wait for its verdict and learning rate
            run.follow(epoch)
            continue
        verdict = run.validate(epoch)
        run.log_epoch(epoch, losses, kd_w, verdict, train_seconds, time.perf_counter() - t0)
        run.checkpoint()
        if state["stopped"]:
            log(f"early stop: the fused valid NDCG@10{' and every branch' if cfg.stop_on == 'any' else ''} "
                f"did not improve for {cfg.patience} epochs")
    return run.finish()


class _Training:
    """One training run's parts (model, optimizer, weight average, state) and its steps, for `_train`."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, out: Path, ckpt_path: Path, log,
                 ranks: distributed.Ranks, warm_start: WarmStart | None = None):
        self.cfg, self.data, self.out, self.ckpt_path, self.log, self.ranks = cfg, data, out, ckpt_path, log, ranks
        self.model = model = fresh_model(cfg, data.info)
        self.train_users = None
        if warm_start is not None:  # before the optimizer and the weight average take the weights
            model.load_state_dict(warm_start.weights)
            self.train_users = warm_start.train_users
        self.device = device = cfg.torch_device(ranks.local_rank)
        model.to(device)
        self.optimizer = _optimizer(model, cfg)
        self.average = (WeightAverage.over_epochs(model, cfg.average_epochs,
                                                  data.num_batches("train", cfg.batch_size) // ranks.world)
                        if cfg.average_epochs > 0 else None)
        self.step_model = model
        if ranks.world > 1:  # averages the gradients of the ranks' shards; starts from rank 0's weights
            from torch.nn.parallel import DistributedDataParallel
            # the T4R GPT-2 block keeps a token-embedding table that inputs_embeds never uses
            self.step_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                      find_unused_parameters=True)
        self.amp = torch.autocast(device.type, dtype=torch.float16 if cfg.amp == "fp16" else torch.bfloat16,
                                  enabled=cfg.amp != "off")
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # fp16 needs loss scaling
        self.run_info = {"format": RUN_FORMAT, "train": cfg.to_dict(),
                         "data": {"dir": str(data.root), "manifest_sha256": data.info.manifest_sha256,
                                  "source": data.info.manifest.get("source")},
                         **(warm_start.record if warm_start is not None else {})}
        self.branches = model.branch_names
        self.state = {"epoch": -1, "best_metric": -math.inf, "best_epoch": -1, "best": {}, "bad_epochs": 0,
                      "stopped": False, "incumbent": None, "branch_best": {}}
        self.log_path = out / "log.jsonl"

    # -- set up ----------------------------------------------------------------------------------
    def start(self, resume: bool) -> None:
        """Restore the last checkpoint (with `resume`) or start afresh; write the RUN's config.json."""
        cfg, out, ranks = self.cfg, self.out, self.ranks
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
        if resume and self.ckpt_path.is_file():
            self._restore(_load_checkpoint(self.ckpt_path))
        elif ranks.main:
            self.log_path.unlink(missing_ok=True)
        if ranks.world > 1:  # each rank its own dropout draws
            torch.manual_seed(cfg.seed * 7919 + ranks.rank * 104729 + self.state["epoch"] + 1)
        if ranks.main:
            atomic_write(out / RUN_CONFIG, json.dumps({**self.run_info, "model": asdict(self.model.config)},
                                                      indent=2, default=str) + "\n")
        data, device = self.data, self.device
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{cfg.model}: branches {self.branches}, {n_params:,} parameters, loss {self.model.config.loss}, "
                 f"{data.num_rows('train'):,} train rows, L={data.max_length}, {data.info.n_index - 3:,} items"
                 + (f", {ranks.world} processes" if ranks.world > 1 else "")
                 + (f", {device}" if device.type != "cpu" else "") + (f", amp {cfg.amp}" if cfg.amp != "off" else ""))

    def _restore(self, ckpt: dict) -> None:
        if ckpt.get("data_sha256") != self.run_info["data"]["manifest_sha256"]:
            raise ValueError(f"{self.out} was trained on other prepared data (manifest hash differs); cannot resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.average is not None:
            if ckpt.get("average") is None:
                raise ValueError(f"{self.out} was trained without weight averaging; resume it without --average-epochs")
            self.average.load_state_dict(ckpt["average"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.state.update(ckpt["state"])
        if self.ranks.main:
            _truncate_log(self.log_path, self.state["epoch"] + 1)  # a run killed after logging, before its checkpoint
        self.log(f"resuming {self.out} after epoch {self.state['epoch'] + 1} (best valid NDCG@10 "
                 f"{self.state['best_metric']:.4f} at epoch {self.state['best_epoch'] + 1})")

    # -- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One pass over the train split; returns (mean losses, the distillation weight)."""
        cfg, data, ranks, model, optimizer = self.cfg, self.data, self.ranks, self.model, self.optimizer
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        progress = epoch / cfg.epochs  # the KD ramp is a fraction of the epoch budget
        batches = data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        n_train_batches = data.num_batches("train", cfg.batch_size)
        if ranks.world > 1:
            batches = ranks.shard(batches, n_train_batches)
        bar = progress_bar(batches, total=n_train_batches // ranks.world,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and ranks.main)
        kd_w = model.task.weight(progress)
        for batch in bar:
            ranks.trace(epoch, batch)
            items = batch["items"]
            if self.train_users is not None:  # an update's recent window: only the users with new interactions
                items = items[torch.isin(batch["user"], self.train_users)]
                if not len(items):
                    continue
            with self.amp:
                outputs = self.step_model(items.to(self.device), progress=progress)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(outputs["loss"]).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            if self.average is not None:
                self.average.update(model)
            n_batches += 1
            sums["loss"] = sums.get("loss", 0.0) + outputs["loss"].item()
            for name, value in outputs["losses"].items():
                sums[name] = sums.get(name, 0.0) + value.item()
            bar.set_postfix(loss=f"{outputs['loss'].item():.3f}")
        return {k: v / max(1, n_batches) for k, v in sums.items()}, kd_w

    def follow(self, epoch: int) -> None:
        """A rank other than 0: take rank 0's verdict and learning rate."""
        self.state["epoch"], (self.state["stopped"], lr) = epoch, self.ranks.share(None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def validate(self, epoch: int) -> dict:
        """Score the valid split (fused, mean, each branch), keep the model when the fused score improved,
        and decide on early stopping. Returns {"metrics", "choice", "view", "views", "improved", "full_grid"}."""
        cfg, model, state = self.cfg, self.model, self.state
        views = {}  # the weights scored this epoch: raw, averaged, or both (average_select)
        if self.average is None or cfg.average_select:
            views["raw"] = contextlib.nullcontext
        if self.average is not None:
            views["average"] = lambda: self.average.applied(model)
        # the coarse fusion grid every `fusion_every` epochs; in between the mean, each branch and the last
        # grid's choice (the grid was 19% of a fashion epoch, benchmarks/epoch_profile.py)
        full_grid = state.get("incumbent") is None or (epoch + 1) % cfg.fusion_every == 0
        candidates = None if full_grid else epoch_candidates(self.branches, state["incumbent"])
        scored = {}
        for view, holding in views.items():
            with holding():
                results = evaluate_fusions(model, self.data, "valid", step=cfg.epoch_fusion_step,
                                           batch_size=cfg.eval_batch_size, candidates=candidates)
                scored[view] = _valid_metrics(results, self.branches)
        view = max(scored, key=lambda v: scored[v][0]["NDCG@10"])  # a tie keeps the raw weights
        metrics, choice = scored[view]
        if full_grid:
            state["incumbent"] = {"weights": choice["weights"], "scores": choice["scores"]}
        improved = metrics["NDCG@10"] > state["best_metric"]
        if improved:
            with views[view]():
                state.update(best_metric=metrics["NDCG@10"], best_epoch=epoch, best=metrics)
                model.set_fusion(choice["weights"], choice["scores"])
                model.save_pretrained(self.out, extra=self.run_info)
        branches_improved = self._branches_improved(scored) if cfg.stop_on == "any" else []
        state["bad_epochs"] = 0 if improved or branches_improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        state["stopped"] = state["bad_epochs"] >= cfg.patience
        return {"metrics": metrics, "choice": choice, "view": view, "views": len(views), "improved": improved,
                "full_grid": full_grid, "branches_improved": branches_improved}

    def _branches_improved(self, scored: dict) -> list[str]:
        """stop_on "any": each view's branches (and its fused score when both views are scored) that beat
        their own best so far; the run goes on while either view would have gone on alone."""
        tracked, best = {}, self.state["branch_best"]
        for v, (m, _) in scored.items():
            prefix = "" if len(scored) == 1 else f"{v}:"
            tracked.update({prefix + b: m[f"{b}/NDCG@10"] for b in self.branches})
            if prefix:
                tracked[prefix + "fused"] = m["NDCG@10"]
        improved = [k for k, score in tracked.items() if score > best.get(k, -math.inf)]
        best.update({k: tracked[k] for k in improved})
        return improved

    def log_epoch(self, epoch: int, losses: dict, kd_w: float, verdict: dict, train_seconds: float,
                  seconds: float) -> None:
        """A line of log.jsonl and one on stderr."""
        metrics, choice, view, improved = verdict["metrics"], verdict["choice"], verdict["view"], verdict["improved"]
        record = {"epoch": epoch + 1, "losses": losses, "kd_weight": kd_w, "valid": metrics,
                  "fusion": choice["name"], "weights": view, "improved": improved,
                  "fusion_grid": verdict["full_grid"], "branches_improved": verdict["branches_improved"],
                  "train_seconds": round(train_seconds, 2),
                  "seconds": round(seconds, 2)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        per_branch = " ".join(f"{b} {metrics[f'{b}/NDCG@10']:.4f}" for b in self.branches)
        branch_losses = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
        weights = f" {view} weights" if verdict["views"] > 1 else ""
        self.log(f"epoch {epoch + 1:>3}/{self.cfg.epochs} loss {losses['loss']:.3f} [{branch_losses}] kd_w {kd_w:.3f} | "
                 f"valid NDCG@10 {metrics['NDCG@10']:.4f} ({choice['name']}{weights}; mean "
                 f"{metrics['mean/NDCG@10']:.4f}; {per_branch}){' *' if improved else ''} | {seconds:.1f}s")

    def checkpoint(self) -> None:
        """The finished epoch's checkpoint (atomic), then the verdict shared with the other ranks."""
        fault_point("train-before-checkpoint")
        checkpoint = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "state": self.state,
                      "average": self.average.state_dict() if self.average is not None else None,
                      "torch_rng": torch.get_rng_state(), "data_sha256": self.run_info["data"]["manifest_sha256"]}
        atomic_write(self.ckpt_path, lambda tmp: torch.save(checkpoint, tmp))
        fault_point("train-after-checkpoint")
        self.ranks.share((self.state["stopped"], self.optimizer.param_groups[0]["lr"]))

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> dict | None:
        """The final fusion and the RUN's manifest (unless paused by `until`); the summary (rank 0)."""
        cfg, out, state, ranks, log = self.cfg, self.out, self.state, self.ranks, self.log
        if not ranks.main:
            ranks.barrier()
            return None
        paused = not state["stopped"] and state["epoch"] + 1 < cfg.epochs  # by `until`: resumed later, or never
        fusion = None if paused else _final_fusion(out, self.data, cfg, self.run_info)
        if paused:
            log(f"paused after epoch {state['epoch'] + 1}: best valid NDCG@10 {state['best_metric']:.4f} at epoch "
                f"{state['best_epoch'] + 1}; {out} resumes with --resume")
        else:
            write_run_manifest(out)  # last: the finished RUN's file hashes, signed when ODMT_SIGNING_KEY is set
            log(f"best valid NDCG@10 {state['best_metric']:.4f} at epoch {state['best_epoch'] + 1}; fusion "
                f"{fusion['name']} (valid NDCG@10 {fusion['valid_NDCG@10']:.4f}, plain mean "
                f"{fusion['valid_mean_NDCG@10']:.4f}); model in {out}")
        summary = {"best_epoch": state["best_epoch"] + 1, "best": state["best"], "epochs_run": state["epoch"] + 1,
                   "stopped": state["stopped"], "paused": paused, "fusion": fusion}
        if ranks.world > 1:
            atomic_write(out / SUMMARY, json.dumps(summary, default=str) + "\n")
            ranks.barrier()
        return summary


def _final_fusion(out: Path, data: PreparedData, cfg: TrainConfig, run_info: dict) -> dict:
    """Reload the best model, choose its fusion on the validation split's finer grid, save it."""
    from odmt_t4r.model import OdmtRecommender

    best = OdmtRecommender.from_pretrained(out, data_dir=data.root)
    choice = select_fusion(best, data, step=cfg.fusion_step, batch_size=cfg.eval_batch_size)
    payload = {**RunFolder(out).config(), "model": asdict(best.config)}
    atomic_write(out / RUN_CONFIG, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write(out / "fusion.json", json.dumps(choice, indent=2) + "\n")
    return choice


def _truncate_log(path: Path, n_epochs: int) -> None:
    """Keep log.jsonl's lines of the first `n_epochs` epochs (later ones were never checkpointed)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _epoch_of(line) is not None and _epoch_of(line) <= n_epochs]
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept))


def _epoch_of(line: str) -> int | None:
    """The epoch of one log.jsonl line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None
