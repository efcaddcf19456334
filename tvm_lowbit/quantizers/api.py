"""``tvm_lowbit.quantize``: one verb, a config object per scheme."""

from __future__ import annotations

from torch import nn

from tvm_lowbit.quantizers.fgq import FGQ, quantize_fgq

SCHEMES = {"fgq": FGQ}


def quantize(model: nn.Module, config: object, calib_data: object, *, inplace: bool = False,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` with ``config`` (e.g. ``FGQ(group_size=4, act_bits=8)``) using ``calib_data``
    (an array/tensor of inputs, or an iterable of batches).  Returns a fake-quant copy of the model
    (the caller's model is untouched unless ``inplace=True``) that the compiler consumes."""
    if isinstance(config, str):
        raise TypeError(f"pass a configuration object, e.g. FGQ(group_size=4), not the string {config!r}; "
                        f"known schemes: {', '.join(SCHEMES)}")
    if isinstance(config, FGQ):
        return quantize_fgq(model, config, calib_data, inplace=inplace, progress=progress)
    raise TypeError(f"unknown quantization scheme {type(config).__name__}; known schemes: "
                    f"{', '.join(c.__name__ for c in SCHEMES.values())}")
