"""Backends keyed by the target kind (``TargetSpec.kind``, a target file's ``"kind"``): ``cpu`` and ``vta``.

``compile``, ``compile_saved``, ``tune`` and the CLI ask ``backend_for(spec)``; a new kind of target is one
new module with a :class:`Backend` subclass plus one ``register`` line here."""

from __future__ import annotations

from tvm_lowbit.backends.base import SOURCES, Backend, source_of
from tvm_lowbit.backends.cpu import CPUBackend
from tvm_lowbit.backends.vta import VTABackend
from tvm_lowbit.targets import TargetError, TargetSpec

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Make ``backend`` the one for targets of kind ``backend.kind``.  A kind another backend already
    compiles for is an error unless ``replace=True`` (registering the same object again is a no-op)."""
    old = BACKENDS.get(backend.kind)
    if old is not None and old is not backend and not replace:
        raise ValueError(f"backend {type(backend).__name__}: kind {backend.kind!r} is already compiled by "
                         f"{type(old).__name__}; pass replace=True to replace it or choose another kind")
    BACKENDS[backend.kind] = backend
    return backend


def backend_for(spec: TargetSpec) -> Backend:
    """The backend that compiles for ``spec``, or a ``TargetError`` naming the kinds there are."""
    if spec.kind not in BACKENDS:
        raise TargetError(f"target {spec.name!r} is of kind {spec.kind!r}, which no backend compiles for; "
                          f"kinds: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[spec.kind]


register(CPUBackend())
register(VTABackend())

__all__ = ["BACKENDS", "SOURCES", "Backend", "CPUBackend", "VTABackend", "backend_for", "register", "source_of"]
