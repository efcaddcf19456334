"""Weight formats: what a quantized layer's integer weight is, and how the compiler reads it back.

One module per format behind ``base.WeightFormat``; the registry below is what the rest of the
package asks: ``parse_format(name)`` for a format name, ``decompose(weight_format, w_int,
group_size)`` (the one question the lowering pass asks: the integer weight constant of a layer, in
the packed integer form its kernels take, or the reason it does not fit), ``kernel_family(obj)``,
and the byte counts of a compiled model (``weight_bytes``, ``model_weight_bytes``,
``avg_weight_bits``).

==============  ===========================================================================  ==========
name            weight                                                                       bits/weight
==============  ===========================================================================  ==========
``ternary``     FGQ grouped ternary, N = 4 (``ternary-n16``: N = 16): 2-bit codes + 8-bit      4 (2.5)
                alpha code per group
``pow2-b``      power of two, b = 3, 4, 5 bits (INQ's set, projected post-training):          4 or 8
                4-bit codes when every exponent fits a nibble, else 8-bit codes
``int4``        4-bit integers in groups of 32 (``int4-g64``: 64; ``int4-g0``: one scale per   4.25
                output channel) with an 8-bit scale code per group
``int8``        8-bit integers, one scale per output channel (``int8-g32``: groups of 32)     8
``float``       the layer stays float32                                                       32
==============  ===========================================================================  ==========

The training quantizers' k-bit weights (PACT/DoReFa, recorded as ``int``) have no name; the compiler
stores them as int4, int8 or ternary groups of one (``kbit``).

Adding a format: one module with a ``WeightFormat`` subclass, one ``register_format`` line here.
"""

from __future__ import annotations

from tvm_lowbit.formats import floating, integer, kbit, pow2, ternary
from tvm_lowbit.formats.base import (Format, WeightFormat, WeightObject, format_for_recorded, get_format,
                                     parse_format, recorded_names, register_format, registered_formats,
                                     unregister_format)
from tvm_lowbit.formats.decompose import decompose, kernel_family
from tvm_lowbit.formats.sizes import avg_weight_bits, compiled_weight, model_weight_bytes, weight_bytes

# registration order is the order of names in error messages and of "known" lists
register_format(ternary.TernaryFormat())
register_format(pow2.Pow2Format())
register_format(kbit.KBitFormat())
register_format(integer.IntFormat())
register_format(floating.FloatFormat())

DEFAULT_INT4_GROUP = integer.DEFAULT_INT4_GROUP

__all__ = ["Format", "WeightFormat", "WeightObject", "register_format", "unregister_format", "registered_formats",
           "get_format", "format_for_recorded", "recorded_names", "parse_format", "decompose", "kernel_family",
           "weight_bytes", "compiled_weight", "model_weight_bytes", "avg_weight_bits", "DEFAULT_INT4_GROUP"]
