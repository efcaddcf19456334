"""A small built-in trainer for the training quantizers (INQ, SQ, PACT), used by ``tvm-lowbit quantize``.

``train(model, hook, (x_train, y_train), (x_val, y_val), epochs_per_stage=..., lr=...)`` runs the hook
protocol of ``hooks.TrainingQuantizer``: for every remaining stage, SGD (momentum 0.9, nesterov,
weight decay 5e-4; PACT's alphas get no weight decay, ``hook.penalty()`` regularizes them) with a
cosine or one-cycle learning rate that restarts each stage, then a checkpoint
``checkpoint_dir/last.pt`` (model, optimizer, hook state, stage).  If that file exists when
``train`` starts, training resumes after the stage it records.  Checkpoints are written only at stage
boundaries: an interruption inside a stage repeats that stage.

Determinism: the data order of stage ``s`` comes from a generator seeded with ``(seed, s)`` and the
global torch RNG is reseeded at every stage start, so an interrupted-and-resumed run ends with the
same weights as an uninterrupted one (on the same device and thread count).

DDP: when ``torch.distributed`` is initialized, the model is wrapped in DistributedDataParallel
(after the hook is attached), every rank takes its slice of the same permutation, only rank 0 prints
and writes checkpoints, and a non-finite loss on any rank stops every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tvm_lowbit.quantizers.hooks import TrainingQuantizer

CHECKPOINT = "last.pt"
# cosine / onecycle restart at every stage (the papers' protocol: each stage is a training run of its
# own); cosine-run is one cosine over all stages, for short fine-tuning budgets where a restart at the
# peak rate would undo the previous stage's adaptation.
SCHEDULES = ("cosine", "onecycle", "cosine-run")


class NonFiniteLossError(FloatingPointError):
    pass


def _as_tensors(d: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(d, (tuple, list)) and len(d) == 2):
        raise TypeError(f"{name} must be a pair (inputs, labels) of arrays or tensors, got {type(d).__name__}")
    x = torch.as_tensor(np.asarray(d[0], np.float32) if isinstance(d[0], np.ndarray) else d[0]).float()
    y = torch.as_tensor(d[1]).long()
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: {x.shape[0]} inputs and {y.shape[0]} labels (need the same non-zero count)")
    return x, y


def flip_crop(pad_value: float = 0.0, pad: int = 2) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Augmentation of [B, C, H, W] batches: random horizontal flip and random crop after padding
    with ``pad_value`` (use the normalized value of a black pixel for normalized images)."""

    def aug(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        xp = F.pad(x, (pad, pad, pad, pad), value=pad_value)
        oh = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        ow = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (oh[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ow[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return xp[bi, ci, rows, cols]

    return aug


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500, device: Any = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` on (x, y)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            correct += int((model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]).sum())
    model.train(was)
    return 100.0 * correct / x.shape[0]


def _param_groups(model: nn.Module, hook: TrainingQuantizer, wd: float) -> list[dict[str, Any]]:
    no_decay = {id(p) for p in getattr(hook, "alpha_parameters", lambda: [])()}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": wd}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def train(model: nn.Module, hook: Any, train_data: Any, val_data: Any = None, *, epochs_per_stage: int = 1,
          lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9, nesterov: bool = True,
          weight_decay: float = 5e-4, lr_schedule: str = "cosine", checkpoint_dir: str | Path | None = None,
          subset: int | None = None, device: str | torch.device | None = None, seed: int = 0,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
          max_stages: int | None = None, progress: bool = True, log: Callable[[str], None] | None = print,
          ) -> dict[str, Any]:
    """Train ``model`` under ``hook`` (a TrainingQuantizer, or a config such as ``SQ(...)`` that is
    attached here).  ``train_data``/``val_data``: (inputs, labels) arrays or tensors.  ``subset``: use
    only the first ``subset`` training examples (CPU budgets).  ``max_stages``: stop after this many
    stages in this call (the rest resume from the checkpoint on a later call).  Returns a summary:
    the hook, per-stage validation accuracy, seconds.  The model stays on ``device``."""
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
    if epochs_per_stage < 1 or batch_size < 1:
        raise ValueError("epochs_per_stage and batch_size must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    say = (log if (log is not None and rank == 0) else (lambda _s: None))

    x, y = _as_tensors(train_data, "train_data")
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be >= 1, got {subset}")
        x, y = x[:subset], y[:subset]
    xv, yv = _as_tensors(val_data, "val_data") if val_data is not None else (None, None)

    model.to(dev)
    if not isinstance(hook, TrainingQuantizer):
        if not hasattr(hook, "attach"):
            raise TypeError(f"hook must be a TrainingQuantizer or a config with attach(), got {type(hook).__name__}")
        hook = hook.attach(model)
    elif hook.model is None:
        hook.attach(model)
    if hasattr(hook, "weight_decay"):
        hook.weight_decay = weight_decay  # PACT: lambda_alpha defaults to the weight decay
    opt = torch.optim.SGD(_param_groups(model, hook, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)

    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    history: list[dict[str, Any]] = []
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        hook.load_state_dict(state["hook"])
        history = list(state.get("history", []))
        say(f"resumed from {ckpt} after stage {hook.stage + 1}/{len(hook.schedule)}")

    net: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    n_local = len(range(rank, x.shape[0], world))
    steps = max(1, math.ceil(n_local / batch_size))
    t0 = time.time()
    done = 0
    for stage in range(hook.stage + 1, len(hook.schedule)):
        if max_stages is not None and done >= max_stages:
            break
        torch.manual_seed(seed * 1000 + stage)
        gen = torch.Generator().manual_seed(seed * 1000 + stage)
        for g in opt.param_groups:
            g["lr"] = lr
            g.pop("initial_lr", None)
            g.pop("max_lr", None)
            g.pop("min_lr", None)
        total = steps * epochs_per_stage
        if lr_schedule == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        elif lr_schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
        else:  # cosine-run: this stage is segment ``stage`` of one cosine over every stage
            run_steps, offset = total * len(hook.schedule), total * stage
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * (offset + t) / run_steps)))
        hook.begin_stage(stage)
        say(f"stage {stage + 1}/{len(hook.schedule)} (ratio {hook.schedule[stage]:g}): {epochs_per_stage} epoch(s) "
            f"of {steps} steps on {dev}")
        net.train()
        for epoch in range(epochs_per_stage):
            perm = torch.randperm(x.shape[0], generator=gen)[rank::world]
            bar = tqdm(range(steps), desc=f"stage {stage + 1}/{len(hook.schedule)} epoch {epoch + 1}/{epochs_per_stage}",
                       leave=False, disable=not progress or rank != 0, mininterval=1.0)
            loss_sum = 0.0
            for s in bar:
                idx = perm[s * batch_size:(s + 1) * batch_size]
                xb = x[idx]
                if augment is not None:
                    xb = augment(xb, gen)
                xb, yb = xb.to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
                loss = F.cross_entropy(net(xb), yb) + hook.penalty().to(dev)
                finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
                if distributed:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not bool(finite.item()):
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss.detach())} on rank {rank}) at stage {stage + 1}/{len(hook.schedule)}, "
                        f"epoch {epoch + 1}/{epochs_per_stage}, step {s + 1}/{steps}: lower the learning rate "
                        f"(now {opt.param_groups[0]['lr']:.3g}) or check the data/model for NaN/Inf")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hook.before_step()
                opt.step()
                hook.after_step()
                sched.step()
                loss_sum += float(loss.detach())
                if s % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            hook.end_epoch()
            say(f"  stage {stage + 1} epoch {epoch + 1}: train loss {loss_sum / steps:.4f} ({time.time() - t0:.0f} s)")
        hook.end_stage()
        entry: dict[str, Any] = {"stage": stage, "ratio": hook.schedule[stage], "train_loss": loss_sum / steps}
        if xv is not None:
            entry["val_top1"] = evaluate(model, xv, yv, device=dev)
            say(f"  stage {stage + 1}: validation top-1 {entry['val_top1']:.2f}%")
        history.append(entry)
        done += 1
        if ckpt is not None:
            if rank == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "hook": hook.state_dict(),
                            "history": history, "stage": stage}, tmp)
                tmp.replace(ckpt)
            if distributed:
                dist.barrier()
    return {"hook": hook, "history": history, "seconds": time.time() - t0, "finished": hook.finished}
