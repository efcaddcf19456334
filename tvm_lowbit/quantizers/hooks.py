"""Quantization that runs inside the user's own PyTorch training loop.

The loop stays the user's; a training quantizer (INQ, SQ, PACT) is an object with calls at stage,
step and epoch boundaries::

    hook = INQ(bits=5).attach(model)        # or SQ(...), PACT(...); model may be wrapped in DDP later
    for stage in hook.stages():             # calls begin_stage(stage) / end_stage() around the body
        for epoch in range(epochs_per_stage):
            for x, y in loader:
                loss = criterion(model(x), y) + hook.penalty()
                optimizer.zero_grad()
                loss.backward()
                hook.before_step()          # e.g. INQ: frozen weights get no update
                optimizer.step()
                hook.after_step()           # e.g. INQ: frozen weights restored bit for bit; SQ: resample
            hook.end_epoch()
    qmodel = hook.export(calib_data)        # fake-quant model that tvm_lowbit.compile consumes

Calls out of order (a step before any stage, a stage inside a stage) raise ``HookOrderError`` that
says which call was expected.  ``state_dict``/``load_state_dict`` carry the quantizer's own state
(masks, stage index, selections) so a run interrupted between stages resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class HookOrderError(RuntimeError):
    pass


class TrainingQuantizer:
    """Base class: stage/step/epoch bookkeeping and order checks; schemes override the ``on_*`` methods."""

    #: accumulated fraction (or ratio) per stage; schemes set it from their config
    schedule: tuple[float, ...] = (1.0,)

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.stage = -1          # index of the current stage, -1 before the first
        self.in_stage = False
        self.step_count = 0
        self.epoch_count = 0

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "TrainingQuantizer":
        """Bind to ``model`` (the bare module; wrap it in DDP afterwards if you use DDP)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.on_attach(model)
        return self

    def _require(self, in_stage: bool, call: str) -> None:
        if self.model is None:
            raise HookOrderError(f"{type(self).__name__}.{call}() before attach(model)")
        if in_stage and not self.in_stage:
            raise HookOrderError(f"{type(self).__name__}.{call}() outside a stage: call begin_stage() first "
                                 "(or iterate `for stage in hook.stages()`)")
        if not in_stage and self.in_stage:
            raise HookOrderError(f"{type(self).__name__}.{call}() inside stage {self.stage}: call end_stage() first")

    # -- the calls a training loop makes --------------------------------------------------------
    def stages(self) -> Iterator[int]:
        """Iterate the remaining stages, calling begin_stage / end_stage around each (resumes after load)."""
        for i in range(self.stage + 1, len(self.schedule)):
            self.begin_stage(i)
            yield i
            self.end_stage()

    def begin_stage(self, index: int | None = None) -> None:
        self._require(False, "begin_stage")
        index = self.stage + 1 if index is None else index
        if not 0 <= index < len(self.schedule):
            raise HookOrderError(f"{type(self).__name__}: stage {index} does not exist "
                                 f"(schedule {list(self.schedule)})")
        if index <= self.stage:
            raise HookOrderError(f"{type(self).__name__}: stage {index} already ran (current {self.stage})")
        self.stage, self.in_stage = index, True
        self.on_begin_stage(index)

    def end_stage(self) -> None:
        self._require(True, "end_stage")
        self.on_end_stage(self.stage)
        self.in_stage = False

    def before_step(self) -> None:
        self._require(True, "before_step")
        self.on_before_step()

    def after_step(self) -> None:
        self._require(True, "after_step")
        self.step_count += 1
        self.on_after_step()

    def end_epoch(self) -> None:
        self._require(True, "end_epoch")
        self.epoch_count += 1
        self.on_end_epoch()

    def penalty(self) -> torch.Tensor:
        """A term to add to the loss (PACT's L2 on alpha); zero for other schemes."""
        return torch.zeros(())

    @property
    def finished(self) -> bool:
        return self.stage == len(self.schedule) - 1 and not self.in_stage

    # -- scheme hooks -----------------------------------------------------------------------
    def on_attach(self, model: nn.Module) -> None: ...
    def on_begin_stage(self, index: int) -> None: ...
    def on_end_stage(self, index: int) -> None: ...
    def on_before_step(self) -> None: ...
    def on_after_step(self) -> None: ...
    def on_end_epoch(self) -> None: ...

    def export(self, calib_data: object) -> nn.Module:
        """The trained model as a fake-quant model for ``tvm_lowbit.compile`` (after the last stage)."""
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in_stage": self.in_stage, "step_count": self.step_count,
                "epoch_count": self.epoch_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.in_stage = bool(state["in_stage"])
        self.step_count = int(state["step_count"])
        self.epoch_count = int(state["epoch_count"])


# --------------------------------------------------------------------------------------------
# Shared helpers of the training quantizers (SQ, PACT, INQ): layer choice and export
# --------------------------------------------------------------------------------------------

class IntegerWeight:
    """A weight in plain integer form for ``QuantLayer``: ``w_int`` (integers, the weight's shape),
    ``w_scale`` (float32 per output channel), so the weight is ``w_scale[k] * w_int``.  ``format``
    names the integer code (``"int"``: any integers; the compiler chooses the kernel), ``group_size``
    is 0 (no ternary groups)."""

    def __init__(self, w_int: torch.Tensor, w_scale: torch.Tensor, format: str = "int", group_size: int = 0) -> None:
        if not torch.equal(w_int.double(), torch.round(w_int.double())):
            raise ValueError("IntegerWeight.w_int must hold integers")
        if w_scale.shape != (w_int.shape[0],):
            raise ValueError(f"w_scale must have shape ({w_int.shape[0]},), got {tuple(w_scale.shape)}")
        self.w_int = w_int.to(torch.int32)
        self.w_scale = w_scale.to(torch.float32)
        self.format = format
        self.group_size = group_size

    def dequantized(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.w_int.dim() - 1)
        return (self.w_int.double() * self.w_scale.double().reshape(shape)).float()


def quantizable_layers(model: nn.Module, first_layer: bool, last_layer: bool) -> list[str]:
    """Names of the Conv2d/Linear modules of ``model`` in registration order, without the first one
    unless ``first_layer`` and without the last one unless ``last_layer``.

    Training quantizers attach before any input is seen, so "first"/"last" here means the first/last
    Conv2d/Linear *registered* (for the built-in ResNets that is conv1 and fc, as in execution order).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    keep = list(names)
    if names and not first_layer:
        keep.remove(names[0])
    if len(names) > 1 and not last_layer and names[-1] in keep:
        keep.remove(names[-1])
    if not keep:
        raise ValueError(f"no layer left to quantize: the model has {len(names)} Conv2d/Linear layers and the "
                         "first/last-layer policies keep them all in float")
    return keep


def strip_parametrizations(model: nn.Module) -> nn.Module:
    """Turn every parametrized module of ``model`` (in place; pass a copy) back into its plain class
    holding the *original* (unparametrized) tensors as parameters.

    ``torch.nn.utils.parametrize.remove_parametrizations`` must not be used on a deep copy: the copy
    shares the injected ``Parametrized*`` class with the original, and removal deletes the property
    from that shared class, breaking the original module.
    """
    from torch.nn.utils import parametrize

    for m in list(model.modules()):
        if not parametrize.is_parametrized(m):
            continue
        originals = {name: p.original for name, p in m.parametrizations.items()}  # type: ignore[union-attr]
        m.__class__ = m.__class__.__bases__[0]
        del m._modules["parametrizations"]
        for name, t in originals.items():
            m.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
    return model
