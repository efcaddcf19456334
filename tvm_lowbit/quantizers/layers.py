"""Fake-quant layers that compute the integer math of ``qmath`` exactly, in PyTorch.

A quantized layer holds integer weights ``w_int = alpha_q * t`` (grouped ternary), the input
activation quantizer (scale, bits, signedness) and a per-channel float epilogue (``out_scale``,
``out_bias``) into which the input scale, the alpha scale, the bias and a following batch norm are
folded.  Its forward is::

    q   = clip(round(x / act_scale), lo, hi)          # float32 tensor of integer codes
    acc = conv2d(q, w_int)                            # exact: float64 when float32 could round
    y   = qmath.epilogue(acc, out_scale, out_bias)    # float32

``torch.export`` of such a layer gives the quantize -> conv -> epilogue chain that the Relax pass
the lowering pass (``tvm_lowbit.passes``) matches and replaces by one integer operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tvm_lowbit import qmath


class QuantLayer(nn.Module):
    """Common state of QConv2d and QLinear; built by the quantizer, not by hand."""

    kind = "linear"

    def __init__(self, name: str, tw: qmath.TernaryWeight, bias: torch.Tensor | None, act_bits: int) -> None:
        """``tw``: the weight in an integer form: anything with ``w_int`` (integers, the weight's shape),
        ``w_scale`` (float32 per output channel), ``format`` and ``group_size`` (ternary groups; 0 if none),
        like ``qmath.TernaryWeight``."""
        super().__init__()
        self.layer_name = name
        self.group_size = int(tw.group_size)
        self.weight_format = str(tw.format)
        self.act_bits = act_bits
        self.act_signed = True
        self.calibrated = False
        self.scale_value = 1.0
        self.acc_dtype = torch.float64
        self.tw = tw
        w_int = tw.w_int
        self.register_buffer("w_int", w_int.to(torch.float32))
        self.register_buffer("act_scale", torch.tensor(1.0, dtype=torch.float32))
        k = w_int.shape[0]
        self.register_buffer("w_scale", tw.w_scale.clone())
        self.register_buffer("bias", torch.zeros(k) if bias is None else bias.detach().float().clone())
        self.register_buffer("out_scale", torch.zeros(k))
        self.register_buffer("out_bias", torch.zeros(k))
        self.folded = False

    # -- the two phases before the layer is final -------------------------------------------
    def set_activation(self, scale: float, signed: bool) -> None:
        self.act_scale.fill_(scale)
        self.scale_value = float(self.act_scale)  # a Python float, so torch.export sees a constant
        self.act_signed = signed
        self.calibrated = True
        self.acc_dtype = self.exact_dtype()
        self.refresh_epilogue()

    def refresh_epilogue(self, bn_scale: torch.Tensor | None = None, bn_shift: torch.Tensor | None = None) -> None:
        """out_scale = s_x * w_scale (* bn_a); out_bias = bias (* bn_a + bn_b), in float64 then float32."""
        s = float(self.act_scale) * self.w_scale.double()
        b = self.bias.double()
        if bn_scale is not None and bn_shift is not None:
            s = s * bn_scale.double()
            b = b * bn_scale.double() + bn_shift.double()
            self.folded = True
        self.out_scale.copy_(s.float())
        self.out_bias.copy_(b.float())

    def exact_dtype(self) -> torch.dtype:
        """float32 when no partial sum can reach 2^24, else float64 (both give exact integer sums)."""
        return qmath.exact_float_dtype(self.w_int, self.act_bits, self.act_signed)

    @property
    def split_exact(self) -> bool:
        """Whether ``_split_integer_op`` is exact: both halves' partial sums stay below 2^24."""
        _, code_max = qmath.act_range(self.act_bits, self.act_signed)
        row = self.w_int[0].numel()
        hi_bound = qmath.integer_sum_bound(self.w_int, self.act_bits, self.act_signed) / 16  # |hi| <= |w_int| / 16
        lo_bound = 15 * row * code_max  # |lo| <= 15
        return max(hi_bound, lo_bound) < qmath.F32_EXACT_INT

    def _split_integer_op(self, q: torch.Tensor) -> torch.Tensor:
        """The exact integer op as two float32 ops (float64 convolutions are many times slower in torch):
        w_int = 16 * hi + lo with |hi|, |lo| <= 15, each half summed exactly in float32."""
        hi = torch.trunc(self.w_int / 16)
        lo = self.w_int - 16 * hi
        return self._integer_op(q, hi).double() * 16 + self._integer_op(q, lo).double()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return qmath.quantize_act(x, self.scale_value, self.act_bits, self.act_signed)

    def dequantized_weight(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.w_int.dim() - 1)
        return (self.w_int.double() * self.w_scale.double().reshape(shape)).float()

    def _integer_op(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:  # weights-only phase (calibration, BN re-estimation)
            return self.float_op(x, self.dequantized_weight(), self.bias)
        q = self.quantize_input(x)
        if self.acc_dtype == torch.float64 and not torch.compiler.is_exporting() and self.split_exact:
            acc = self._split_integer_op(q)
        else:  # the exported graph keeps one integer op per layer, which the compiler lowers
            acc = self._integer_op(q.to(self.acc_dtype), self.w_int.to(self.acc_dtype))
        return qmath.epilogue(acc, self.out_scale, self.out_bias, relu=False, channel_dim=self.channel_dim)

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The layer's float operation (conv2d or linear) on ``x`` with weight ``w`` and bias ``b``."""
        raise NotImplementedError

    channel_dim = -1

    def extra_repr(self) -> str:
        return (f"{self.layer_name!r}, w={tuple(self.w_int.shape)}, N={self.group_size}, "
                f"act={'s' if self.act_signed else 'u'}{self.act_bits}, scale={float(self.act_scale):.4g}, "
                f"bn_folded={self.folded}")


class QConv2d(QuantLayer):
    kind = "conv2d"
    channel_dim = 1

    def __init__(self, name: str, conv: nn.Conv2d, tw: qmath.TernaryWeight, act_bits: int) -> None:
        super().__init__(name, tw, conv.bias, act_bits)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"layer {name!r}: only numeric zero padding is supported "
                             f"(got padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _integer_op(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv(q, w, None)

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._conv(x, w, b)


class QLinear(QuantLayer):
    kind = "linear"
    channel_dim = -1

    def __init__(self, name: str, lin: nn.Linear, tw: qmath.TernaryWeight, act_bits: int) -> None:
        super().__init__(name, tw, lin.bias, act_bits)

    def _integer_op(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, w.t())

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
