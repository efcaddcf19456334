"""Integer-only ResNet bodies for VTA: the VTA-flavoured quantization, its NumPy reference, and the
network program that keeps every activation in VTA's layout in DRAM.

The math (every step an op VTA has: GEMM, ALU add / shift / min / max, no multiplier):

* An activation tensor is int8 codes ``x`` (0..127 after a ReLU) with one power-of-two scale
  ``2^e`` per tensor; zero point 0, so a padded convolution pads with code 0 in the LOAD.
* A conv layer's weights are ``w8 = round(w_int * M[c] * 2^sh[c])`` per output channel ``c``, where
  ``w_int = alpha_q * t`` are the fake-quant FGQ model's integer weights and ``M[c]`` its float
  per-channel factor (input scale, alpha scale, folded batch norm, output scale).  ``sh[c]`` is the
  largest shift with ``|w8| <= 127``; since ``w_int`` is grouped ternary, ``w8`` is grouped ternary
  too (each alpha code is re-rounded), so this is a VTA-flavoured FGQ model, not a new format.
* Requantization per output channel: ``y = clip((acc + B[c]) >> sh[c], 0, 127)`` -- ALU ``ADD``
  (a bias row), ``SHR`` (per lane), ``MIN 127``, ``MAX 0`` (the ReLU).  ``B[c]`` holds the batch-norm
  bias in accumulator units plus ``2^(sh[c]-1)``, so the floor shift rounds half up.
* The second conv of a residual block runs in two stages around its shortcut:
  ``a = (acc + B[c]) >> p[c]`` (units ``2^(e_out - q)``), then the shortcut GEMM accumulates into the
  same accumulator rows -- the identity as a 1x1 convolution with weights ``2^j * I`` (the block input
  brought to the same scale by a left shift of ``j = e_in - e_out + q`` bits), a projection as its
  1x1 convolution with weights rescaled to those units -- then ``y = clip(a >> q, 0, 127)``.  One
  reset, one requantization (the rounding of the second shift is folded into ``B[c]``: adding a
  multiple of ``2^p`` before a floor shift by ``p`` is exact).  The residual add is the GEMM core's
  accumulation; the alignment of the two operands is the shift ``j`` and the split ``sh = p + q``.

Only the stem (a float conv + batch norm + ReLU [+ max-pool], quantized to int8 at its output), the
global pooling and the classifier run on the host.  :func:`reference` is plain NumPy integer math
(``qmath.conv2d_int_np``), independent of the lowering and the simulator; :func:`torch_forward` is an
exact float twin of it for accuracy runs over many images (every partial sum is an integer below
2^24, or it falls back to float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_lowbit import qmath
from tvm_lowbit.quantizers.layers import QUANT_ATTR, QConv2d
from tvm_lowbit.vta.config import VTAConfig
from tvm_lowbit.vta.cycles import CycleReport, estimate
from tvm_lowbit.vta.lower import (ConvSpec, Epilogue, LayerProgram, Shortcut, lower_conv, pack_input,
                                  tile_candidates, unpack_output)
from tvm_lowbit.vta.model import run_with_pre_hooks
from tvm_lowbit.vta.program import DRAM_ALIGN, Buffer, DramLayout, Program
from tvm_lowbit.vta.sim import Simulator

CODE_MAX = 127          # activation codes after a ReLU: int8 0..127
MAX_LEFT_SHIFT = 6      # an identity shortcut weight 2^j must fit int8


class NotVTAInteger(ValueError):
    pass


@dataclass
class IntLayer:
    """One VTA layer: conv (+ shortcut) + requantization + ReLU, reading and writing named tensors."""

    name: str
    inp: str
    out: str
    w8: np.ndarray                       # (Cout, Cin, KH, KW) int64, |w| <= 127
    stride: tuple[int, int]
    padding: tuple[int, int]
    epi: Epilogue
    sc_inp: str | None = None            # the shortcut's input tensor
    sc_w8: np.ndarray | None = None      # (Cout, Cin_sc, 1, 1)
    sc_stride: tuple[int, int] = (1, 1)
    sc_kind: str = ""                    # "identity" | "projection"

    def spec(self, shapes: dict[str, tuple[int, int, int, int]]) -> ConvSpec:
        n, c, h, w = shapes[self.inp]
        kh, kw = self.w8.shape[2:]
        return ConvSpec(n, c, h, w, self.w8.shape[0], kh, kw, self.stride, self.padding)

    def shortcut(self, shapes: dict[str, tuple[int, int, int, int]]) -> Shortcut | None:
        if self.sc_inp is None:
            return None
        n, c, h, w = shapes[self.sc_inp]
        return Shortcut(ConvSpec(n, c, h, w, self.sc_w8.shape[0], 1, 1, self.sc_stride, (0, 0)), self.sc_w8)


@dataclass
class IntNet:
    """A ResNet whose body is integer-only VTA layers; ``exps``: each tensor's scale exponent."""

    model: nn.Module                     # the fake-quant model (stem and head run from it on the host)
    layers: list[IntLayer]
    exps: dict[str, int]
    first: str                           # the tensor the stem writes
    last: str                            # the tensor the pooling reads
    stem: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)
    head: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)

    # ---- host parts ---------------------------------------------------------------------------
    def stem_codes(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Host: stem (float) -> int8 codes of the first VTA tensor (NCHW, int64)."""
        with torch.no_grad():
            y = self.stem(torch.as_tensor(np.asarray(x, np.float32))).double()
        return torch.clamp(torch.round(y / 2.0 ** self.exps[self.first]), 0, CODE_MAX).long().numpy()

    def head_logits(self, codes: np.ndarray) -> np.ndarray:
        """Host: the last VTA tensor's codes -> global pooling + classifier (float)."""
        y = torch.from_numpy(np.asarray(codes, np.float64) * 2.0 ** self.exps[self.last]).float()
        with torch.no_grad():
            return self.head(y).numpy()

    def ops(self) -> list[tuple[str, str, str]]:
        """Every op of the network in execution order: (op, where, what)."""
        out = [("stem", "host", "the model's conv1 + bn1 + ReLU (+ max-pool) in float math, quantize to int8 "
                f"codes (scale 2^{self.exps[self.first]}) in VTA's layout")]
        for l in self.layers:
            sc = "" if l.sc_inp is None else f", + {l.sc_kind} shortcut of {l.sc_inp} in the same accumulators"
            out.append((l.name, "vta", f"conv {l.w8.shape[2]}x{l.w8.shape[3]}/{l.stride[0]} {l.inp} -> {l.out}"
                        f"{sc}, bias + shift requant, ReLU"))
        out.append(("head", "host", "dequantize, global average pooling, classifier (float)"))
        return out

    def host_roundtrips(self) -> int:
        """Host ops between the first and the last VTA op."""
        where = [w for _, w, _ in self.ops()]
        vta = [i for i, w in enumerate(where) if w == "vta"]
        return 0 if not vta else sum(1 for w in where[vta[0]:vta[-1] + 1] if w == "host")

    def shapes(self, batch: int, input_hw: tuple[int, int], in_channels: int) -> dict[str, tuple[int, int, int, int]]:
        x = torch.zeros(batch, in_channels, *input_hw)
        with torch.no_grad():
            y = self.stem(x)
        shapes = {self.first: tuple(y.shape)}
        for l in self.layers:
            n, _, h, w = shapes[l.inp]
            kh, kw = l.w8.shape[2:]
            oh = (h + 2 * l.padding[0] - kh) // l.stride[0] + 1
            ow = (w + 2 * l.padding[1] - kw) // l.stride[1] + 1
            shapes[l.out] = (n, l.w8.shape[0], oh, ow)
        return shapes


# ---- the NumPy integer reference -------------------------------------------------------------

def _shift(acc: np.ndarray, s: np.ndarray) -> np.ndarray:
    return acc >> np.asarray(s, np.int64).reshape(1, -1, 1, 1)


def layer_reference(l: IntLayer, x: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """One layer in NumPy int64: the output codes (NCHW)."""
    acc = qmath.conv2d_int_np(x, l.w8, l.stride, l.padding, (1, 1), 1)
    acc = _shift(acc + np.asarray(l.epi.bias, np.int64).reshape(1, -1, 1, 1), l.epi.lane_shifts(len(l.epi.shift)))
    if l.sc_inp is not None:
        acc = acc + qmath.conv2d_int_np(r, l.sc_w8, l.sc_stride, (0, 0), (1, 1), 1)
        acc = acc >> l.epi.post_shift
    if np.abs(acc).max(initial=0) >= 1 << 31:
        raise NotVTAInteger(f"{l.name}: an accumulator leaves int32")
    return np.clip(acc, *l.epi.clip)


def reference(net: IntNet, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the body from the stem's codes, by NumPy integer math."""
    t = {net.first: np.asarray(codes, np.int64)}
    for l in net.layers:
        t[l.out] = layer_reference(l, t[l.inp], t.get(l.sc_inp) if l.sc_inp else None)
    return t


def torch_forward(net: IntNet, x: torch.Tensor) -> torch.Tensor:
    """The whole integer network (host stem and head included) in torch, exactly the reference's math:
    convolutions of integer codes in float32 when every partial sum stays below 2^24, else float64."""
    codes = torch.from_numpy(net.stem_codes(x))
    t = {net.first: codes.double()}

    def conv(v: torch.Tensor, w8: np.ndarray, stride, padding) -> torch.Tensor:
        bound = CODE_MAX * np.abs(w8).reshape(w8.shape[0], -1).sum(1).max()
        dt = torch.float32 if bound < qmath.F32_EXACT_INT else torch.float64
        return F.conv2d(v.to(dt), torch.from_numpy(np.asarray(w8, np.float64)).to(dt), stride=stride,
                        padding=padding).double()

    for l in net.layers:
        bias = torch.tensor(l.epi.bias, dtype=torch.float64).reshape(1, -1, 1, 1)
        acc = conv(t[l.inp], l.w8, l.stride, l.padding) + bias
        acc = torch.floor(acc / torch.exp2(torch.tensor(l.epi.shift, dtype=torch.float64)).reshape(1, -1, 1, 1))
        if l.sc_inp is not None:
            acc = torch.floor((acc + conv(t[l.sc_inp], l.sc_w8, l.sc_stride, (0, 0))) / 2.0 ** l.epi.post_shift)
        t[l.out] = torch.clamp(acc, *l.epi.clip)
    return torch.from_numpy(net.head_logits(t[net.last].numpy()))


class IntegerModel(nn.Module):
    """The integer network as a torch module (host stem, integer body, host head), for evaluation with
    the usual tools: ``forward`` is :func:`torch_forward`, bit-identical to the NumPy reference."""

    def __init__(self, net: IntNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_forward(self.net, x)


# ---- conversion from a fake-quant FGQ ResNet -----------------------------------------------------

def _effective(layer: QConv2d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w_int, per-channel factor f, bias) with real output = conv(x_real, w_int * f) + bias."""
    f = layer.out_scale.double().numpy() / float(layer.act_scale)
    return layer.w_int.double().numpy().astype(np.int64), f, layer.out_bias.double().numpy()


def _shifts_for(w_int: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per channel, the largest shift with round(|w_int| * m * 2^sh) <= 127 (spread kept within 15)."""
    mx = np.abs(w_int).reshape(w_int.shape[0], -1).max(1) * m
    sh = np.where(mx > 0, np.floor(np.log2(127.49 / np.where(mx > 0, mx, 1.0))), 0).astype(np.int64)
    if sh.min() < 0:
        raise NotVTAInteger(f"a channel's weights exceed int8 even unshifted (factor {mx.max():.3g})")
    return np.minimum(sh, sh.min() + 15)  # a common immediate shift + per-lane rests of 0..15


def _rescale(w_int: np.ndarray, m: np.ndarray, sh: np.ndarray) -> np.ndarray:
    w8 = np.round(w_int * (m * np.exp2(sh)).reshape(-1, *[1] * (w_int.ndim - 1))).astype(np.int64)
    assert np.abs(w8).max(initial=0) <= 127
    return w8


def _conv_layer(name: str, layer: QConv2d, e_in: int, e_out: int, inp: str, out: str) -> IntLayer:
    w_int, f, bias = _effective(layer)
    m = f * 2.0 ** (e_in - e_out)
    sh = _shifts_for(w_int, m)
    b = np.round(bias / 2.0 ** e_out * np.exp2(sh)).astype(np.int64) + np.where(sh > 0, 1 << np.maximum(sh - 1, 0), 0)
    epi = Epilogue(tuple(int(v) for v in b), tuple(int(v) for v in sh), 0, (0, CODE_MAX), False)
    return IntLayer(name, inp, out, _rescale(w_int, m, sh), tuple(layer.stride), tuple(layer.padding), epi)


def _block_conv2(name: str, conv2: QConv2d, proj: QConv2d | None, e_mid: int, e_in: int, e_out: int, inp: str,
                 res: str, out: str) -> IntLayer:
    w_int, f, bias = _effective(conv2)
    m = f * 2.0 ** (e_mid - e_out)
    sh = _shifts_for(w_int, m)
    cout = w_int.shape[0]
    if proj is None:  # identity: weight 2^j, j = e_in - e_out + q in 0..6; q as small as possible (q = 0
        # saves the second shift: the residual codes are exact integers in output units when e_in >= e_out)
        q = max(0, e_out - e_in)
        if q > sh.min() or e_in - e_out + q > MAX_LEFT_SHIFT:
            raise NotVTAInteger(f"{name}: the residual (scale 2^{e_in}) cannot be aligned to the accumulator "
                                f"(q = {q}, output scale 2^{e_out})")
        sc_w8 = np.zeros((cout, cout, 1, 1), np.int64)
        sc_w8[np.arange(cout), np.arange(cout)] = 1 << (e_in - e_out + q)
        btot, kind, sc_stride = bias, "identity", (1, 1)
    else:
        pw, pf, pb = _effective(proj)
        pm = pf * 2.0 ** (e_in - e_out)
        mx = (np.abs(pw).reshape(cout, -1).max(1) * pm).max()
        q = int(min(sh.min(), np.floor(np.log2(127.49 / mx)) if mx > 0 else sh.min()))
        if q < 0:
            raise NotVTAInteger(f"{name}: the projection shortcut's weights exceed int8")
        sc_w8 = _rescale(pw, pm, np.full(cout, q))
        btot, kind, sc_stride = bias + pb, "projection", tuple(proj.stride)
    p = sh - q
    b = (np.round(btot / 2.0 ** e_out * np.exp2(sh)).astype(np.int64)
         + np.where(p > 0, 1 << np.maximum(p - 1, 0), 0) + (((1 << (q - 1)) << p) if q > 0 else 0))
    epi = Epilogue(tuple(int(v) for v in b), tuple(int(v) for v in p), q, (0, CODE_MAX), True)
    return IntLayer(name, inp, out, _rescale(w_int, m, sh), tuple(conv2.stride), tuple(conv2.padding), epi,
                    res, sc_w8, sc_stride, kind)


def _best_exponent(samples: np.ndarray) -> int:
    """The power-of-two scale of a (non-negative) activation tensor with the least quantization
    error on the calibration samples (codes 0..127)."""
    top = float(samples.max()) if samples.size else 1.0
    e0 = int(np.ceil(np.log2(max(top, 1e-8) / CODE_MAX)))
    best = None
    for e in range(e0 - 3, e0 + 1):
        err = float(np.mean((np.clip(np.round(samples / 2.0 ** e), 0, CODE_MAX) * 2.0 ** e - samples) ** 2))
        if best is None or err < best[0]:
            best = (err, e)
    return best[1]


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for sname in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, sname, None)
        if stage is None:
            continue
        for i, blk in enumerate(stage):
            out.append((f"{sname}.{i}", blk))
    return out


def _qconv(m: object) -> QConv2d | None:
    """The quantized conv of ``m``: ``m`` itself, or the QuantLayer a wrapped Conv2d holds."""
    q = m if isinstance(m, QConv2d) else getattr(m, QUANT_ATTR, None) if isinstance(m, nn.Module) else None
    return q if isinstance(q, QConv2d) else None


def _shortcut_conv(blk: nn.Module) -> QConv2d | None:
    sc = getattr(blk, "shortcut", None) or getattr(blk, "downsample", None)
    if sc is None or isinstance(sc, nn.Identity):
        return None
    conv = sc[0] if isinstance(sc, nn.Sequential) else sc
    q = _qconv(conv)
    if q is None:
        raise NotVTAInteger(f"the shortcut {type(conv).__name__} is not a quantized conv")
    return q


def from_resnet(qmodel: nn.Module, calib: np.ndarray, batch: int = 64, samples: int = 200_000) -> IntNet:
    """The integer-only VTA version of a fake-quant ResNet (``tvm_lowbit.quantize`` with FGQ or int8
    weights; BasicBlocks in ``layer1..layer4``; float stem ``conv1``/``bn1``/``relu`` [+ ``maxpool``]
    and head ``pool``/``avgpool`` + ``fc`` on the host).  ``calib`` sets each tensor's power-of-two scale.
    A model of another shape raises :class:`NotVTAInteger` naming the block or attribute: its forward is
    checked against that structure on the first calibration images (:func:`check_structure`)."""
    qmodel = qmodel.eval()
    kind = type(qmodel).__name__
    blocks = _stages(qmodel)
    if not blocks:
        raise NotVTAInteger(f"{kind} has no layer1..layer4 stages of residual blocks (not a ResNet of BasicBlocks)")
    missing = [a for a in ("conv1", "bn1", "relu", "fc") if not isinstance(getattr(qmodel, a, None), nn.Module)]
    if not isinstance(getattr(qmodel, "pool", None) or getattr(qmodel, "avgpool", None), nn.Module):
        missing.append("pool/avgpool")
    if missing:
        raise NotVTAInteger(f"{kind} has no {', '.join(missing)}: the integer-only body needs a ResNet's host stem "
                            "(conv1, bn1, relu) and head (pool/avgpool, fc)")
    for name, blk in blocks:
        if _qconv(getattr(blk, "conv1", None)) is None or _qconv(getattr(blk, "conv2", None)) is None:
            raise NotVTAInteger(f"block {name}: conv1/conv2 are not quantized convolutions")
    pool = getattr(qmodel, "pool", None) or getattr(qmodel, "avgpool")
    # float activations of the fake-quant model at every tensor the integer body keeps
    acts: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)

    def keep(key: str, v: torch.Tensor) -> None:
        a = v.detach().double().numpy().reshape(-1)
        acts.setdefault(key, []).append(a[rng.integers(0, a.size, min(a.size, samples // 8))])

    hooks: list[tuple[nn.Module, Callable]] = []
    for name, blk in blocks:
        hooks.append((blk.conv1, lambda m, a, k=f"{name}.in": keep(k, a[0])))
        hooks.append((blk.conv2, lambda m, a, k=f"{name}.mid": keep(k, a[0])))
    hooks.append((pool, lambda m, a: keep("out", a[0])))
    run_with_pre_hooks(qmodel, hooks, calib, batch)
    exps = {k: _best_exponent(np.concatenate(v)) for k, v in acts.items()}
    tensors = [f"{name}.in" for name, _ in blocks] + ["out"]
    layers = []
    for i, (name, blk) in enumerate(blocks):
        tin, tmid, tout = tensors[i], f"{name}.mid", tensors[i + 1]
        try:
            layers.append(_conv_layer(f"{name}.conv1", _qconv(blk.conv1), exps[tin], exps[tmid], tin, tmid))
            layers.append(_block_conv2(f"{name}.conv2", _qconv(blk.conv2), _shortcut_conv(blk), exps[tmid],
                                       exps[tin], exps[tout], tmid, tin, tout))
        except NotVTAInteger as e:
            raise (e if str(e).startswith(name) else NotVTAInteger(f"block {name}: {e}")) from None

    def stem(x: torch.Tensor) -> torch.Tensor:
        y = qmodel.relu(qmodel.bn1(qmodel.conv1(x)))
        mp = getattr(qmodel, "maxpool", None)
        return mp(y) if mp is not None else y

    def head(y: torch.Tensor) -> torch.Tensor:
        return qmodel.fc(torch.flatten(pool(y), 1))

    check_structure(qmodel, blocks, stem, head, torch.from_numpy(np.asarray(calib[:4], np.float32)))
    return IntNet(qmodel, layers, exps, tensors[0], "out", stem, head)


def _block_as_converted(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the integer body computes for a block (in float): relu(conv2(relu(conv1(x))) + shortcut(x)),
    batch norms folded into the convs."""
    sc = getattr(blk, "shortcut", None) or getattr(blk, "downsample", None)
    r = x if sc is None else sc(x)
    return torch.relu(blk.conv2(torch.relu(blk.conv1(x))) + r)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max()))))


def check_structure(qmodel: nn.Module, blocks: list[tuple[str, nn.Module]], stem: Callable, head: Callable,
                    x: torch.Tensor) -> None:
    """Raise :class:`NotVTAInteger` unless ``qmodel(x)`` is ``head(blocks(stem(x)))`` and every block computes
    ``relu(conv2(relu(conv1(x))) + shortcut(x))``: the conversion reads only those modules, so a block with
    another op (an unfolded batch norm, another activation, an extra layer) or a forward with more steps
    would otherwise become a different network."""
    with torch.no_grad():
        y = stem(x)
        for name, blk in blocks:
            want = blk(y)
            if not _close(_block_as_converted(blk, y), want):
                raise NotVTAInteger(f"block {name} ({type(blk).__name__}): its forward is not relu(conv2(relu("
                                    "conv1(x))) + shortcut(x)) with folded batch norms (another op in it?)")
            y = want
        if not _close(head(y), qmodel(x)):
            raise NotVTAInteger(f"{type(qmodel).__name__}: its forward is not stem -> layer1..layer4 -> pooling -> fc "
                                "(another op between them?)")


# ---- the network on VTA ----------------------------------------------------------------------

@dataclass
class NetProgram:
    """Every VTA layer's program over ONE DRAM: the activations are allocated once, in VTA's layout
    ``(N, C/16, H, W, 16)``; layer i's output buffer is layer i+1's input buffer (and a block's input is
    its shortcut's), so nothing returns to the host between the stem and the pooling."""

    net: IntNet
    cfg: VTAConfig
    shapes: dict[str, tuple[int, int, int, int]]
    tensors: dict[str, Buffer]
    programs: dict[str, LayerProgram]
    cycles: dict[str, CycleReport]
    dram_bytes: int

    def dram(self) -> np.ndarray:
        d = np.zeros(self.dram_bytes, np.uint8)
        for lp in self.programs.values():
            for name, raw in lp.program.constants.items():
                b = lp.program.buffers[name]
                d[b.offset:b.offset + len(raw)] = np.frombuffer(raw, np.uint8)
        return d

    def run(self, codes: np.ndarray, seed: int | None = 0, layers: list[str] | None = None,
            inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the programs in order on the functional simulator (one simulator, one DRAM); the host
        writes the stem's codes once and reads every tensor back only to return it.  ``layers``: a
        subset (consecutive or not), whose input tensors come from ``inputs`` (codes, NCHW)."""
        steps = [Step(l.name, self.programs[l.name].program, (l.inp,) + ((l.sc_inp,) if l.sc_inp else ()), l.out)
                 for l in self.net.layers if layers is None or l.name in layers]
        return run_steps(self.cfg, self.dram(), steps, self.tensors, self.shapes,
                         {**(inputs or {}), self.net.first: codes}, seed)

    @property
    def total_cycles(self) -> int:
        return sum(c.total_cycles for c in self.cycles.values())

    def gemm_bound(self, name: str) -> int:
        return -(-self.programs[name].spec.gemm_uops() // self.cfg.gemm_width) * self.cfg.timing.gemm_ii


@dataclass(frozen=True)
class Step:
    """One layer program of a network over a shared DRAM: the tensors it reads and the one it writes."""

    name: str
    program: Program
    inputs: tuple[str, ...]
    output: str


def _tensor_spec(shape: tuple[int, ...]) -> ConvSpec:
    n, c, h, w = shape
    return ConvSpec(n, c, h, w, c)


def run_steps(cfg: VTAConfig, dram: np.ndarray, steps: list[Step], tensors: dict[str, Buffer],
              shapes: dict[str, tuple[int, ...]], given: dict[str, np.ndarray],
              seed: int | None = 0) -> dict[str, np.ndarray]:
    """Write the ``given`` tensors (codes, NCHW) into ``dram`` in VTA's layout, run the programs in order on
    one simulator over it, and read back every tensor written (NCHW int64)."""
    written = set()
    for name, v in given.items():
        if name in tensors:
            x = pack_input(np.asarray(v), _tensor_spec(shapes[name]))
            b = tensors[name]
            dram[b.offset:b.offset + x.nbytes] = x.view(np.uint8).reshape(-1)
            written.add(name)
    sim = Simulator(cfg, seed=seed)
    for st in steps:
        for t in st.inputs:
            if t not in written:
                raise ValueError(f"{st.name}: its input tensor {t} was neither given nor computed")
        sim.run(st.program, dram)
        written.add(st.output)
    return {name: unpack_output(dram[tensors[name].offset:tensors[name].offset + tensors[name].nbytes],
                                _tensor_spec(shapes[name])).astype(np.int64) for name in written}


def lower_net(net: IntNet, cfg: VTAConfig, shapes: dict[str, tuple[int, int, int, int]],
              progress: bool = False, search: bool = True, order: str | None = None) -> NetProgram:
    """Lower every layer of ``net`` for ``cfg`` into one shared DRAM layout.  ``search``: let the cycle
    model pick each layer's tiling (else the first candidate that fits, of loop order ``order`` if given
    and possible: fast, for tests)."""
    tensors: dict[str, Buffer] = {}
    top = 0
    for name, (n, c, h, w) in shapes.items():
        nbytes = n * (-(-c // 16)) * h * w * 16
        tensors[name] = Buffer(name, top, nbytes, cfg.inp_elem_bytes)
        top = -(-(top + nbytes) // DRAM_ALIGN) * DRAM_ALIGN
    programs, cycles = {}, {}
    it = net.layers
    if progress:
        from tqdm import tqdm

        it = tqdm(net.layers, desc=f"lowering to {cfg.name}", unit="layer")
    for l in it:
        spec = l.spec(shapes)
        bufs = {"inp": tensors[l.inp], "out": tensors[l.out]}
        if l.sc_inp is not None:
            bufs["inp2"] = tensors[l.sc_inp]
        sc = l.shortcut(shapes)
        tiling = None
        if not search:
            cands = tile_candidates(spec, cfg, l.epi, shortcut=sc)
            tiling = next((t for t in cands if t.order == order), cands[0] if cands else None)
        lp = lower_conv(spec, l.w8, l.epi, cfg, tiling, name=l.name, shortcut=sc, layout=DramLayout(top, bufs))
        programs[l.name] = lp
        cycles[l.name] = estimate(lp.program)
        top = -(-lp.program.dram_bytes // DRAM_ALIGN) * DRAM_ALIGN
    return NetProgram(net, cfg, shapes, tensors, programs, cycles, top)


def ternarize(net: IntNet) -> IntNet:
    """The same network with every weight replaced by its sign (-1, 0, +1), for the ternary-wide core:
    its 2-bit lanes hold no alpha, so a ternary model's scale must be a per-channel power of two that
    the requantization shift absorbs.  Used for cycles with random weights (the integer math stays
    checked bit for bit: the reference runs the same sign weights); not an accuracy model."""
    layers = []
    for l in net.layers:
        sc = None if l.sc_w8 is None else np.sign(l.sc_w8)
        layers.append(IntLayer(l.name, l.inp, l.out, np.sign(l.w8), l.stride, l.padding, l.epi, l.sc_inp, sc,
                               l.sc_stride, l.sc_kind))
    return IntNet(net.model, layers, dict(net.exps), net.first, net.last, net.stem, net.head)
