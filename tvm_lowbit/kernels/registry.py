"""The kernel registry: every kernel registers itself under its key (weight-format family, op, ISA).

A kernel module builds one :class:`Kernel` per compute definition and calls :func:`register` when it is
imported (``tvm_lowbit.kernels`` imports them all); adding an ISA is one new module plus one import line
in ``kernels/__init__.py``.  The lowering pass asks :func:`select` which kernel fits a layer on a target
and gets the kernel with the reason; schedules and tuning find a kernel by the name its PrimFunc is marked
with (:func:`get`, :func:`schedule_kernel`, :func:`schedule_default`); :func:`register_intrinsics`
registers the tensor intrinsics of every kernel that has some.

Among the kernels of a (family, op) that fit, the one with the highest ``preference`` wins: the
preferences encode the measured rules (``scripts/bench_gemm.py --shapes``), e.g. the lookup-table kernel
before the AVX2 one before the generic one for ternary dense layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import tvm
from tvm import te, tirx

from tvm_lowbit.kernels.common import KERNEL_ATTR, LayerSpec, Pick, TargetLike, kernel_name

GENERIC = "generic"  # the ISA key of the kernels that run on every target


Operands = tuple[list[np.ndarray], dict[str, Any]]


def always_fits(_layer: LayerSpec, _target: tvm.target.Target | None) -> str | None:
    """The ``fits`` of a generic kernel: every layer of its family and op."""
    return None


@dataclass(frozen=True)
class Kernel:
    """One registered kernel.

    ``compute(data, *weights, out_scale, out_bias, **attrs, relu=, out_mode=, ...)`` is its TE compute
    definition; ``operands(layer)`` gives the constant weight arrays it takes between the activation codes
    and ``out_scale`` plus its extra keyword arguments (an array among them becomes a constant too);
    ``schedule(sch, target, pick)`` is its default schedule (``pick`` samples the tile sizes when tuning);
    ``fits(layer, target)`` is None when the kernel runs the layer exactly on the target, else why not;
    ``intrinsics()`` registers its tensor intrinsics (idempotent) and returns their names; ``layouts`` are
    the activation layouts a conv kernel reads and writes (``in_layout=`` / ``out_layout=`` keywords of
    ``compute`` when it has more than NCHW); ``cheap_epilogues``: ``compute`` takes the cheaper exact
    epilogues of :mod:`.requant`: the integer requantization (``rq_mul=``, ``rq_add=``, ``rq_shift=``, with
    its ``zp`` operand, if any, folded into ``rq_add``), the float32 fused multiply-add
    (``fma_epilogue=True``) and with it the division-free requantization (``recip_requant=True``)."""

    name: str                   # the kernel marker (KERNEL_ATTR) and the PrimFunc name
    family: str
    op: str
    isa: str
    compute: Callable[..., te.Tensor]
    schedule: Callable[[tvm.s_tir.Schedule, TargetLike, Pick | None], None]
    operands: Callable[[LayerSpec], Operands] | None = None
    fits: Callable[[LayerSpec, tvm.target.Target | None], str | None] = always_fits
    preference: int = 0
    intrinsics: Callable[[], object] | None = None
    layouts: tuple[str, ...] = ("NCHW",)
    cheap_epilogues: bool = False
    tunable: bool = True        # False: a fixed-code kernel (a te.extern body) MetaSchedule cannot tune
    doc: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.family, self.op, self.isa)


class Choice(NamedTuple):
    """The answer of :func:`select`: the kernel (None when none fits) and why."""

    kernel: Kernel | None
    reason: str


_BY_NAME: dict[str, Kernel] = {}
_BY_KEY: dict[tuple[str, str, str], Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` (registering the same kernel again is a no-op); a name or key taken by another
    kernel is an error."""
    for table, k in ((_BY_NAME, kernel.name), (_BY_KEY, kernel.key)):
        old = table.get(k)
        if old is not None and old != kernel:
            raise ValueError(f"kernel {kernel.name!r}: {k!r} is already registered by kernel {old.name!r}; "
                             "unregister it first or choose another name/ISA")
    _BY_NAME[kernel.name] = kernel
    _BY_KEY[kernel.key] = kernel
    return kernel


