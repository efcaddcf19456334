"""TorchSiLU: compute SiLU with PyTorch's formula, ``x / (1 + exp(-x))``.

TVM's PyTorch importer writes ``silu(x)`` as ``x * sigmoid(x)``, which differs from ``torch.nn.functional.silu``
in the last bit on about a quarter of the values (measured on N(0, 3^2) inputs); PyTorch's own formula with a
correctly rounded exp differs on about 4 %.  A quantizer right after a SiLU turns such a one-ulp difference
into a different code whenever the value lies at a rounding midpoint (docs/results-models.md, "Speed and
compiled vs fake-quant"), so the compiled model follows PyTorch's formula.  Only the importer's exact form
``multiply(x, sigmoid(x))`` (either operand order, float32) is rewritten.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

_X = wildcard()
_SILU = is_op("relax.multiply")(_X, is_op("relax.sigmoid")(_X)) | is_op("relax.multiply")(is_op("relax.sigmoid")(_X), _X)


def _rewrite(_call: relax.Expr, matches: dict) -> relax.Expr:
    x = matches[_X]
    if getattr(x.ty, "dtype", None) != "float32":
        return _call
    one = relax.const(1.0, "float32")
    return relax.op.divide(x, relax.op.add(one, relax.op.exp(relax.op.negative(x))))


def torch_silu(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """``mod`` with every ``x * sigmoid(x)`` of ``mod[func_name]`` computed as ``x / (1 + exp(-x))``."""
    mod = mod.clone() if hasattr(mod, "clone") else mod
    mod[func_name] = rewrite_call(_SILU, _rewrite, mod[func_name])
    return mod


@tvm.transform.module_pass(opt_level=0, name="tvm_lowbit.TorchSiLU")
class TorchSiLU:
    """Module-pass form of :func:`torch_silu`."""

    def __init__(self, func_name: str = "main") -> None:
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return torch_silu(mod, self.func_name)
