"""tvm_lowbit: low-bit quantization (FGQ, INQ, SQ, PACT) and compilation with Apache TVM.

Importing the package does not import TVM (that takes seconds); the compiler parts load it lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "tvm_lowbit.quantizers.api",
    "FGQ": "tvm_lowbit.quantizers.fgq",
    "Auto": "tvm_lowbit.quantizers.auto",
    "INQ": "tvm_lowbit.quantizers.inq",
    "compile": "tvm_lowbit.compiler",
    "load_artifact": "tvm_lowbit.artifact",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvm_lowbit' has no attribute {name!r}")
