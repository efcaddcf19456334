"""``tvm_lowbit.quantize``: one verb, a config object per scheme."""

from __future__ import annotations

from torch import nn

from tvm_lowbit.quantizers.auto import Auto, quantize_auto
from tvm_lowbit.quantizers.fgq import FGQ, quantize_fgq

SCHEMES = {"fgq": FGQ, "auto": Auto}


def quantize(model: nn.Module, config: object, calib_data: object, val_data: object = None, *,
             inplace: bool = False, progress: bool = True) -> nn.Module:
    """Quantize ``model`` with ``config`` (e.g. ``FGQ(group_size=4, act_bits=8)``) using ``calib_data``
    (an array/tensor of inputs, or an iterable of batches).  Returns a fake-quant copy of the model
    (the caller's model is untouched unless ``inplace=True``) that the compiler consumes.
    ``val_data`` ((images, labels) held out from training): ``Auto`` verifies its accuracy budget on it."""
    if isinstance(config, str):
        raise TypeError(f"pass a configuration object, e.g. FGQ(group_size=4), not the string {config!r}; "
                        f"known schemes: {', '.join(SCHEMES)}")
    if isinstance(config, FGQ):
        return quantize_fgq(model, config, calib_data, inplace=inplace, progress=progress)
    if isinstance(config, Auto):
        if inplace:
            raise ValueError("Auto builds a new model (one weight format per layer); inplace=True is not supported")
        return quantize_auto(model, config, calib_data, val_data, progress=progress)
    raise TypeError(f"unknown quantization scheme {type(config).__name__}; known schemes: "
                    f"{', '.join(c.__name__ for c in SCHEMES.values())}")
