"""``tvm_lowbit.quantize``: one verb, a config object per scheme, dispatched through a registry.

``register_scheme(ConfigClass, handler)`` makes ``quantize(model, ConfigClass(...), ...)`` call
``handler(model, config, calib_data, val_data, inplace=..., progress=...)``; it also registers the
config for ``config_from_dict``.  The training quantizers' configs (INQ, SQ, PACT) run inside the
user's training loop, so they are registered for ``config_from_dict`` only.  Adding a scheme: one
module with its config (a ``SchemeConfig`` dataclass) and handler, one registration line here.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

from torch import nn

from tvm_lowbit.quantizers.auto import Auto, quantize_auto
from tvm_lowbit.quantizers.config import SchemeConfig, register_config, unregister_config
from tvm_lowbit.quantizers.embedding import DEFAULT_EMBEDDING_FORMAT, EmbeddingFormats, quantize_with_embeddings
from tvm_lowbit.quantizers.fgq import FGQ, quantize_fgq
from tvm_lowbit.quantizers.input_checks import check_calibration
from tvm_lowbit.quantizers.memory import keep_freed_memory
from tvm_lowbit.quantizers.inq import INQ
from tvm_lowbit.quantizers.pact import PACT
from tvm_lowbit.quantizers.sq import SQ


class SchemeHandler(Protocol):
    def __call__(self, model: nn.Module, config: Any, calib_data: object, val_data: object, *, inplace: bool,
                 progress: bool) -> nn.Module: ...


_HANDLERS: dict[type, SchemeHandler] = {}


def register_scheme(config_cls: type[SchemeConfig], handler: SchemeHandler) -> None:
    """``quantize(model, config_cls(...), ...)`` runs ``handler``; ``config_from_dict`` reads its dicts."""
    register_config(config_cls)
    _HANDLERS[config_cls] = handler


def unregister_scheme(config_cls: type[SchemeConfig]) -> None:
    """Remove a registered scheme (for tests that register a toy one)."""
    _HANDLERS.pop(config_cls, None)
    unregister_config(config_cls.SCHEME)


def registered_schemes() -> dict[str, type]:
    """Scheme name -> config class of every scheme ``quantize`` runs, in registration order."""
    return {getattr(c, "SCHEME", c.__name__): c for c in _HANDLERS}


def quantize(model: nn.Module, config: object, calib_data: object, val_data: object = None, *,
             inplace: bool = False, progress: bool = True, allow_degenerate: bool = False,
             embeddings: EmbeddingFormats = DEFAULT_EMBEDDING_FORMAT) -> nn.Module:
    """Quantize ``model`` with ``config`` (e.g. ``FGQ(group_size=4, act_bits=8)``) using ``calib_data``
    (an array/tensor of inputs, or an iterable of batches).  Returns a fake-quant copy of the model
    (the caller's model is untouched unless ``inplace=True``) that the compiler consumes.
    ``val_data`` ((images, labels) held out from training): ``Auto`` verifies its accuracy budget on it.

    ``calib_data`` is checked first (``input_checks.check_calibration``): empty or NaN/Inf data is an error,
    and so is constant or all-zero data unless ``allow_degenerate=True``.  ``inplace=True`` is transactional:
    if quantization fails, the caller's model is restored to its state before the call (a copy of it is kept
    while the scheme runs).  ``embeddings``: the format of the model's ``nn.Embedding`` tables (``"int8"``: int8
    rows with a float32 scale per row; ``"int4-g0"``, ``"int4"``, ...; ``"float"``/None keeps them float; or a
    mapping module path -> format), applied before the scheme (``quantizers.embedding``)."""
    if isinstance(config, str):
        raise TypeError(f"pass a configuration object, e.g. FGQ(group_size=4), not the string {config!r}; "
                        f"known schemes: {', '.join(registered_schemes())}")
    handler = next((_HANDLERS[c] for c in type(config).__mro__ if c in _HANDLERS), None)
    if handler is None:
        raise TypeError(f"unknown quantization scheme {type(config).__name__}; known schemes: "
                        f"{', '.join(c.__name__ for c in _HANDLERS)}")
    check_calibration(calib_data, allow_degenerate)
    keep_freed_memory()  # large activations reuse freed heap memory instead of fresh pages (quantizers.memory)

    def run(m: nn.Module) -> nn.Module:
        return handler(m, config, calib_data, val_data, inplace=inplace, progress=progress)

    if not inplace or not isinstance(model, nn.Module):
        return quantize_with_embeddings(run, model, embeddings, calib_data, inplace)
    backup = copy.deepcopy(model)
    try:
        return quantize_with_embeddings(run, model, embeddings, calib_data, inplace)
    except BaseException:
        # put every attribute back (the replaced submodules, parameters, buffers, hooks, training flag)
        model.__dict__.clear()
        model.__dict__.update(backup.__dict__)
        raise


def run_fgq(model: nn.Module, config: FGQ, calib_data: object, val_data: object, *, inplace: bool,
            progress: bool) -> nn.Module:
    """FGQ needs no validation data."""
    return quantize_fgq(model, config, calib_data, inplace=inplace, progress=progress)


def run_auto(model: nn.Module, config: Auto, calib_data: object, val_data: object, *, inplace: bool,
             progress: bool) -> nn.Module:
    """Auto builds a new model (one weight format per layer)."""
    if inplace:
        raise ValueError("Auto builds a new model (one weight format per layer); inplace=True is not supported")
    return quantize_auto(model, config, calib_data, val_data, progress=progress)


register_scheme(FGQ, run_fgq)
register_scheme(Auto, run_auto)
register_config(INQ)
register_config(SQ)
register_config(PACT)
