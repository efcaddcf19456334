"""Model inputs of any shape: what calibration, validation and example data may be, and how a batch is
passed to the model.

A *batch* is what one call of the model takes:

* a tensor (any dtype: images, token ids) -> ``model(batch)``;
* a tuple of tensors (several positional inputs) -> ``model(*batch)``;
* a dict of tensors (``input_ids``, ``attention_mask``, ...) -> ``model(**batch)``.

Calibration data is either *one* such batch holding all inputs (a tensor / array ``[n, ...]``, a dict
of ``[n, ...]`` tensors, or, for a model whose forward takes k >= 2 positional inputs, a tuple of k
``[n, ...]`` tensors), split along dimension 0, or an iterable of batches (a list, a DataLoader).
An element of an iterable that is a tuple/list is read by the model's forward: with k >= 2 required
positional inputs its first k entries are the inputs (``(ids, mask)``, ``(ids, mask, label)``),
unless its first entry is itself a tuple/list/dict; otherwise it is ``(inputs, label, ...)`` as a
DataLoader yields and its first entry is the batch.  Tensors are passed untouched, except that float64
(NumPy's default) becomes float32: token ids stay integer.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch
from torch import nn

Batch = Union[torch.Tensor, tuple, dict]


def as_tensor(v: object) -> torch.Tensor:
    """``v`` as a tensor; float64 becomes float32, every other dtype is kept."""
    t = torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.as_tensor(v)
    return t.float() if t.dtype == torch.float64 else t


def as_batch(b: object) -> Batch:
    """One batch in the canonical form (tensor, tuple of tensors or dict of tensors)."""
    if isinstance(b, Mapping):
        return {str(k): as_tensor(v) for k, v in b.items()}
    if isinstance(b, tuple):
        return tuple(as_tensor(v) for v in b)
    return as_tensor(b)


def batch_len(b: Batch) -> int:
    """Number of inputs in the batch (dimension 0 of its first tensor)."""
    first = first_tensor(b)
    return int(first.shape[0]) if first.dim() > 0 else 1


def first_tensor(b: Batch) -> torch.Tensor:
    if isinstance(b, dict):
        if not b:
            raise ValueError("an input dict is empty")
        return next(iter(b.values()))
    if isinstance(b, tuple):
        if not b:
            raise ValueError("an input tuple is empty")
        return b[0]
    return b


def take(b: Batch, start: int, stop: int | None = None) -> Batch:
    """Inputs ``start:stop`` of the batch."""
    if isinstance(b, dict):
        return {k: v[start:stop] for k, v in b.items()}
    if isinstance(b, tuple):
        return tuple(v[start:stop] for v in b)
    return b[start:stop]


def concat(batches: list[Batch]) -> Batch:
    """One batch holding all ``batches`` (same structure)."""
    if not batches:
        raise ValueError("calibration data is empty: pass a few hundred representative inputs")
    b0 = batches[0]
    if isinstance(b0, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in b0}  # type: ignore[index]
    if isinstance(b0, tuple):
        return tuple(torch.cat([b[i] for b in batches]) for i in range(len(b0)))  # type: ignore[index]
    return torch.cat(batches)  # type: ignore[arg-type]


def describe(b: Batch) -> str:
    """Shapes and dtypes of a batch, for error messages."""
    if isinstance(b, dict):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in b.items()) + "}"
    if isinstance(b, tuple):
        return "(" + ", ".join(f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for v in b) + ")"
    return f"{tuple(b.shape)} {str(b.dtype).replace('torch.', '')}"


def call(model: nn.Module, b: Batch) -> Any:
    """``model`` on one batch: ``model(t)``, ``model(*tuple)`` or ``model(**dict)``."""
    if isinstance(b, dict):
        return model(**b)
    if isinstance(b, tuple):
        return model(*b)
    return model(b)


def export_args(b: Batch) -> tuple[tuple, dict]:
    """(args, kwargs) for ``torch.export.export`` of a model called on ``b``."""
    if isinstance(b, dict):
        return (), dict(b)
    if isinstance(b, tuple):
        return tuple(b), {}
    return (b,), {}


class Batches(list):
    """A list of batches already in canonical form (``split`` makes it): iterated as they are (a tuple
    is a batch of positional inputs here, not an ``(inputs, label)`` pair)."""


def positional_inputs(model: nn.Module | None) -> int:
    """How many positional inputs ``model.forward`` requires (1 when unknown)."""
    if model is None:
        return 1
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty))


def _is_tensor(v: object) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def iterate_batches(data: object, batch_size: int, n_inputs: int = 1) -> Iterator[Batch]:
    """Batches of ``data`` (see the module docstring); ``n_inputs``: ``positional_inputs(model)``."""
    if (n_inputs >= 2 and isinstance(data, tuple) and len(data) >= n_inputs
            and all(_is_tensor(v) for v in data[:n_inputs])):
        data = Batches(split(as_batch(tuple(data[:n_inputs])), batch_size))
    if isinstance(data, Batches):
        if not data:
            raise ValueError("calibration data is empty: pass a few hundred representative inputs")
        yield from data
        return
    if isinstance(data, (np.ndarray, torch.Tensor)) or isinstance(data, Mapping):
        whole = as_batch(data)
        n = batch_len(whole)
        if first_tensor(whole).dim() == 0 or n == 0:
            raise ValueError("calibration data is empty: pass a few hundred representative inputs")
        for i in range(0, n, batch_size):
            yield take(whole, i, i + batch_size)
        return
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        n = 0
        for b in data:
            if isinstance(b, (tuple, list)):
                if not b:
                    raise ValueError("a calibration batch is an empty tuple")
                nested = isinstance(b[0], (tuple, list, Mapping))  # ((inputs...), label)
                b = tuple(b[:n_inputs]) if n_inputs >= 2 and len(b) >= n_inputs and not nested else b[0]
            yield as_batch(b)
            n += 1
        if n == 0:
            raise ValueError("calibration data is empty: pass a few hundred representative inputs")
        return
    raise TypeError(f"calibration data must be an array, a tensor, a dict of tensors or an iterable of batches, "
                    f"got {type(data).__name__}")


def gather(data: object, batch_size: int, limit: int | None = None, n_inputs: int = 1) -> Batch:
    """All of ``data`` (at most ``limit`` inputs) as one batch."""
    out: list[Batch] = []
    n = 0
    for b in iterate_batches(data, batch_size, n_inputs):
        out.append(b)
        n += batch_len(b)
        if limit is not None and n >= limit:
            break
    whole = concat(out)
    return take(whole, 0, limit) if limit is not None else whole


def split(b: Batch, batch_size: int) -> Batches:
    """One batch cut into batches of ``batch_size``."""
    n = batch_len(b)
    return Batches(take(b, i, i + batch_size) for i in range(0, n, batch_size))


def output_tensor(out: object) -> torch.Tensor:
    """The tensor a model output stands for: itself, the first element of a tuple/list, or the first
    tensor value of a dict (``logits`` / ``last_hidden_state`` of a Hugging Face output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor, a tuple or a dict of tensors")


def rows(out: object, n: int) -> torch.Tensor:
    """The model output as ``[n, features]`` float64 rows (one per input)."""
    t = output_tensor(out)
    return t.reshape(n, -1).double()
