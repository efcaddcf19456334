"""Ops that TVM's PyTorch importer accepts but converts wrongly: refused by name before import, so a
model that contains one fails with a clear error instead of compiling to wrong outputs.

Found by ``tests/test_float_ops_differential.py`` (compiled vs PyTorch for every float op family):

* ``aten.index.Tensor`` with index tensors on two or more axes (``x[:, i, j]``, ``x[i, :, j]``): PyTorch
  broadcasts the index tensors together (one output axis); the importer takes each axis in turn, an outer
  product (``x[:, [0, 1], [2, 3]]`` comes out (2, 2, 2, 6) instead of (2, 2, 6)).

Ops the importer does not know at all are already refused by it, by name ("Unsupported function types
['amax.default']"). ``x[:, -1]`` (a negative index, LSTM/GRU heads) is handled by the pass
:mod:`tvm_lowbit.passes.normalize_take`.
"""

from __future__ import annotations

from typing import Any

from tvm_lowbit.errors import CompileError


def _multi_axis_index(node: Any) -> str | None:
    """Why an ``aten.index.Tensor`` node is converted wrongly, or None."""
    indices = node.args[1] if len(node.args) > 1 else []
    axes = [i for i, ix in enumerate(indices) if ix is not None]
    if len(axes) < 2:
        return None
    return (f"advanced indexing with index tensors on {len(axes)} axes {axes} (like x[:, i, j]): TVM's importer "
            "takes each axis in turn (an outer product) where PyTorch pairs the indices; index one axis at a "
            "time, or flatten the indexed axes and index once")


# torch op name -> the check (None: converted right)
CHECKS = {"aten.index.Tensor": _multi_axis_index}


def check_exported(ep: Any) -> None:
    """``CompileError`` naming the first op of the ``torch.export`` program ``ep`` that TVM's importer would
    convert wrongly (see the module docstring); nothing when every op is converted right."""
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)  # "aten.index.Tensor"
        check = CHECKS.get(name)
        why = check(node) if check is not None else None
        if why is not None:
            stack = node.meta.get("stack_trace") or ""
            where = [ln.strip() for ln in stack.splitlines() if ln.strip().startswith("File ")]
            src = f" ({where[-1]})" if where else ""
            raise CompileError(f"unsupported op {name} at graph node '{node.name}'{src}: {why}")
