"""What the passes of this folder share: rewriting one Relax function and putting it back, the module-pass
body that keeps a rewrite's count, and a rewrite of every PrimFunc as TVM's ``prim_func_pass``.

* :func:`replace_function`: ``mod[func_name]`` replaced by a ``relax.PyExprMutator``'s result, the bindings that
  became dead removed (``FoldRequantize``, ``FuseAddQuantize``, ``NHWCShuffle``, ``PoolQuantize``,
  ``ShuffleQuantize``).
* :func:`emit_like`: a new value bound as the variable it replaces was (dataflow or block output).
* :func:`rewrite_matches`: find the places to change in one function, rewrite them with a mutator, count them
  (``FuseAddQuantize``, ``PoolQuantize``, ``ShuffleQuantize``).
* :class:`CountedRewrite`: the body of a ``tvm.transform.module_pass`` class around ``rewrite(mod, func_name)
  -> (mod, count)``; the last run's count is kept in ``count``.
* :class:`PrimFuncRewrite`: the body of a ``tvm.tirx.transform.prim_func_pass`` class for one target:
  ``rewrite(func)`` is each PrimFunc's replacement, or None to keep it (``ApplyKernelSchedules``,
  ``ScheduleFloatOps``).  TVM's pass copies the module before it changes it: the input stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any

import tvm
from tvm import relax, tirx


def replace_function(mod: tvm.IRModule, func_name: str, mutator: relax.PyExprMutator,
                     new_func: relax.Function) -> tvm.IRModule:
    """``mod`` (the module ``mutator`` was built on) with ``func_name`` replaced by ``new_func`` (what
    ``mutator`` made of it), with the functions ``mutator`` emitted and without the bindings that became dead."""
    mutator.builder_.update_func(mod.get_global_var(func_name), new_func)
    return relax.transform.DeadCodeElimination([func_name])(mutator.builder_.get())


def emit_like(builder: relax.BlockBuilder, value: relax.Expr, like: relax.Var) -> relax.Var:
    """``value`` bound in ``builder`` as ``like`` was: inside the dataflow block for a dataflow variable,
    as the block's output otherwise."""
    return builder.emit(value) if isinstance(like, relax.DataflowVar) else builder.emit_output(value)


def rewrite_matches(mod: tvm.IRModule, func_name: str, find: Callable[[tvm.IRModule, relax.Function], Sized],
                    mutator: Callable[[tvm.IRModule, Any], relax.PyExprMutator]) -> tuple[tvm.IRModule, int]:
    """(``mod`` with ``func_name`` rewritten by ``mutator(mod, matches)``, how many matches): ``find(mod, func)``
    lists the places to change; a module without ``func_name`` or without a match comes back as it was."""
    if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, 0
    func = mod[func_name]
    matches = find(mod, func)
    if not matches:
        return mod, 0
    mut = mutator(mod, matches)
    return replace_function(mod, func_name, mut, mut.visit_expr(func)), len(matches)


class CountedRewrite:
    """Body of a module-pass class (decorate the subclass with ``tvm.transform.module_pass``) that runs
    :meth:`rewrite` on the Relax function ``func_name`` and keeps how many places it changed in ``count``."""

    def __init__(self, func_name: str = "main") -> None:
        self.func_name = func_name
        self.count = 0

    def rewrite(self, mod: tvm.IRModule, func_name: str) -> tuple[tvm.IRModule, int]:
        """The rewritten module and how many places changed (a subclass's job)."""
        raise NotImplementedError(f"{type(self).__name__} defines no rewrite(mod, func_name)")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out, self.count = self.rewrite(mod, self.func_name)
        return out


class PrimFuncRewrite:
    """Body of a PrimFunc-pass class for ``target`` (decorate the subclass with
    ``tvm.tirx.transform.prim_func_pass``): every PrimFunc of the module becomes what :meth:`rewrite` makes of
    it, or stays as it is where that is None."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def rewrite(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        """``func``'s replacement, or None to keep it (a subclass's job)."""
        raise NotImplementedError(f"{type(self).__name__} defines no rewrite(func)")

    def transform_function(self, func: tirx.PrimFunc, _mod: tvm.IRModule,
                           _ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
        new = self.rewrite(func)
        return func if new is None else new


__all__ = ["CountedRewrite", "PrimFuncRewrite", "emit_like", "replace_function", "rewrite_matches"]
