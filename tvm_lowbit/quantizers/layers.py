"""Fake-quant layers that compute the integer math of ``qmath`` exactly, in PyTorch, and the wrapping
that puts them where a model's own code uses its weight.

A quantized layer holds integer weights ``w_int = alpha_q * t`` (grouped ternary), the input
activation quantizer (scale, bits, signedness) and a per-channel float epilogue (``out_scale``,
``out_bias``) into which the input scale, the alpha scale, the bias and a following batch norm are
folded.  Its forward is::

    q   = clip(round(x / act_scale), lo, hi)          # float32 tensor of integer codes
    acc = conv2d(q, w_int)                            # exact: float64 when float32 could round
    y   = qmath.epilogue(acc, out_scale, out_bias)    # float32

``torch.export`` of such a layer gives the quantize -> conv -> epilogue chain that the Relax pass
the lowering pass (``tvm_lowbit.passes``) matches and replaces by one integer operator.

**Wrapping, not replacing.**  A model's ``nn.Conv2d`` / ``nn.Linear`` (or any subclass: TF-"same"
padding, weight standardization, scaling in its own ``forward``) keeps its class and its forward: the
quantizer gives the module instance a ``lowbit`` child (the QuantLayer) and an instance-level
``forward`` that runs the class's own forward with its convolution / linear call
(``F.conv2d`` / ``F.linear`` on a weight of the module's shape) routed to that child
(``wrap_module``).  The padding, weight arithmetic and scaling the module does around the call stay
where they were.  ``quant_layers(model)`` names a wrapped layer by the module's path.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tvm_lowbit import qmath

QUANT_ATTR = "lowbit"  # the child module of a wrapped Conv2d/Linear that holds its QuantLayer
CONV_FUNCS = (F.conv2d, torch.conv2d)
LINEAR_FUNCS = (F.linear,)


@dataclass
class WeightUse:
    """One weight use a module's forward made (what ``F.conv2d`` / ``F.linear`` was called with): the
    effective weight (after any weight arithmetic of the module's forward), its bias and the conv
    arguments.  ``kind`` is "conv2d" or "linear"."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @staticmethod
    def from_call(func: Callable, args: tuple, kwargs: dict) -> "WeightUse":
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args))
        a.update(kwargs)
        w = a["weight"].detach().clone()
        b = a.get("bias")
        b = b.detach().clone() if isinstance(b, torch.Tensor) else None
        if func in LINEAR_FUNCS:
            return WeightUse("linear", w, b)
        pair = lambda v, d: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * 2 if v is not None else d  # noqa: E731
        pad = a.get("padding", 0)
        pad = pad if isinstance(pad, str) else pair(pad, (0, 0))
        return WeightUse("conv2d", w, b, pair(a.get("stride", 1), (1, 1)), pad, pair(a.get("dilation", 1), (1, 1)),
                         int(a.get("groups", 1) or 1))

    def same_call(self, other: "WeightUse") -> bool:
        return (self.kind == other.kind and self.stride == other.stride and self.padding == other.padding
                and self.dilation == other.dilation and self.groups == other.groups
                and self.weight.shape == other.weight.shape and torch.equal(self.weight, other.weight))


class QuantLayer(nn.Module):
    """Common state of QConv2d and QLinear; built by the quantizer, not by hand."""

    kind = "linear"
    # class defaults too, so layers pickled before these existed (the shipped retrained checkpoints) load
    dynamic = False
    fast = False

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
        self.dynamic = False  # per-token dynamic input scales (set_dynamic), else one static scale
        self.fast = False  # while building: one float32 op instead of the exact split (statistics only)
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
        self.dynamic = False
        self.act_scale.fill_(scale)
        self.scale_value = float(self.act_scale)  # a Python float, so torch.export sees a constant
        self.act_signed = signed
        self.calibrated = True
        self.acc_dtype = self.exact_dtype()
        self.refresh_epilogue()

    def set_dynamic(self) -> None:
        """Per-token dynamic input scales: each input row (last dimension) gets the scale of its largest
        magnitude at run time, codes are signed ``act_bits``; the epilogue multiplies the row's scale
        back.  Exact in fake-quant; the compiler's lowering does not match this form (it stays float)."""
        self.dynamic = True
        self.act_scale.fill_(1.0)
        self.scale_value = 1.0
        self.act_signed = True
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
        return self._integer_op(q, hi).double().mul_(16).add_(self._integer_op(q, lo))  # exact in float64

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
        if self.dynamic:
            _, qmax = qmath.act_range(self.act_bits, True)
            s = qmath.token_scales(x, self.act_bits)
            q = torch.clamp(torch.round(x.to(torch.float32) / s), -qmax, qmax)
            acc = self._integer_op(q.to(self.acc_dtype), self.w_int.to(self.acc_dtype))
            return qmath.epilogue_rows(acc, s, self.out_scale, self.out_bias, channel_dim=self.channel_dim)
        q = self.quantize_input(x)
        if self.fast and not torch.compiler.is_exporting():
            # statistics only: the epilogue folded into one float32 op (scaled weight, bias), which may
            # round low bits; the float64 epilogue of a full activation costs more than the op itself
            shape = [-1] + [1] * (self.w_int.dim() - 1)
            return self.float_op(q, self.w_int * self.out_scale.reshape(shape), self.out_bias)
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
        act = "dynamic per-token" if self.dynamic else f"scale={float(self.act_scale):.4g}"
        return (f"{self.layer_name!r}, w={tuple(self.w_int.shape)}, N={self.group_size}, "
                f"act={'s' if self.act_signed else 'u'}{self.act_bits}, {act}, "
                f"bn_folded={self.folded}")


