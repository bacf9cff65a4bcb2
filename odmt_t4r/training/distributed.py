"""Multi-process training with torch DDP: gloo on CPU, NCCL on GPU.

    odmt train ... --nproc 2                         spawns 2 local processes (127.0.0.1, a free port)
    torchrun --nproc_per_node 2 -m odmt_t4r.cli train ...   uses torchrun's environment (WORLD_SIZE, RANK)

Every rank builds the same model (DDP broadcasts rank 0's weights), reads its own shard of each epoch's
training batches (batch i goes to rank i mod N; every rank takes the same number of steps), and the
gradients are averaged. Rank 0 evaluates, keeps the early-stopping state, writes the RUN (checkpoints,
log, model) and tells the other ranks when to stop. `--resume` loads the checkpoint on every rank.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

TRACE_ENV = "ODMT_TRACE_ROWS"  # a folder: each rank writes the training rows it saw (for checking shards)


@dataclass
class Ranks:
    """This process's place in the group (rank 0 of 1 without DDP)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard(self, batches, n_batches: int):
        """This rank's batches: i mod world == rank, cut so that every rank takes the same number of steps."""
        usable = (n_batches // self.world) * self.world
        if usable == 0:
            raise ValueError(f"{n_batches} training batches cannot be shared by {self.world} processes; "
                             "use a smaller --batch-size or fewer processes")
        for i, batch in enumerate(batches):
            if i >= usable:
                break
            if i % self.world == self.rank:
                yield batch

    def trace(self, epoch: int, batch: dict) -> None:
        folder = os.environ.get(TRACE_ENV)
        if folder:
            users = batch["user"].tolist() if "user" in batch else [None] * len(batch["items"])
            with open(Path(folder) / f"rows-rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "users": users, "rows": batch["items"].tolist()}) + "\n")


def from_environment() -> Ranks | None:
    """The torchrun group this process belongs to, initialised; None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(_backend(), init_method="env://")
    return ranks


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, nproc: int, *args) -> None:
    """Runs worker(ranks, *args) in `nproc` local processes joined in one group on 127.0.0.1."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(nproc, free_port(), worker, args), nprocs=nproc, join=True)


def _entry(rank: int, world: int, port: int, worker, args) -> None:
    dist.init_process_group(_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        worker(Ranks(rank, world, rank), *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    gc.collect()  # the DDP wrapper and its gloo work objects go while the interpreter is whole
    dist.destroy_process_group()
    # Gloo's threads can still hold tensors at interpreter finalization and abort it with SIGABRT
    # ("terminate called without an active exception"; pytorch/pytorch#190489, #179291), seen here on a
    # loaded machine after a finished run. The work is done and written: leave without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
