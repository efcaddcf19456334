"""Weight bytes of a model as compiled.

On top of the bits per weight, every quantized layer stores one float32 scale per output channel,
and group codes are padded to whole groups (a ragged group stores its padding): the byte counts here
are the exact sizes of what the compiled layer keeps for its weight (each format's
``storage_bytes``).  Biases and the folded batch norm (the per-channel epilogue) are the same for
every format and not counted.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from tvm_lowbit.formats.base import WeightObject, format_for_recorded, get_format
from tvm_lowbit.formats.decompose import decompose


@runtime_checkable
class IntegerLayer(Protocol):
    """What the byte count reads of a fake-quant layer (``quantizers.layers.QuantLayer``)."""

    w_int: torch.Tensor
    weight_format: str
    group_size: int


def weight_bytes(tw: WeightObject | None, numel: int) -> int:
    """Bytes of a layer's weight as compiled (``tw`` None: float32), counted by its format."""
    spec = format_for_recorded(str(tw.format)) if tw is not None else None
    return (spec or get_format("float")).storage_bytes(tw, numel)


def compiled_weight(module: nn.Module) -> WeightObject | None:
    """The integer weight the compiler will lower a fake-quant layer to (decomposed from its ``w_int``
    and recorded format as the lowering pass does), or None when it stays float (a plain
    Conv2d/Linear, or a weight no kernel takes)."""
    if not isinstance(module, IntegerLayer) or not isinstance(module, nn.Module):
        return None
    obj, _ = decompose(module.weight_format, module.w_int.numpy(), module.group_size)
    return obj


def model_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, number of weights) of every Conv2d/Linear weight of a float or fake-quant model, as
    compiled: integer layers by their codes and scales, float layers at 4 bytes a weight."""
    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, IntegerLayer):
            n = m.w_int.numel()
            total += weight_bytes(compiled_weight(m), n)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if any(isinstance(c, IntegerLayer) for c in m.children()):
                continue  # a wrapped layer: its integer child is counted
            n = m.weight.numel()
            total += 4 * n
        else:
            continue
        count += n
    return total, count


def avg_weight_bits(model: nn.Module) -> float:
    """8 * weight bytes / number of weights over all Conv2d/Linear layers (32.0 for a float model)."""
    total, count = model_weight_bytes(model)
    return 8.0 * total / max(count, 1)