class QConv2d(QuantLayer):
    kind = "conv2d"
    channel_dim = 1

    def __init__(self, name: str, conv: nn.Conv2d | WeightUse, tw: qmath.TernaryWeight, act_bits: int) -> None:
        """``conv``: the nn.Conv2d (numeric zero padding) or the ``WeightUse`` of a wrapped module."""
        super().__init__(name, tw, conv.bias, act_bits)
        if isinstance(conv, nn.Conv2d) and (conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            raise ValueError(f"layer {name!r}: only numeric zero padding is supported "
                             f"(got padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
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

    def __init__(self, name: str, lin: nn.Linear | WeightUse, tw: qmath.TernaryWeight, act_bits: int) -> None:
        super().__init__(name, tw, lin.bias, act_bits)

    def _integer_op(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, w.t())

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)


def make_quant_layer(name: str, use: nn.Module | WeightUse, tw: object, act_bits: int) -> QuantLayer:
    """The fake-quant layer computing ``use`` (a WeightUse, or a plain Conv2d / Linear) with integer
    weight ``tw``."""
    kind = use.kind if isinstance(use, WeightUse) else "conv2d" if isinstance(use, nn.Conv2d) else "linear"
    if kind == "conv2d":
        return QConv2d(name, use, tw, act_bits)  # type: ignore[arg-type]
    return QLinear(name, use, tw, act_bits)  # type: ignore[arg-type]


def host_name(path: str) -> str:
    """The module path a QuantLayer at ``path`` stands for (its wrapped module's path)."""
    suffix = "." + QUANT_ATTR
    return path[: -len(suffix)] if path.endswith(suffix) else "" if path == QUANT_ATTR else path


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Module path -> QuantLayer of every quantized layer (a wrapped module is named by its own path)."""
    return {host_name(n): m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quant_layer(model: nn.Module, name: str) -> QuantLayer:
    """The QuantLayer of layer ``name`` (a wrapped module's path, or a QuantLayer's own path)."""
    m = model.get_submodule(name)
    if isinstance(m, QuantLayer):
        return m
    q = getattr(m, QUANT_ATTR, None)
    if not isinstance(q, QuantLayer):
        raise KeyError(f"layer {name!r} ({type(m).__name__}) is not quantized")
    return q


# --------------------------------------------------------------------------------------------
# Routing a module's own weight use (F.conv2d / F.linear inside its forward)
# --------------------------------------------------------------------------------------------

class _Route(TorchFunctionMode):
    """While the module's own forward runs: its conv2d/linear call on a weight of the module's weight
    shape goes to ``handler(func, args, kwargs)``; everything else runs as written."""

    def __init__(self, module: nn.Module, handler: Callable[[Callable, tuple, dict], Any]) -> None:
        super().__init__()
        self.module = module
        self.handler = handler
        self.shape = tuple(module.weight.shape)
        self.funcs = CONV_FUNCS if isinstance(module, nn.Conv2d) else LINEAR_FUNCS

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.funcs:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, torch.Tensor) and tuple(w.shape) == self.shape:
                return self.handler(func, args, kwargs)
        return func(*args, **kwargs)


def _call_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _quantized_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Instance-level forward of a wrapped module: its class's forward, weight use -> QuantLayer."""
    q = getattr(self, QUANT_ATTR)
    with _Route(self, lambda _f, a, k: q(_call_input(a, k))):
        return type(self).forward(self, *args, **kwargs)


def _observed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Instance-level forward while observed: the float call runs, ``self._lowbit_observer`` sees it."""
    seen = self.__dict__["_lowbit_observer"]

    def handler(func: Callable, a: tuple, k: dict) -> Any:
        out = func(*a, **k)
        seen(func, a, k, out)
        return out

    with _Route(self, handler):
        return type(self).forward(self, *args, **kwargs)


def wrap_module(module: nn.Module, q: QuantLayer) -> None:
    """Quantize ``module`` in place: ``q`` becomes its ``lowbit`` child and computes its weight use."""
    setattr(module, QUANT_ATTR, q)
    module.forward = types.MethodType(_quantized_forward, module)  # type: ignore[method-assign]


def unwrap_module(module: nn.Module) -> None:
    """Undo ``wrap_module``: the module is float again."""
    if QUANT_ATTR in module._modules:
        delattr(module, QUANT_ATTR)
    module.__dict__.pop("forward", None)


def observe_module(module: nn.Module, seen: Callable[[Callable, tuple, dict, Any], None]) -> None:
    """Call ``seen(func, args, kwargs, output)`` on every float weight use of ``module`` (until
    ``unobserve_module``); the module computes as before."""
    module.__dict__["_lowbit_observer"] = seen
    module.forward = types.MethodType(_observed_forward, module)  # type: ignore[method-assign]


def unobserve_module(module: nn.Module) -> None:
    module.__dict__.pop("_lowbit_observer", None)
    module.__dict__.pop("forward", None)


def is_wrapped(module: nn.Module) -> bool:
    return isinstance(module._modules.get(QUANT_ATTR), QuantLayer)
