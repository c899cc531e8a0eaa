"""The training loop shared by DiffIML, the discriminative baseline and LightVAE distillation.

AdamW, cosine LR from ``lr`` to 0, weight decay 0.05, all seeded. Data order, augmentation and diffusion noise are
functions of (seed, step), so ``resume`` continues a killed run exactly: same step, same LR, same batches.
Under ``torchrun`` it runs data-parallel (DDP; gloo on CPU, NCCL on GPU) and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from diffiml.train.checkpoint import load_training_state, resolve_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    steps: int = 1000
    batch_size: int = 8  # per process
    lr: float = 1e-4
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int = 200
    num_workers: int = 0
    stop_after: int | None = None  # end this process after that step (checkpointed); resume later
    snapshot_every: int | None = None  # keep weights-only snapshots for checkpoint selection


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of (epoch, index) from ``start_step`` on; epoch permutations come from (seed, epoch)."""

    def __init__(self, n: int, options: TrainOptions, start_step: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.opt, self.start, self.rank, self.world = n, options, start_step, rank, world
        self.per_epoch = max(1, (n // world) // options.batch_size)

    def __len__(self) -> int:
        return self.opt.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.opt.batch_size
        for step in range(self.start, self.opt.steps):
            epoch, k = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.opt.seed, epoch]).permutation(self.n)[self.rank :: self.world]
            order = np.resize(order, max(len(order), b))  # a set smaller than a batch wraps around
            yield [(epoch, int(i)) for i in order[k * b : (k + 1) * b]]


class EpochIndexed(torch.utils.data.Dataset):
    """Adapts a dataset with ``set_epoch`` to (epoch, index) keys, which survive worker processes."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class Objective(nn.Module):
    """DDP wraps modules by their forward; this makes ``model.loss(**batch)`` the forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return self.model.loss(batch["image"], batch["mask"], batch["edge"], generator=generator)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / total))


def distributed_context() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def train(model: nn.Module, dataset: Any, run_dir: str | Path, config: dict[str, Any], options: TrainOptions,
          resume: bool = False, save_module: nn.Module | None = None) -> list[float]:
    """Train ``model`` (anything with ``loss(image, mask, edge, generator)``); returns the per-step losses.

    ``save_module``: the part of ``model`` whose weights the checkpoint holds (default: all of it).
    """
    saved = save_module if save_module is not None else model
    rank, world, device = distributed_context()
    torch.manual_seed(options.seed)
    # Channels-last: PyTorch's CPU depthwise and grouped convolutions (MobileNetV2) run much faster in it, and GPU
    # convolutions prefer it too. Checkpoints are written contiguous, so nothing downstream sees the difference.
    model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    start = 0
    if resume:
        from diffiml.train.checkpoint import load_weights

        load_weights(run_dir, saved)
        state = load_training_state(run_dir, optimizer)
        start = int(state["step"])
        log.info("resuming %s at step %d", resolve_checkpoint(run_dir), start)
    objective: nn.Module = Objective(model)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    sampler = StepBatchSampler(len(dataset), options, start, rank, world)
    loader = DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=options.num_workers,
                        persistent_workers=options.num_workers > 0)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=options.steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    state_of = lambda step: {"step": step, "options": asdict(options), "world_size": world}  # noqa: E731
    for step, batch in enumerate(loader, start=start):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(options.lr, step, options.steps)
        step_seed = options.seed * 1_000_003 + step * world + rank
        generator = torch.Generator(device=device).manual_seed(step_seed)
        torch.manual_seed(step_seed)  # what draws from the global RNG (Segformer's stochastic depth) too
        batch = {k: v.to(device, memory_format=torch.channels_last) for k, v in batch.items()}
        loss = objective(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        done = step + 1
        stopping = options.stop_after is not None and done >= options.stop_after
        if rank == 0 and (done % options.checkpoint_every == 0 or done == options.steps or stopping):
            save_checkpoint(run_dir, saved, config, optimizer, state_of(done))
        if rank == 0 and options.snapshot_every and done % options.snapshot_every == 0:
            save_checkpoint(Path(run_dir) / "snapshots" / f"step-{done:06d}", saved, config,
                            trainer_state=state_of(done))
        if stopping:
            break
    bar.close()
    if world > 1:
        dist.barrier()
    return losses