def unregister(name: str) -> None:
    """Remove the kernel called ``name`` (for tests that register a kernel of their own)."""
    kernel = _BY_NAME.pop(name, None)
    if kernel is not None:
        _BY_KEY.pop(kernel.key, None)


def registered() -> list[Kernel]:
    """Every registered kernel, in registration order."""
    return list(_BY_NAME.values())


def get(name: str) -> Kernel:
    """The kernel whose PrimFuncs are marked ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no kernel registered as {name!r} (known: {', '.join(sorted(_BY_NAME))})") from None


def lookup(family: str, op: str, isa: str = GENERIC) -> Kernel | None:
    """The kernel registered under (family, op, isa), if any."""
    return _BY_KEY.get((family, op, isa))


def select(layer: LayerSpec, target: tvm.target.Target | None) -> Choice:
    """The kernel that runs ``layer`` on ``target``: of the kernels of its (family, op) that fit, the one
    with the highest preference; the reason names the preferred kernels that did not fit and why."""
    cands = sorted((k for k in _BY_NAME.values() if (k.family, k.op) == (layer.family, layer.op)),
                   key=lambda k: -k.preference)
    if not cands:
        return Choice(None, f"no kernel is registered for {layer.family} {layer.op}")
    passed: list[str] = []
    for k in cands:
        why = k.fits(layer, target)
        if why is None:
            return Choice(k, "; ".join([f"{k.name} fits", *passed]))
        passed.append(f"not {k.name}: {why}")
    return Choice(None, "; ".join(passed))


def schedule_kernel(sch: tvm.s_tir.Schedule, name: str, target: TargetLike, pick: Pick | None = None) -> None:
    """Apply the default schedule of kernel ``name`` to ``sch`` in place; ``pick`` chooses the tile sizes
    (default: the first candidate; the tuner samples them)."""
    kernel = _BY_NAME.get(name)
    if kernel is None:
        raise ValueError(f"no default schedule for kernel {name!r}")
    kernel.schedule(sch, target, pick)


def schedule_default(mod_or_func: tvm.IRModule | tirx.PrimFunc, target: TargetLike = None) -> tirx.PrimFunc:
    """Schedule one kernel (found by its marker) for ``target``; returns the PrimFunc with
    ``tirx.is_scheduled`` set so that later passes (dlight, MetaSchedule) leave it alone."""
    if isinstance(mod_or_func, tvm.IRModule):
        funcs = [f for _, f in mod_or_func.functions_items() if isinstance(f, tirx.PrimFunc)]
        if len(funcs) != 1:
            raise ValueError(f"expected an IRModule with one PrimFunc, got {len(funcs)}")
        func = funcs[0]
    else:
        func = mod_or_func
    kind = kernel_name(func)
    if kind is None:
        raise ValueError("not a tvm_lowbit kernel (no 'tvm_lowbit.kernel' marker)")
    sch = tvm.s_tir.Schedule(func)
    schedule_kernel(sch, kind, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(KERNEL_ATTR, kind)


def register_intrinsics() -> list[str]:
    """Register the tensor intrinsics of every registered kernel (before parsing tuning records that
    tensorize with them); returns their names."""
    names: list[str] = []
    done: set[int] = set()
    for k in _BY_NAME.values():
        if k.intrinsics is None or id(k.intrinsics) in done:
            continue
        done.add(id(k.intrinsics))
        got = k.intrinsics()
        for n in (got if isinstance(got, (tuple, list)) else [got]):
            if n not in names:
                names.append(str(n))
    return names


def describe() -> str:
    """The registered kernels, one a line: name, (family, op, ISA), preference (for users and docs)."""
    rows = sorted(_BY_NAME.values(), key=lambda k: (k.family, k.op, -k.preference, k.isa))
    return "\n".join(f"{k.name:<24} {k.family:<10} {k.op:<8} {k.isa:<8} preference {k.preference}" for k in rows)
