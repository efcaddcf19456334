"""Models into Relax: ``torch.export`` import, the layer table the lowering reads, and the single-output
unwrap that compiled artifacts and tuning tasks share.

``torch.export`` keeps global state while it traces (two exports at once fail with
``_EXPORT_MODULE_HIERARCHY must not be None``), so every export, save and load of an exported program in
tvm_lowbit holds :data:`EXPORT_LOCK`; the rest of a compile runs in parallel."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer_checks import check_exported
from tvm_lowbit.passes.layer_info import LayerInfo, weight_key
from tvm_lowbit.quantizers.inputs import Batch, as_batch, describe, export_args
from tvm_lowbit.quantizers.layers import quant_layers

EXPORT_LOCK = threading.RLock()  # torch.export / torch.export.save / load are not thread-safe


def layer_infos(qmodel: nn.Module) -> dict[str, LayerInfo]:
    """The quantized layers of ``qmodel`` keyed by their integer weights (what the lowering matches)."""
    return {weight_key(m.w_int.numpy()): LayerInfo(name, m.group_size, m.weight_format)
            for name, m in quant_layers(qmodel).items()}


def example_batch(example: object) -> Batch:
    """An example input as the model takes it: a tensor/array (any dtype; float64 becomes float32), a tuple
    of them (positional inputs) or a dict (keyword inputs: ``input_ids``, ``attention_mask``)."""
    if isinstance(example, list):
        example = tuple(example)
    try:
        return as_batch(example)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"the example input must be a tensor, an array, a tuple or a dict of them, got "
                        f"{type(example).__name__} ({e})") from None


def export_torch(model: nn.Module, example: object) -> Any:
    """``torch.export`` of ``model`` called on ``example`` (see :func:`example_batch`), or a ``CompileError``
    naming the inputs and the first line of torch's message."""
    b = example_batch(example)
    args, kwargs = export_args(b)
    try:
        with EXPORT_LOCK:
            return torch.export.export(model.eval(), args, kwargs=kwargs)
    except Exception as e:
        raise CompileError(f"torch.export failed on the model with the inputs {describe(b)}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def import_torch(model: nn.Module, example: object) -> Any:
    """``torch.export`` the model with ``example`` (a tensor, a tuple or a dict of inputs) and import it to a
    Relax module (weights as constants; one parameter per input, named as the model's ``forward`` names it)."""
    return import_exported(export_torch(model, example))


def import_exported(ep: Any) -> Any:
    """A ``torch.export`` program as a Relax module (weights bound as constants)."""
    from tvm.relax.frontend.torch import from_exported_program

    check_exported(ep)  # ops the importer would miscompile are refused by name
    try:
        with EXPORT_LOCK:  # it runs the program's decompositions (torch.export machinery again)
            return from_exported_program(ep, keep_params_as_input=False)
    except Exception as e:
        msg = str(e).splitlines()
        raise CompileError("TVM's PyTorch importer cannot convert the model: "
                           f"{type(e).__name__}: {msg[0] if msg else ''} (unsupported operator?)") from e


def strip_single_tuple(mod: Any) -> Any:
    """``main`` returns a 1-tuple after torch import; return the tensor itself (RPC clients need that)."""
    from tvm import relax

    f = mod["main"]
    if isinstance(f.ret_ty, relax.TupleType) and len(f.ret_ty.fields) == 1:
        body = relax.SeqExpr(f.body.blocks, relax.TupleGetItem(f.body.body, 0))
        mod["main"] = relax.Function(f.params, body, f.ret_ty.fields[0], f.is_pure, f.attrs)
    return mod
