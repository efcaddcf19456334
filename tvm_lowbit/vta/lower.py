"""Lowering of an integer conv2d / dense layer to a VTA program.

Data placement (DRAM, element = 16 int8 lanes or one 16x16 weight block):

* input  ``(N, Cin/16, H', W', 16)`` int8, H' = H + 2 * pad when the host pre-pads it (a layer with a
  non-zero input zero point pads with ``-zero_point``), else H' = H and the LOADs insert zero rows and
  columns themselves;
* weights ``(Cout/16, Cin/16, KH, KW, 16, 16)`` blocks, lane ``c * 16 + k`` = w[out c, in k];
* output ``(N, Cout/16, OH, OW, 16)`` int8.

Schedule: the output is cut into tiles of ``th x tw`` pixels x ``tco`` output-channel blocks, the
reduction into chunks of ``tci`` input-channel blocks.  Per chunk the load module brings the input
tile (with its halo) into one half of the input buffer while the compute module runs the GEMMs of
the previous chunk from the other half; per tile the accumulators alternate between two halves of
the accumulator/output buffer so the store module drains one while the next is computed.  The
weights of the whole layer are loaded once when they fit (else per chunk, double-buffered too).
Dependency tokens order it (see :mod:`tvm_lowbit.vta.program`).

When the whole layer fits on chip (input image, weights, every output row: true for every layer of the
built-in model at batch 1), the ``resident`` schedules are used instead (see :func:`_emit_resident`):
nothing is ever overwritten, so the load module runs ahead with no write-after-read tokens, one GEMM
reset zeroes all accumulators while the first DMAs are in flight, output rows go out in full-width
bands (short last band, so little is left after the last GEMM), and a band's GEMM walks groups of rows
in its outer loop so its micro-op kernel is short.  A :class:`WeightChain` lets a layer's program
prefetch the next layer's weights into the other half of the weight SRAM.

GEMM of a chunk: two folded loops (outer: input-channel block, inner: output column) around a
micro-op list over (kh, kw, output-channel block, output row), so a given accumulator row recurs
only every ``tco * th`` micro-ops (the pipeline hazard rule needs >= 3).

Requantization on the ALU: ``SHR imm`` by the layer's shift (in steps of at most 15, the portable
range), then ``MIN imm hi`` and ``MAX imm lo`` when the result must be clipped; STORE then writes the
low 8 bits of each accumulator, which the clip (or a proof that no value can leave int8) makes exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tvm_lowbit.vta import isa
from tvm_lowbit.vta.config import VTAConfig
from tvm_lowbit.vta.program import DramLayout, Program, ProgramBuilder, ProgramError
from tvm_lowbit.vta.sim import encode_weights

HAZARD_DISTANCE = 3
RESIDENT_ORDERS = ("resident", "resident-ci")
_BEST_TILING: dict[tuple, "Tiling"] = {}  # schedule signature -> the tiling the cycle model picked
_RANKED: dict[tuple, list] = {}            # ... -> its fastest tilings, the candidates of its chained variants
RANKED_KEEP = 16


class LoweringError(ValueError):
    pass


@dataclass(frozen=True)
class ConvSpec:
    """An integer NCHW convolution (dense layers are 1x1 convolutions over a 1 x batch image)."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kh: int = 1
    kw: int = 1
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    pre_padded: bool = False      # the DRAM input already holds the padding (non-zero zero point)

    @property
    def cib(self) -> int:
        return -(-self.cin // 16)

    @property
    def cob(self) -> int:
        return -(-self.cout // 16)

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.pad[0] - self.kh) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.pad[1] - self.kw) // self.stride[1] + 1

    @property
    def hd(self) -> int:
        """Rows of the input tensor in DRAM."""
        return self.h + 2 * self.pad[0] if self.pre_padded else self.h

    @property
    def wd(self) -> int:
        return self.w + 2 * self.pad[1] if self.pre_padded else self.w

    @property
    def macs(self) -> int:
        return self.n * self.oh * self.ow * self.cout * self.cin * self.kh * self.kw

    def gemm_uops(self) -> int:
        """GEMM micro-ops of one pass over the layer: the GEMM-bound minimum in cycles at II = 1."""
        return self.n * self.oh * self.ow * self.cob * self.cib * self.kh * self.kw

    def check(self, cfg: VTAConfig) -> None:
        if cfg.batch != 1 or cfg.block != 16:
            raise LoweringError(f"the lowering is written for a 1x16x16 core, not {cfg.batch}x{cfg.block}x{cfg.block}")
        if self.oh < 1 or self.ow < 1:
            raise LoweringError(f"conv {self}: empty output")
        if max(self.pad) > 15 and not self.pre_padded:
            raise LoweringError(f"padding {self.pad} exceeds the 15 rows/columns a VTA load can insert")
        if min(self.stride) < 1:
            raise LoweringError(f"stride {self.stride} must be >= 1")


@dataclass(frozen=True)
class Requant:
    """ALU epilogue: arithmetic right shift (floor) by ``shift`` -- one amount, or one per output
    channel -- then clip to ``clip`` if given."""

    shift: int | tuple[int, ...] = 0
    clip: tuple[int, int] | None = (-128, 127)

    @property
    def per_channel(self) -> bool:
        return not isinstance(self.shift, int) and len(set(self.shift)) > 1

    @property
    def base_shift(self) -> int:
        """The shift every channel gets with immediate SHRs; the rest (0..15) is one per-lane tensor SHR."""
        if isinstance(self.shift, int):
            return self.shift
        return max(0, max(self.shift) - 15) if self.per_channel else self.shift[0]

    def lane_shifts(self, cout: int) -> np.ndarray:
        s = np.full(cout, self.shift) if isinstance(self.shift, int) else np.asarray(self.shift)
        if s.shape != (cout,):
            raise ValueError(f"{s.size} shifts for {cout} output channels")
        return s.astype(np.int64)

    def ops(self) -> list[tuple[int, int | None]]:
        """ALU ops in order: (opcode, immediate) or (ALU_SHR, None) for the per-lane shift."""
        out, s = [], self.base_shift
        while s > 0:
            out.append((isa.ALU_SHR, min(s, 15)))
            s -= min(s, 15)
        if self.per_channel:
            if min(self.shift) < self.base_shift:
                raise ValueError("per-channel shifts spread over more than 15")
            out.append((isa.ALU_SHR, None))
        if self.clip is not None:
            out += [(isa.ALU_MIN, self.clip[1]), (isa.ALU_MAX, self.clip[0])]
        return out

    def apply(self, acc: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """The same math in NumPy: the reference's requantization (int64 in, int8 out)."""
        acc = np.asarray(acc, np.int64)
        if isinstance(self.shift, int):
            y = acc >> self.shift
        else:
            shape = [1] * acc.ndim
            shape[channel_axis] = -1
            y = acc >> self.lane_shifts(acc.shape[channel_axis]).reshape(shape)
        if self.clip is not None:
            y = np.clip(y, *self.clip)
        if y.size and (y.min() < -128 or y.max() > 127):
            raise ValueError("requantized value outside int8 without a clip: the shift bound was violated")
        return y.astype(np.int8)


    def tensor_ops(self) -> tuple[int, ...]:
        """ALU opcodes whose second operand is a per-lane constant row (one row per output block)."""
        return (isa.ALU_SHR,) if self.per_channel else ()

    def lane_values(self, op: int, cout: int) -> np.ndarray:
        """The per-lane constants of tensor op ``op``."""
        return self.lane_shifts(cout) - self.base_shift


SHORTCUT = -1   # marker in an epilogue's op list: the shortcut GEMM runs here


@dataclass(frozen=True)
class Epilogue:
    """Integer-only epilogue of a VTA layer (see :mod:`tvm_lowbit.vta.integer`)::

        acc = (acc + bias[c]) >> shift[c]        # ADD tensor (bias row), SHR (imm part, then per-lane rest)
        acc += shortcut GEMM                     # only with ``shortcut``: a second reduction, same rows
        acc = acc >> post_shift                  # SHR imm
        y = clip(acc, *clip)                     # MIN imm, MAX imm (ReLU when clip[0] == 0)

    Every step is a VTA ALU op on int32 accumulators (no multiplier); the rounding of both shifts is
    folded into ``bias``."""

    bias: tuple[int, ...]
    shift: tuple[int, ...]
    post_shift: int = 0
    clip: tuple[int, int] = (0, 127)
    shortcut: bool = False

    @property
    def per_channel(self) -> bool:
        return len(set(self.shift)) > 1

    @property
    def has_bias(self) -> bool:
        return any(self.bias)

    @property
    def base_shift(self) -> int:
        return max(0, max(self.shift) - 15) if self.per_channel else self.shift[0]

    def lane_shifts(self, cout: int) -> np.ndarray:
        if len(self.shift) != cout:
            raise ValueError(f"{len(self.shift)} shifts for {cout} output channels")
        return np.asarray(self.shift, np.int64)

    def tensor_ops(self) -> tuple[int, ...]:
        return ((isa.ALU_ADD,) if self.has_bias else ()) + ((isa.ALU_SHR,) if self.per_channel else ())

    def lane_values(self, op: int, cout: int) -> np.ndarray:
        if op == isa.ALU_ADD:
            return np.asarray(self.bias, np.int64)
        return self.lane_shifts(cout) - self.base_shift

    def ops(self) -> list[tuple[int, int | None]]:
        out: list[tuple[int, int | None]] = [(isa.ALU_ADD, None)] if self.has_bias else []
        out += _imm_shifts(self.base_shift)
        if self.per_channel:
            if min(self.shift) < self.base_shift:
                raise ValueError("per-channel shifts spread over more than 15")
            out.append((isa.ALU_SHR, None))
        if self.shortcut:
            out.append((SHORTCUT, None))
        out += _imm_shifts(self.post_shift)
        return out + [(isa.ALU_MIN, self.clip[1]), (isa.ALU_MAX, self.clip[0])]


def _imm_shifts(s: int) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    while s > 0:
        out.append((isa.ALU_SHR, min(s, 15)))
        s -= min(s, 15)
    return out


@dataclass(frozen=True)
class Shortcut:
    """A second reduction accumulated into a layer's accumulators between the epilogue's two shifts: a
    1x1 convolution (stride ``spec.stride``, no padding) of another DRAM tensor (a residual block's
    input); an identity shortcut is one with ``w8 = 2^j * I``.  Zero weight blocks are skipped, so the
    identity costs one GEMM micro-op per output vector."""

    spec: ConvSpec
    w8: np.ndarray = field(compare=False, hash=False)

    def blocks(self) -> np.ndarray:
        return pack_weight_blocks(self.w8, self.spec)

    def nonzero(self) -> np.ndarray:
        """(Cout/16, Cin/16) bool: which weight blocks are not all zero."""
        b = self.blocks().reshape(self.spec.cob, self.spec.cib, 16, 16)
        return np.any(b != 0, axis=(2, 3))

    @property
    def key(self) -> tuple:
        return (self.spec, self.nonzero().tobytes())


def const_rows(requant: "Requant | Epilogue", cob: int, cfg: VTAConfig) -> dict[int, int]:
    """First accumulator row of each tensor op's constants (one row per output block, at the top)."""
    return {op: cfg.acc_depth - (i + 1) * cob for i, op in enumerate(requant.tensor_ops())}


@dataclass(frozen=True)
class Tiling:
    """Output tile ``th x tw`` pixels x ``tco`` output blocks, reduction chunks of ``tci`` input blocks.
    ``order``: ``weight`` (output-channel tiles outermost; every chunk brings its input tile) or
    ``input`` (input-stationary: each input tile, all input channels, is loaded once and every
    output-channel tile is computed from it; needs tci = Cin/16 and resident weights) or ``resident``
    (the whole layer -- input, weights, output -- stays on chip: ``th``-row bands of the full width,
    ``taper`` 1/2 shrinks the last / first-and-last bands, see :func:`band_rows`) or ``resident-ci``
    (the same with the reduction outermost)."""

    th: int
    tw: int
    tco: int
    tci: int
    order: str = "weight"
    taper: int = 0


@dataclass(frozen=True)
class WeightChain:
    """Weight prefetch across consecutive layer programs (VTA's SRAM keeps its contents between
    launches).  ``base``: the weight-SRAM block where this layer's weights live; ``preloaded``: the
    previous program already loaded them there (the whole array, DRAM order), so this one loads none;
    ``next_blocks``: the next layer's weight blocks, which this program loads to ``next_base`` with its
    load module after its own loads, while compute finishes -- the FINISH handshake waits for it.

    The micro-op kernels chain the same way: ``uop_base`` is where this program's kernel image lives in
    uop SRAM, ``uops_preloaded`` says the previous program loaded it there, and ``next_uops`` (the next
    program's image, ``Program.notes["uop_image"]``) is loaded to ``next_uop_base`` by this program's
    compute module after its last ALU op, while the store module drains the last band -- time the
    compute module would otherwise sit idle.  Only the whole-layer-on-chip schedules take part."""

    base: int = 0
    preloaded: bool = False
    next_blocks: np.ndarray | None = field(default=None, compare=False, hash=False)
    next_base: int = 0
    uop_base: int = 0
    uops_preloaded: bool = False
    next_uops: np.ndarray | None = field(default=None, compare=False, hash=False)
    next_uop_base: int = 0

    @property
    def key(self) -> tuple:
        return (self.base, self.preloaded, None if self.next_blocks is None else len(self.next_blocks), self.next_base,
                self.uop_base, self.uops_preloaded, None if self.next_uops is None else len(self.next_uops),
                self.next_uop_base)

    @property
    def active(self) -> bool:
        return self.key != NO_CHAIN_KEY


NO_CHAIN_KEY = (0, False, None, 0, 0, False, None, 0)
NO_CHAIN = WeightChain()


@dataclass
class LayerProgram:
    """A lowered layer: the program and how to lay its tensors out."""

    spec: ConvSpec
    tiling: Tiling
    requant: Requant
    program: Program
    weights_resident: bool
    info: dict[str, object] = field(default_factory=dict)


# ---- layouts ---------------------------------------------------------------------------------

def pack_input(q: np.ndarray, spec: ConvSpec, pad_value: int = 0) -> np.ndarray:
    """int codes (N, C, H, W) -> int8 (N, Cin/16, H', W', 16) in the DRAM layout (pre-padded with
    ``pad_value`` when ``spec.pre_padded``); padded channels are 0 (their weights are 0)."""
    q = np.asarray(q)
    if q.shape != (spec.n, spec.cin, spec.h, spec.w):
        raise ValueError(f"input shape {q.shape} does not match the lowered layer's {(spec.n, spec.cin, spec.h, spec.w)}")
    if q.size and (q.min() < -128 or q.max() > 127):
        raise ValueError(f"input codes {q.min()}..{q.max()} do not fit int8")
    x = np.zeros((spec.n, spec.cib * 16, spec.h, spec.w), np.int8)
    x[:, :spec.cin] = q
    if spec.pre_padded:
        ph, pw = spec.pad
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    return np.ascontiguousarray(x.reshape(spec.n, spec.cib, 16, spec.hd, spec.wd).transpose(0, 1, 3, 4, 2))


def pack_weight_blocks(w8: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """int weights (Cout, Cin, KH, KW) -> blocks (Cout/16, Cin/16, KH, KW, 16, 16), [c][k] = w[out c, in k]."""
    w = np.zeros((spec.cob * 16, spec.cib * 16, spec.kh, spec.kw), np.int64)
    w[:spec.cout, :spec.cin] = np.asarray(w8).reshape(spec.cout, spec.cin, spec.kh, spec.kw)  # dense: (M, K)
    blocks = w.reshape(spec.cob, 16, spec.cib, 16, spec.kh, spec.kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(blocks.reshape(-1, 16, 16))


def unpack_output(raw: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """int8 (N, Cout/16, OH, OW, 16) -> (N, Cout, OH, OW)."""
    y = np.asarray(raw).view(np.int8).reshape(spec.n, spec.cob, spec.oh, spec.ow, 16)
    return np.ascontiguousarray(y.transpose(0, 1, 4, 2, 3).reshape(spec.n, spec.cob * 16, spec.oh, spec.ow)[:, :spec.cout])


# ---- tiling ----------------------------------------------------------------------------------

def _in_extent(out: int, stride: int, k: int) -> int:
    return out if k == 1 else (out - 1) * stride + k


def _row_step(spec: ConvSpec) -> int:
    """DRAM rows between consecutive loaded input rows: a 1x1 kernel skips the rows a stride jumps over."""
    return spec.stride[0] if spec.kh == 1 and spec.pad[0] == 0 else 1


def acc_half_rows(spec: ConvSpec, cfg: VTAConfig, requant: Requant) -> int:
    """Rows of each accumulator half; a per-lane constant (shift, bias) keeps one row per output block at the top."""
    reserved = spec.cob * len(requant.tensor_ops())
    return (cfg.acc_depth - reserved) // 2


def fits(spec: ConvSpec, t: Tiling, cfg: VTAConfig, requant: Requant = Requant(),
         shortcut: Shortcut | None = None) -> str | None:
    """None if tiling ``t`` fits the buffers, the instruction fields and the hazard rule, else why not."""
    if shortcut is not None:
        why = _fits_shortcut(spec, t, cfg, shortcut)
        if why is not None:
            return why
    if t.order in RESIDENT_ORDERS:
        return _fits_resident(spec, t, cfg, requant)
    th_in = _in_extent(t.th, spec.stride[0], spec.kh)
    tw_in = (t.tw - 1) * spec.stride[1] + spec.kw
    taps = spec.kh * spec.kw
    if t.tci * th_in * tw_in > cfg.inp_depth // 2:
        return "input tile exceeds half the input buffer"
    if t.tco * t.th * t.tw > acc_half_rows(spec, cfg, requant):
        return "output tile exceeds half the accumulator buffer"
    if spec.cob * spec.cib * taps > cfg.wgt_depth and t.tco * t.tci * taps > cfg.wgt_depth // 2:
        return "weight chunk exceeds half the weight buffer"
    if t.order == "input" and (t.tci != spec.cib or spec.cob * spec.cib * taps > cfg.wgt_depth):
        return "the input-stationary order needs the whole input depth in one chunk and resident weights"
    if t.order not in ("weight", "input"):
        return f"unknown loop order {t.order!r}"
    if taps * t.tco * t.th > cfg.uop_depth // 4:
        return "GEMM micro-op kernel too long"
    # a GEMM instruction runs (ci, ox) loops around the micro-op list (kh, kw, co, oy): an accumulator row
    # recurs every tco * th micro-ops across taps, and every tw * (list length) across input blocks
    th_min = min(t.th, spec.oh - (-(-spec.oh // t.th) - 1) * t.th)
    tco_min = min(t.tco, spec.cob - (-(-spec.cob // t.tco) - 1) * t.tco)
    tw_min = min(t.tw, spec.ow - (-(-spec.ow // t.tw) - 1) * t.tw)
    recur = [tco_min * th_min] if taps > 1 else []
    if t.tci > 1:
        recur.append(tw_min * tco_min * th_min * taps)
    if recur and min(recur) < HAZARD_DISTANCE:
        return f"fewer than {HAZARD_DISTANCE} micro-ops between writes to one accumulator row (pipeline hazard)"
    if th_in * tw_in >= 1 << cfg.log_inp_depth or t.th * t.tw >= 1 << cfg.log_acc_depth or taps >= 1 << cfg.log_wgt_depth:
        return "a loop factor does not fit its field"
    if t.tco * t.th >= 1 << isa.LOOP_ITER_BITS or t.tw >= 1 << isa.LOOP_ITER_BITS:
        return "a loop count does not fit its field"
    return None


def _fits_shortcut(spec: ConvSpec, t: Tiling, cfg: VTAConfig, sc: Shortcut) -> str | None:
    ss = sc.spec
    if ((ss.oh, ss.ow, ss.cout, ss.n) != (spec.oh, spec.ow, spec.cout, spec.n)
            or (ss.kh, ss.kw, ss.pad) != (1, 1, (0, 0))):
        return f"the shortcut {ss} is not an unpadded 1x1 convolution onto the layer's output"
    if t.order in RESIDENT_ORDERS:
        hs, ws, _ = _image(spec)
        if spec.n * spec.cib * hs * ws + ss.n * ss.cib * spec.oh * ss.wd > cfg.inp_depth:
            return "the input and the shortcut's input do not both fit the input buffer"
        if spec.cob * spec.cib * spec.kh * spec.kw + ss.cob * ss.cib > cfg.wgt_depth:
            return "the weights and the shortcut's weights do not both fit the weight buffer"
        if ss.wd * ss.stride[0] >= 1 << 16 or ss.stride[1] >= 1 << cfg.log_inp_depth:
            return "a shortcut load stride or loop factor does not fit its field"
        try:
            for th in set(band_rows(spec.oh, t.th, t.taper, _least_band(spec, t))):
                for co0 in range(0, spec.cob, t.tco):
                    for pco in {1, min(t.tco, spec.cob - co0)}:
                        uops = _resident_shortcut_uops(sc, spec, 0, co0, pco, 0, th, 0, 0, 0)
                        _check_hazard(uops, (1, spec.ow), (0, 1))
        except ProgramError:
            return f"fewer than {HAZARD_DISTANCE} micro-ops between writes to one accumulator row in the shortcut GEMM"
        return None
    if t.order != "weight":
        return "a layer with a shortcut uses the weight-order or the whole-layer-on-chip schedules"
    taps = spec.kh * spec.kw
    per = _shortcut_chunk_blocks(sc, t.th, t.tw, cfg)
    if per < 1:
        return "one input block of the shortcut's tile exceeds half the input buffer"
    if spec.cob * spec.cib * taps + ss.cob * ss.cib > cfg.wgt_depth and t.tco * per > cfg.wgt_depth // 2:
        return "the shortcut's weights exceed half the weight buffer"
    try:
        for co0 in range(0, spec.cob, t.tco):
            tco = min(t.tco, spec.cob - co0)
            for th in {min(t.th, spec.oh - y) for y in range(0, spec.oh, t.th)}:
                for tw in {min(t.tw, spec.ow - x) for x in range(0, spec.ow, t.tw)}:
                    for lo, hi in _shortcut_ranges(sc, co0, tco, per):
                        _check_hazard(_shortcut_uops(sc, co0, tco, th, tw, 0, 0, 0, lo, hi, ss.cib), (1, tw), (0, 1))
    except ProgramError:
        return f"fewer than {HAZARD_DISTANCE} micro-ops between writes to one accumulator row in the shortcut GEMM"
    return None


def _shortcut_chunk_blocks(sc: Shortcut, th: int, tw: int, cfg: VTAConfig) -> int:
    """Input blocks of the shortcut per reduction chunk: as many as fit half the input buffer."""
    return min(sc.spec.cib, cfg.inp_depth // 2 // (th * ((tw - 1) * sc.spec.stride[1] + 1)))


def _shortcut_ranges(sc: Shortcut, co0: int, tco: int, per: int) -> list[tuple[int, int]]:
    """The shortcut's reduction chunks [lo, hi) of input blocks for output blocks [co0, co0 + tco):
    the blocks with a non-zero weight, ``per`` at a time."""
    cis = np.nonzero(sc.nonzero()[co0:co0 + tco].any(0))[0]
    if cis.size == 0:
        return []
    lo, hi = int(cis.min()), int(cis.max()) + 1
    return [(a, min(a + per, hi)) for a in range(lo, hi, per)]


def _shortcut_uops(sc: Shortcut, co0: int, tco: int, th: int, tw: int, acc0: int, inp0: int, w0: int, lo: int,
                   hi: int, wrow: int) -> list[tuple[int, int, int]]:
    """Micro-ops of the shortcut GEMM over input blocks [lo, hi) for one output tile (inner loop: output
    column), skipping zero weight blocks; the input blocks are at ``inp0`` on, the weights of output
    block co and input block ci at ``w0 + co * wrow + ci - lo``."""
    nz = sc.nonzero()[co0:co0 + tco]
    tw_in = (tw - 1) * sc.spec.stride[1] + 1
    return [(acc0 + (co * th + oy) * tw, inp0 + (ci - lo) * th * tw_in + oy * tw_in, w0 + co * wrow + ci - lo)
            for ci in range(lo, hi) for co in range(tco) if nz[co, ci] for oy in range(th)]


def _image(spec: ConvSpec) -> tuple[int, int, int]:
    """(rows, columns, input rows per output row) of one input-channel plane as the resident schedule
    keeps it in SRAM: the padded image, or for an unpadded 1x1 kernel only the rows the stride reads."""
    if _row_step(spec) > 1:
        return spec.oh, spec.wd, 1
    ph, pw = (0, 0) if spec.pre_padded else spec.pad
    return spec.hd + 2 * ph, spec.wd + 2 * pw, spec.stride[0]


def band_rows(oh: int, th: int, taper: int, least: int) -> list[int]:
    """Output-row bands of about ``th`` rows; a band below ``least`` (the hazard minimum) joins a
    neighbour.  ``taper`` 1 makes the last bands shrink by halves down to ``least`` rows (the ALU and
    STORE left after the last GEMM get short); 2 also ramps the first bands up from ``least`` (the
    first GEMM waits for fewer input rows)."""
    head: list[int] = []
    tail: list[int] = []
    least = max(least, 1)
    th = max(th, least)
    left, size = oh, least
    while taper and size < th and left > 0:
        for part in ((tail, head) if taper == 2 else (tail,)):
            take = min(size, left)
            if take:
                part.append(take)
                left -= take
        size *= 2
    k = -(-left // th)
    mid = [left // k + (1 if j < left % k else 0) for j in range(k)] if left else []
    bands = head + mid + tail[::-1]
    j = 0
    while len(bands) > 1 and j < len(bands):  # a band below the hazard minimum joins its neighbour
        if bands[j] < least:
            k = j - 1 if j == len(bands) - 1 else j + 1
            bands[min(j, k)] = bands[j] + bands[k]
            del bands[max(j, k)]
            j = 0
        else:
            j += 1
    return bands


def _fits_resident(spec: ConvSpec, t: Tiling, cfg: VTAConfig, requant: Requant) -> str | None:
    hs, ws, _ = _image(spec)
    reserved = spec.cob * len(requant.tensor_ops())
    taps = spec.kh * spec.kw
    if spec.n * spec.cib * hs * ws > cfg.inp_depth:
        return "the whole input does not fit the input buffer"
    if spec.n * spec.cob * spec.oh * spec.ow > cfg.acc_depth - reserved:
        return "the whole output does not fit the accumulator buffer"
    if spec.cob * spec.cib * taps > cfg.wgt_depth:
        return "the weights do not fit the weight buffer"
    if t.tw != spec.ow or not (1 <= t.th <= spec.oh and 1 <= t.tco <= spec.cob and 1 <= t.tci <= spec.cib):
        return "resident bands span the full output width"
    if hs * ws >= 1 << cfg.log_inp_depth or spec.oh * spec.ow >= 1 << cfg.log_acc_depth or taps >= 1 << cfg.log_wgt_depth:
        return "a loop factor does not fit its field"
    if taps * t.tco * t.th > cfg.uop_depth // 4:
        return "GEMM micro-op kernel too long"
    tcos = {min(t.tco, spec.cob - c) for c in range(0, spec.cob, t.tco)}
    tcis = {min(t.tci, spec.cib - c) for c in range(0, spec.cib, t.tci)}
    for th in set(band_rows(spec.oh, t.th, t.taper, _least_band(spec, t))):
        for tco in tcos:
            for tci in tcis:
                try:
                    _band_gemm(spec, 0, 0, 0, 0, tco, tci, th, spec.oh, 1, 1, 1)
                except ProgramError:
                    return f"fewer than {HAZARD_DISTANCE} micro-ops between writes to one accumulator row (pipeline hazard)"
    return None


def _distinct_tiles(extent: int) -> list[int]:
    """Tile sizes giving distinct tile counts (largest first)."""
    seen, out = set(), []
    for n in range(1, extent + 1):
        size = -(-extent // n)
        if size not in seen:
            seen.add(size)
            out.append(size)
    return out


def tile_candidates(spec: ConvSpec, cfg: VTAConfig, requant: Requant = Requant(), limit: int = 48,
                    shortcut: Shortcut | None = None) -> list[Tiling]:
    """Tilings that fit: every distinct whole-layer-on-chip one, then the double-buffered ones, favouring
    big tiles (fewer instructions, more reuse); of those at most ``limit`` (a quarter of it when the
    layer fits on chip)."""
    out = []
    for tco in _distinct_tiles(spec.cob):
        for tci in _distinct_tiles(spec.cib):
            for tw in _distinct_tiles(spec.ow)[:3]:
                for th in _distinct_tiles(spec.oh):
                    for order in ("weight", "input"):
                        t = Tiling(th, tw, tco, tci, order)
                        if fits(spec, t, cfg, requant, shortcut) is None:
                            out.append(t)
    resident = [Tiling(th, spec.ow, tco, tci, order, taper)
                for order in RESIDENT_ORDERS[:1 if spec.cib == 1 else 2] for tco in _distinct_tiles(spec.cob)
                for tci in _distinct_tiles(spec.cib) for th in _distinct_tiles(spec.oh)[:6] for taper in (0, 1, 2)]
    seen: set[tuple] = set()
    for t in list(resident):  # many (th, taper) pairs give the same bands: keep one of each
        same = (t.order, t.tco, t.tci, tuple(band_rows(spec.oh, t.th, t.taper, _least_band(spec, t))))
        if same in seen or fits(spec, t, cfg, requant, shortcut) is not None:
            resident.remove(t)
        seen.add(same)
    # prefer few output tiles with at least two of them (so the store overlaps the next tile)
    def key(t: Tiling) -> tuple:
        tiles = -(-spec.oh // t.th) * -(-spec.ow // t.tw) * -(-spec.cob // t.tco)
        chunks = -(-spec.cib // t.tci)
        return (tiles < 2 and spec.oh * spec.ow * spec.cob > 1, tiles * chunks, -t.tw)
    # everything on chip is usually fastest: keep all of those, and the best-looking of the others
    return resident + sorted(out, key=key)[:limit // 4 if resident else limit]


# ---- emission --------------------------------------------------------------------------------

def lower_conv(spec: ConvSpec, w8: np.ndarray, requant: Requant | Epilogue, cfg: VTAConfig,
               tiling: Tiling | None = None, name: str = "conv", chain: WeightChain = NO_CHAIN,
               shortcut: Shortcut | None = None, layout: DramLayout | None = None) -> LayerProgram:
    """Lower one integer conv2d (weights ``w8`` (Cout, Cin, KH, KW) already in the core's weight
    range) to a VTA program.  Without ``tiling`` the cycle model picks the fastest candidate.
    ``shortcut``: a second reduction run between the epilogue's two shifts (``requant`` must be an
    :class:`Epilogue` with ``shortcut=True``); ``layout``: place the activations at given DRAM buffers
    (a network's programs share one DRAM) and the constants from ``layout.base`` on."""
    spec.check(cfg)
    if (shortcut is not None) != bool(getattr(requant, "shortcut", False)):
        raise LoweringError(f"{name}: a shortcut needs an epilogue with a shortcut step, and vice versa")
    if shortcut is not None and chain.active:
        raise LoweringError(f"{name}: cross-layer weight prefetch is not implemented for layers with a shortcut")
    # the schedule depends on the shapes and the kinds of ALU ops, not on the weight or shift values
    plain = (spec, cfg, tuple(op for op, imm in requant.ops()), requant.tensor_ops(),
             None if shortcut is None else shortcut.key)
    sig = plain + (chain.key,)
    if tiling is None and sig in _BEST_TILING:
        return lower_conv(spec, w8, requant, cfg, _BEST_TILING[sig], name, chain, shortcut, layout)
    if tiling is None:
        from tvm_lowbit.vta.cycles import estimate

        if chain.active and plain in _RANKED and not chain.uops_preloaded:  # try the best tilings without the chain
            # (with its micro-ops preloaded, tilings with many kernels cost this program nothing more: try all)
            cands = _RANKED[plain]
        else:
            cands = tile_candidates(spec, cfg, requant, shortcut=shortcut)
        if chain.active:
            cands = [t for t in cands if t.order in RESIDENT_ORDERS]
        if not cands:
            t = Tiling(spec.oh, spec.ow, 1, 1)
            raise LoweringError(f"{name}: no tiling of {spec} fits this VTA configuration "
                                f"({fits(spec, t, cfg, requant, shortcut)}); run the layer on the host")
        scored = []
        for t in cands:
            lp = lower_conv(spec, w8, requant, cfg, t, name, chain, shortcut, layout)
            scored.append((estimate(lp.program).total_cycles, len(scored), lp))
        scored.sort(key=lambda c: c[:2])
        if not chain.active:
            _RANKED[plain] = [c[2].tiling for c in scored[:RANKED_KEEP]]
        _BEST_TILING[sig] = scored[0][2].tiling
        return scored[0][2]
    why = fits(spec, tiling, cfg, requant, shortcut)
    if why is None and chain.active:
        why = _chain_fits(spec, tiling, cfg, chain)
    if why is not None:
        raise LoweringError(f"{name}: tiling {tiling} does not fit: {why}")
    try:
        try:
            return _emit_conv(spec, w8, requant, cfg, tiling, name, preload_uops=True, chain=chain,
                              shortcut=shortcut, layout=layout)
        except ProgramError:  # the kernels do not all fit the uop buffer: load them on demand
            if chain.uops_preloaded or chain.next_uops is not None or chain.uop_base:
                raise
            return _emit_conv(spec, w8, requant, cfg, tiling, name, preload_uops=False, chain=chain,
                              shortcut=shortcut, layout=layout)
    except (ProgramError, isa.ISAError) as e:
        raise LoweringError(f"{name}: {e}") from e


def _chain_fits(spec: ConvSpec, t: Tiling, cfg: VTAConfig, chain: WeightChain) -> str | None:
    if t.order not in RESIDENT_ORDERS:
        return "weight prefetch across layers needs the whole-layer-on-chip schedule"
    own = spec.cob * spec.cib * spec.kh * spec.kw
    if chain.base + own > cfg.wgt_depth:
        return "the weights do not fit the weight buffer above the chain's base"
    if chain.next_blocks is not None:
        nxt = len(chain.next_blocks)
        if chain.next_base + nxt > cfg.wgt_depth or (chain.next_base < chain.base + own and chain.base < chain.next_base + nxt):
            return "the next layer's weights would overwrite this layer's"
    return None


def _emit_conv(spec: ConvSpec, w8: np.ndarray, requant: Requant | Epilogue, cfg: VTAConfig, t: Tiling,
               name: str, preload_uops: bool, chain: WeightChain = NO_CHAIN, shortcut: Shortcut | None = None,
               layout: DramLayout | None = None) -> LayerProgram:
    b = ProgramBuilder(cfg, preload_uops, chain.uop_base, chain.uops_preloaded,
                       dram_base=layout.base if layout else 0, external=layout.buffers if layout else None)
    blocks = pack_weight_blocks(w8, spec)
    wbuf = b.constant("wgt", encode_weights(blocks, cfg), cfg.wgt_elem_bytes)
    ibuf = b.alloc("inp", spec.n * spec.cib * spec.hd * spec.wd * 16, cfg.inp_elem_bytes)
    obuf = b.alloc("out", spec.n * spec.cob * spec.oh * spec.ow * 16, cfg.out_elem_bytes)
    taps = spec.kh * spec.kw
    sh, sw = spec.stride
    ph, pw = (0, 0) if spec.pre_padded else spec.pad
    row_step = _row_step(spec)
    src_row = 1 if spec.kh == 1 else sh          # input-tile rows per output row
    sc_blocks = 0 if shortcut is None else shortcut.spec.cob * shortcut.spec.cib
    resident = spec.cob * spec.cib * taps + sc_blocks <= cfg.wgt_depth
    inp_half, acc_half, wgt_half = cfg.inp_depth // 2, acc_half_rows(spec, cfg, requant), cfg.wgt_depth // 2
    alu_ops = requant.ops()
    shift_row0 = const_rows(requant, spec.cob, cfg)
    for op, row0 in shift_row0.items():  # per-lane constants (shifts, biases): one accumulator row per output block
        lanes = np.zeros(spec.cob * 16, np.int64)
        lanes[:spec.cout] = requant.lane_values(op, spec.cout)
        if lanes.min() < -(1 << 31) or lanes.max() >= 1 << 31:
            raise ProgramError(f"{name}: a per-lane constant does not fit int32")
        cbuf = b.constant("bias" if op == isa.ALU_ADD else "shift", lanes.astype("<i4"), cfg.acc_elem_bytes)
        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_ACC, row0, cbuf.base, 1, spec.cob, spec.cob))
    sc_state = None
    if shortcut is not None:
        ss = shortcut.spec
        sbuf = b.alloc("inp2", ss.n * ss.cib * ss.hd * ss.wd * 16, cfg.inp_elem_bytes)
        swbuf = b.constant("wgt_sc", encode_weights(shortcut.blocks(), cfg), cfg.wgt_elem_bytes)
        sc_state = {"sc": shortcut, "ibase": sbuf.base, "wbase": swbuf.base, "slots": {}, "loaded": set(),
                    "top": spec.cob * spec.cib * taps, "resident": resident, "wgt_half": wgt_half, "inp_half": inp_half}

    # weight slots: one dense (tco x tci x KH x KW) block rectangle per (co tile, ci chunk); resident slots
    # are loaded the first time a chunk needs them (streaming with the first tile), else reloaded per chunk
    # into two alternating halves
    slots: dict[tuple[int, int], int] = {}
    loaded: set[tuple[int, int]] = set()
    top = 0
    for c0 in range(0, spec.cob, t.tco):
        for i0 in range(0, spec.cib, t.tci):
            slots[(c0, i0)] = top
            top += min(t.tco, spec.cob - c0) * min(t.tci, spec.cib - i0) * taps
    if t.order in RESIDENT_ORDERS:
        if sc_state is not None:  # the shortcut's input above the layer's image, its weights at the top
            hs, ws, _ = _image(spec)
            ss = shortcut.spec
            sc_state.update(inp0=spec.n * spec.cib * hs * ws, w0=cfg.wgt_depth - ss.cob * ss.cib, loaded=False)
        _emit_resident(b, spec, t, wbuf.base, ibuf.base, obuf.base, alu_ops, shift_row0, ph, pw, chain, sc_state)
        notes: dict[str, object] = {"layer": name}
        if chain.next_blocks is not None:
            nb = b.constant("wgt_next", encode_weights(chain.next_blocks, cfg), cfg.wgt_elem_bytes)
            n = len(chain.next_blocks)
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, chain.next_base, nb.base, 1, n, n))
            notes["prefetches_wgt"] = (chain.next_base, n)
        if chain.next_uops is not None:
            own = (chain.uop_base, chain.uop_base + len(b.uops.image))
            nxt = (chain.next_uop_base, chain.next_uop_base + len(chain.next_uops))
            if nxt[1] > cfg.uop_depth or (nxt[0] < own[1] and own[0] < nxt[1]):
                raise ProgramError(f"the next layer's micro-ops {nxt} would overwrite this layer's {own} "
                                   f"or leave the {cfg.uop_depth}-entry uop buffer")
            ub = b.constant("uop_next", np.asarray(chain.next_uops, "<u4"), 4)
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_UOP, chain.next_uop_base, ub.base, 1, len(chain.next_uops),
                           len(chain.next_uops)))
            notes["prefetches_uop"] = nxt
        if chain.preloaded:  # what the simulator checks the weight SRAM holds before it runs the program
            notes["preloaded_wgt"] = (chain.base, blocks.astype(np.int8))
        prog = b.finish(notes)
        info = {"gemm_uops": spec.gemm_uops(), "weights_resident": True, "weight_bytes": len(prog.constants["wgt"]),
                "bands": band_rows(spec.oh, t.th, t.taper, _least_band(spec, t)),
                "weights_preloaded": chain.preloaded, "prefetches_next": chain.next_blocks is not None,
                "uops_preloaded": chain.uops_preloaded, "prefetches_next_uops": chain.next_uops is not None}
        return LayerProgram(spec, t, requant, prog, True, info)
    if t.order == "input":
        _emit_input_stationary(b, spec, t, blocks.shape[0], wbuf.base, ibuf.base, obuf.base, slots, acc_half,
                               inp_half, alu_ops, shift_row0, row_step, src_row, ph, pw)
        prog = b.finish({"layer": name})
        info = {"gemm_uops": spec.gemm_uops(), "weights_resident": True, "weight_bytes": len(prog.constants["wgt"])}
        return LayerProgram(spec, t, requant, prog, True, info)
    tile_no = chunk_no = 0
    for n in range(spec.n):
        for co0 in range(0, spec.cob, t.tco):
            tco = min(t.tco, spec.cob - co0)
            for oy0 in range(0, spec.oh, t.th):
                th = min(t.th, spec.oh - oy0)
                th_in = _in_extent(th, sh, spec.kh)
                for ox0 in range(0, spec.ow, t.tw):
                    tw = min(t.tw, spec.ow - ox0)
                    tw_in = (tw - 1) * sw + spec.kw
                    acc0 = (tile_no % 2) * acc_half
                    for ci0 in range(0, spec.cib, t.tci):
                        tci = min(t.tci, spec.cib - ci0)
                        inp0 = (chunk_no % 2) * inp_half
                        # ---- load module: input tile (+ weights) into half chunk_no % 2
                        if chunk_no >= 2:
                            b.pop("compute", "load")
                        w0 = slots[(co0, ci0)] if resident else (chunk_no % 2) * wgt_half
                        if not resident or (co0, ci0) not in loaded:
                            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, w0, wbuf.base + (co0 * spec.cib + ci0) * taps,
                                           tco, tci * taps, spec.cib * taps))
                            loaded.add((co0, ci0))
                        _load_input(b, spec, ibuf.base, n, ci0, tci, oy0 * sh, th_in, ox0 * sw, tw_in,
                                    inp0, row_step, ph, pw)
                        b.push("load", "compute")
                        # ---- compute module: reset the tile's accumulators, then the chunk's GEMMs
                        if ci0 == 0:
                            if tile_no >= 2:
                                b.pop("store", "compute")
                            r0, r1 = b.kernel([(acc0, 0, 0)])
                            b.emit(isa.Gemm(r0, r1, tco * th, tw, tw, 1, reset=True))
                        u0, u1 = b.kernel(_gemm_uops(spec, acc0, inp0, w0, tco, tci, th, tw, tw_in, src_row))
                        b.pop("load", "compute")
                        b.emit(isa.Gemm(u0, u1, tci, tw, 0, 1, th_in * tw_in, sw, taps, 0))
                        b.push("compute", "load")
                        chunk_no += 1
                    ops = alu_ops
                    if sc_state is not None:
                        k = alu_ops.index((SHORTCUT, None))
                        _alu(b, alu_ops[:k], acc0, shift_row0, co0, tco, th, tw)
                        chunk_no += _shortcut_chunks(b, sc_state, chunk_no, n, co0, tco, oy0, th, ox0, tw, acc0)
                        ops = alu_ops[k + 1:]
                    _epilogue(b, spec, ops, acc0, shift_row0, obuf.base, n, co0, tco, oy0, th, ox0, tw)
                    tile_no += 1
    prog = b.finish({"layer": name})
    info = {"tiles": tile_no, "chunks": chunk_no, "gemm_uops": spec.gemm_uops(), "weights_resident": resident,
            "weight_bytes": len(prog.constants["wgt"])}
    return LayerProgram(spec, t, requant, prog, resident, info)


def _alu(b: ProgramBuilder, alu_ops: list, acc0: int, shift_row0: dict[int, int], co0: int, tco: int, th: int,
         tw: int) -> None:
    """ALU ops on an output tile's accumulators (compute module)."""
    if alu_ops:
        a0, a1 = b.kernel([(acc0, acc0, 0)])
        for op, imm in alu_ops:
            if imm is None:  # per-lane operand (shift or bias): one micro-op per output block, reading its row
                s0, s1 = b.kernel([(acc0 + co * th * tw, shift_row0[op] + co0 + co, 0) for co in range(tco)])
                b.emit(isa.Alu(op, s0, s1, th, tw, tw, 1, 0, 0, False, 0))
            else:
                b.emit(isa.Alu(op, a0, a1, tco * th, tw, tw, 1, tw, 1, True, imm))


def _shortcut_chunks(b: ProgramBuilder, st: dict, chunk_no: int, n: int, co0: int, tco: int, oy0: int, th: int,
                     ox0: int, tw: int, acc0: int) -> int:
    """The shortcut of one output tile as more reduction chunks: per chunk the load module brings its
    input blocks (and weights) into half ``chunk_no % 2``, the compute module accumulates them into the
    tile's rows.  Returns the number of chunks."""
    sc: Shortcut = st["sc"]
    ss = sc.spec
    s0, s1 = ss.stride
    tw_in = (tw - 1) * s1 + 1
    per = _shortcut_chunk_blocks(sc, th, tw, b.cfg)
    ranges = _shortcut_ranges(sc, co0, tco, per)
    for lo, hi in ranges:
        inp0 = (chunk_no % 2) * st["inp_half"]
        if chunk_no >= 2:
            b.pop("compute", "load")
        if st["resident"]:   # the tile's whole weight rectangle, loaded once
            if co0 not in st["slots"]:
                st["slots"][co0] = st["top"]
                st["top"] += tco * ss.cib
                b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, st["slots"][co0], st["wbase"] + co0 * ss.cib, tco, ss.cib,
                               ss.cib))
            w0, wrow = st["slots"][co0] + lo, ss.cib
        else:
            w0, wrow = (chunk_no % 2) * st["wgt_half"], hi - lo
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, w0, st["wbase"] + co0 * ss.cib + lo, tco, hi - lo, ss.cib))
        _load_input(b, ss, st["ibase"], n, lo, hi - lo, oy0 * s0, th, ox0 * s1, tw_in, inp0, s0, 0, 0)
        b.push("load", "compute")
        b.pop("load", "compute")
        uops = _shortcut_uops(sc, co0, tco, th, tw, acc0, inp0, w0, lo, hi, wrow)
        _check_hazard(uops, (1, tw), (0, 1))
        u0, u1 = b.kernel(uops)
        b.emit(isa.Gemm(u0, u1, 1, tw, 0, 1, 0, s1, 0, 0))
        b.push("compute", "load")
        chunk_no += 1
    return len(ranges)


def _epilogue(b: ProgramBuilder, spec: ConvSpec, alu_ops: list, acc0: int, shift_row0: dict[int, int], out_base: int,
              n: int, co0: int, tco: int, oy0: int, th: int, ox0: int, tw: int) -> None:
    """ALU requantization of an output tile (compute module), then the store module writes it out."""
    _alu(b, alu_ops, acc0, shift_row0, co0, tco, th, tw)
    b.push("compute", "store")
    b.pop("compute", "store")
    for co in range(tco):
        base = out_base + ((n * spec.cob + co0 + co) * spec.oh + oy0) * spec.ow + ox0
        b.emit(isa.Mem(isa.OP_STORE, isa.MEM_OUT, acc0 + co * th * tw, base, th, tw, spec.ow))
    b.push("store", "compute")


def _gemm_uops(spec: ConvSpec, acc0: int, inp0: int, w0: int, tco: int, tci: int, th: int, tw: int, tw_in: int,
               src_row: int) -> list[tuple[int, int, int]]:
    taps = spec.kh * spec.kw
    uops = []
    for kh in range(spec.kh):
        for kw in range(spec.kw):
            for co in range(tco):
                for oy in range(th):
                    uops.append((acc0 + (co * th + oy) * tw, inp0 + (oy * src_row + kh) * tw_in + kw,
                                 w0 + co * tci * taps + kh * spec.kw + kw))
    return uops


def _emit_input_stationary(b: ProgramBuilder, spec: ConvSpec, t: Tiling, nblocks: int, wbase: int, ibase: int,
                           obase: int, slots: dict, acc_half: int, inp_half: int, alu_ops: list, shift_row0: int,
                           row_step: int, src_row: int, ph: int, pw: int) -> None:
    """Each input tile (all input channels) is loaded once; every output-channel tile is computed from
    it.  The weights of output-channel tile c are loaded (once) right after the first input tile, each
    with its own token, so the first GEMMs start after one slot has arrived."""
    taps = spec.kh * spec.kw
    sh, sw = spec.stride
    tile_no = stile = 0
    weights_loaded = False
    for n in range(spec.n):
        for oy0 in range(0, spec.oh, t.th):
            th = min(t.th, spec.oh - oy0)
            th_in = _in_extent(th, sh, spec.kh)
            for ox0 in range(0, spec.ow, t.tw):
                tw = min(t.tw, spec.ow - ox0)
                tw_in = (tw - 1) * sw + spec.kw
                inp0 = (stile % 2) * inp_half
                if stile >= 2:
                    b.pop("compute", "load")
                _load_input(b, spec, ibase, n, 0, spec.cib, oy0 * sh, th_in, ox0 * sw, tw_in, inp0, row_step, ph, pw)
                b.push("load", "compute")
                first = not weights_loaded
                if first:
                    for co0 in range(0, spec.cob, t.tco):
                        tco = min(t.tco, spec.cob - co0)
                        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, slots[(co0, 0)], wbase + co0 * spec.cib * taps,
                                       tco, spec.cib * taps, spec.cib * taps))
                        b.push("load", "compute")
                    weights_loaded = True
                co_tiles = list(range(0, spec.cob, t.tco))
                for j, co0 in enumerate(co_tiles):
                    tco = min(t.tco, spec.cob - co0)
                    acc0 = (tile_no % 2) * acc_half
                    if tile_no >= 2:
                        b.pop("store", "compute")
                    r0, r1 = b.kernel([(acc0, 0, 0)])
                    b.emit(isa.Gemm(r0, r1, tco * th, tw, tw, 1, reset=True))
                    u0, u1 = b.kernel(_gemm_uops(spec, acc0, inp0, slots[(co0, 0)], tco, spec.cib, th, tw, tw_in,
                                                 src_row))
                    if j == 0:
                        b.pop("load", "compute")      # the input tile
                    if first:
                        b.pop("load", "compute")      # this output tile's weights
                    b.emit(isa.Gemm(u0, u1, spec.cib, tw, 0, 1, th_in * tw_in, sw, taps, 0))
                    if j == len(co_tiles) - 1:
                        b.push("compute", "load")     # the input half is free
                    _epilogue(b, spec, alu_ops, acc0, shift_row0, obase, n, co0, tco, oy0, th, ox0, tw)
                    tile_no += 1
                stile += 1


def _column_group(spec: ConvSpec, tco: int) -> int | None:
    """Output columns a one-row band's micro-op kernel holds so an accumulator row recurs only every
    ``HAZARD_DISTANCE`` micro-ops (the smallest divisor of the width that does it), or None."""
    need = -(-HAZARD_DISTANCE // tco)
    return next((c for c in range(need, spec.ow + 1) if spec.ow % c == 0), None)


def _least_band(spec: ConvSpec, t: Tiling) -> int:
    """Fewest rows in a band: with several taps an accumulator row recurs every tco * rows micro-ops,
    unless a kernel of several columns keeps one-row bands apart (:func:`_column_group`)."""
    if spec.kh * spec.kw == 1 or _column_group(spec, t.tco) is not None:
        return 1
    return -(-HAZARD_DISTANCE // t.tco)


def _check_hazard(uops: list[tuple[int, int, int]], iters: tuple[int, int], dst_f: tuple[int, int]) -> None:
    """The pipeline-hazard rule on the unrolled micro-op sequence of one GEMM instruction."""
    o = np.arange(iters[0])[:, None, None] * dst_f[0]
    i = np.arange(iters[1])[None, :, None] * dst_f[1]
    dst = (np.asarray([u[0] for u in uops])[None, None, :] + o + i).reshape(-1)
    for d in range(1, HAZARD_DISTANCE):
        if dst.size > d and np.any(dst[d:] == dst[:-d]):
            raise ProgramError(f"accumulator row written twice within {HAZARD_DISTANCE} micro-ops (pipeline hazard)")


def _band_gemm(spec: ConvSpec, acc0: int, inp0: int, w0: int, plane: int, tco: int, tci: int, th: int, oh: int,
               src_row: int, ws: int, sw: int, wco: int = 0) -> tuple[list[tuple[int, int, int]], tuple[int, ...]]:
    """Micro-ops and loops (iter_out, iter_in, dst/src/wgt factors) of one GEMM over ``th`` output rows x
    the full width, ``tco`` output blocks and ``tci`` input blocks.  The inner loop walks the output
    columns; the outer loop walks groups of ``r`` rows, with the smallest ``r`` dividing ``th`` that keeps
    an accumulator row 3 micro-ops apart, so the kernel (input block, tap, output block, row in group)
    holds ``r`` rows instead of all ``th``: fewer micro-ops to load.  Raises ProgramError on a hazard."""
    taps = spec.kh * spec.kw
    need = 1 if taps * tci == 1 else -(-HAZARD_DISTANCE // tco)
    hw = oh * spec.ow
    wstep = wco or tci * taps
    c = _column_group(spec, tco) if th < need else None
    if c is not None:  # too few rows: the kernel holds c columns of each row, the inner loop walks column groups
        uops = [(acc0 + co * hw + x, inp0 + ci * plane + kh * ws + x * sw + kw, w0 + co * wstep + ci * taps + kh * spec.kw + kw)
                for ci in range(tci) for kh in range(spec.kh) for kw in range(spec.kw) for co in range(tco)
                for x in range(c)]
        loop = (th, spec.ow // c, spec.ow, c, src_row * ws, c * sw, 0, 0)
        _check_hazard(uops, loop[:2], loop[2:4])
        return uops, loop
    r = next((d for d in range(need, th + 1) if th % d == 0), th)
    uops = [(acc0 + co * hw + y * spec.ow, inp0 + ci * plane + (y * src_row + kh) * ws + kw,
             w0 + co * wstep + ci * taps + kh * spec.kw + kw)
            for ci in range(tci) for kh in range(spec.kh) for kw in range(spec.kw) for co in range(tco) for y in range(r)]
    loop = (th // r, spec.ow, r * spec.ow, 1, r * src_row * ws, sw, 0, 0)
    _check_hazard(uops, loop[:2], loop[2:4])
    return uops, loop


def _resident_shortcut_uops(sc: Shortcut, spec: ConvSpec, n: int, co0: int, pco: int, oy0: int, th: int,
                            start: int, inp0: int, w0: int) -> list[tuple[int, int, int]]:
    """Micro-ops of the shortcut GEMM over a resident band (inner loop: output column): the shortcut's
    input plane of (image, block) holds its rows ``oy * stride`` only, at ``inp0 + (n * cib + ci) * oh * W``."""
    ss = sc.spec
    nz = sc.nonzero()
    plane = spec.oh * ss.wd
    return [(start + co * spec.oh * spec.ow + y * spec.ow, inp0 + (n * ss.cib + ci) * plane + (oy0 + y) * ss.wd,
             w0 + (co0 + co) * ss.cib + ci)
            for ci in range(ss.cib) for co in range(pco) if nz[co0 + co, ci] for y in range(th)]


def _resident_shortcut(b: ProgramBuilder, st: dict, spec: ConvSpec, n: int, co0: int, pco: int, oy0: int, th: int,
                       start: int) -> None:
    """The shortcut GEMM of a resident band; the first one has the load module bring the whole shortcut
    input (the rows the stride reads) and its weights, after the loads already emitted."""
    sc: Shortcut = st["sc"]
    ss = sc.spec
    if not st["loaded"]:
        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, st["w0"], st["wbase"], 1, ss.cob * ss.cib, ss.cob * ss.cib))
        for p in range(ss.n * ss.cib):
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, st["inp0"] + p * spec.oh * ss.wd, st["ibase"] + p * ss.hd * ss.wd,
                           spec.oh, ss.wd, ss.wd * ss.stride[0]))
        b.push("load", "compute")
        b.pop("load", "compute")
        st["loaded"] = True
    uops = _resident_shortcut_uops(sc, spec, n, co0, pco, oy0, th, start, st["inp0"], st["w0"])
    if uops:
        _check_hazard(uops, (1, spec.ow), (0, 1))
        u0, u1 = b.kernel(uops)
        b.emit(isa.Gemm(u0, u1, 1, spec.ow, 0, 1, 0, ss.stride[1], 0, 0))


def _emit_resident(b: ProgramBuilder, spec: ConvSpec, t: Tiling, wbase: int, ibase: int, obase: int,
                   alu_ops: list, shift_row0: int, ph: int, pw: int, chain: WeightChain = NO_CHAIN,
                   sc_state: dict | None = None) -> None:
    """The whole layer stays on chip, so no buffer is ever reused and no load waits for compute (no
    write-after-read tokens).  The compute module first zeroes every accumulator row of the layer with
    one GEMM reset -- work it does while the first weights and input rows are still on the bus -- then
    runs, per output-channel tile and row band, the GEMMs of each input-channel chunk (each waits for
    one token from the load module, which brings exactly the weight blocks and input rows not loaded
    yet), the ALU requantization of the band and hands the band to the store module.  The accumulator
    rows are laid out like the DRAM output, so a band of one output-channel block is one contiguous
    STORE."""
    taps = spec.kh * spec.kw
    sh, sw = spec.stride
    hs, ws, src_row = _image(spec)
    row_step = _row_step(spec)
    plane = hs * ws
    hw = spec.oh * spec.ow
    bands = band_rows(spec.oh, t.th, t.taper, _least_band(spec, t))
    total = spec.n * spec.cob * hw
    r0, r1 = b.kernel([(0, 0, 0)])
    b.emit(isa.Gemm(r0, r1, 1, total, 0, 1, reset=True))
    slots: dict[tuple[int, int], int] = {}     # (co tile, ci chunk) -> first weight block in SRAM
    wtop = chain.base
    if chain.preloaded:  # the whole array is already there in DRAM order: block (co, ci, tap)
        slots = {(co0, ci0): chain.base + (co0 * spec.cib + ci0) * taps
                 for co0 in range(0, spec.cob, t.tco) for ci0 in range(0, spec.cib, t.tci)}
    loaded_rows = [0] * (spec.n * spec.cib)      # image rows of each (image, input block) plane on chip
    # the GEMMs in execution order: (image, co tile, band start, band rows, ci chunk); ``resident``
    # finishes one output band after the other, ``resident-ci`` runs the reduction outermost so the
    # first GEMMs need only the first input block and its weights (every band's epilogue follows its
    # last chunk)
    starts = np.cumsum([0] + bands[:-1]).tolist()
    cos, cis = range(0, spec.cob, t.tco), range(0, spec.cib, t.tci)
    if t.order == "resident-ci":
        work = [(n, co0, oy0, th, ci0) for n in range(spec.n) for ci0 in cis for co0 in cos
                for oy0, th in zip(starts, bands)]
    else:
        work = [(n, co0, oy0, th, ci0) for n in range(spec.n) for co0 in cos for oy0, th in zip(starts, bands)
                for ci0 in cis]
    last_ci = cis[-1]
    for n, co0, oy0, th, ci0 in work:
        tco = min(t.tco, spec.cob - co0)
        tci = min(t.tci, spec.cib - ci0)
        need = min(hs, (oy0 + th - 1) * src_row + spec.kh)     # image rows this band reads
        loads = False
        if (co0, ci0) not in slots:
            slots[(co0, ci0)] = wtop
            wtop += tco * tci * taps
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_WGT, slots[(co0, ci0)], wbase + (co0 * spec.cib + ci0) * taps,
                           tco, tci * taps, spec.cib * taps))
            loads = True
        for ci in range(ci0, ci0 + tci):
            p = n * spec.cib + ci
            if loaded_rows[p] < need:
                # the last real row brings the bottom padding along (no padding-only load)
                end = hs if row_step == 1 and need >= ph + spec.hd else need
                _load_rows(b, spec, ibase, n, ci, loaded_rows[p], end, p * plane, ws, row_step, ph, pw)
                loaded_rows[p] = end
                loads = True
        if loads:
            b.push("load", "compute")
            b.pop("load", "compute")
        first = ((n * spec.cob + co0) * spec.oh + oy0) * spec.ow
        uops, loop = _band_gemm(spec, first, (n * spec.cib + ci0) * plane + oy0 * src_row * ws, slots[(co0, ci0)],
                                plane, tco, tci, th, spec.oh, src_row, ws, sw,
                                spec.cib * taps if chain.preloaded else tci * taps)
        u0, u1 = b.kernel(uops)
        b.emit(isa.Gemm(u0, u1, *loop))
        if ci0 != last_ci:
            continue
        # the program's last band goes out one output block at a time, so its first STORE overlaps the
        # ALU work on the others and little is left after the compute module is done
        last = (n, co0, oy0) == work[-1][:3]
        pieces = [(co, 1) for co in range(tco)] if last else [(0, tco)]
        for c, pco in pieces:
            start = first + c * hw
            for op, imm in alu_ops:
                if op == SHORTCUT:
                    _resident_shortcut(b, sc_state, spec, n, co0 + c, pco, oy0, th, start)
                elif imm is None:  # per-lane operand (shift or bias): one micro-op per output block, reading its row
                    k0, k1 = b.kernel([(start + co * hw, shift_row0[op] + co0 + c + co, 0) for co in range(pco)])
                    b.emit(isa.Alu(op, k0, k1, 1, th * spec.ow, 0, 1, 0, 0, False, 0))
                else:
                    k0, k1 = b.kernel([(start, start, 0)])
                    b.emit(isa.Alu(op, k0, k1, pco, th * spec.ow, hw, 1, hw, 1, True, imm))
            b.push("compute", "store")
            b.pop("compute", "store")
            if th == spec.oh:  # the blocks are contiguous
                b.emit(isa.Mem(isa.OP_STORE, isa.MEM_OUT, start, obase + start, 1, pco * hw, pco * hw))
            else:
                for co in range(pco):
                    b.emit(isa.Mem(isa.OP_STORE, isa.MEM_OUT, start + co * hw, obase + start + co * hw, 1,
                                   th * spec.ow, th * spec.ow))


def _load_rows(b: ProgramBuilder, spec: ConvSpec, base: int, n: int, ci: int, y0: int, y1: int, sram0: int,
               ws: int, row_step: int, ph: int, pw: int) -> None:
    """LOAD INP of image rows [y0, y1) of one input-channel plane (zero rows/columns inserted for the
    padding the host did not write) into the plane at ``sram0``."""
    hd, wd = spec.hd, spec.wd
    dram_plane = base + (n * spec.cib + ci) * hd * wd
    if row_step > 1 or (ph == 0 and pw == 0):   # plain rows; full-width rows are contiguous in DRAM
        step = wd * row_step
        if row_step == 1:
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram0 + y0 * ws, dram_plane + y0 * wd, 1, (y1 - y0) * wd,
                           (y1 - y0) * wd))
        else:
            b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram0 + y0 * ws, dram_plane + y0 * step, y1 - y0, wd, step))
        return
    ypad0 = max(0, min(y1, ph) - y0)
    ypad1 = max(0, y1 - max(y0, ph + hd))
    real0 = max(y0, ph) - ph
    real1 = min(y1, ph + hd) - ph
    if real1 <= real0:
        raise LoweringError(f"a band of {spec} loads only padding rows")
    b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram0 + y0 * ws, dram_plane + real0 * wd, real1 - real0, wd, wd,
                   ypad0, ypad1, pw, pw))


def _load_input(b: ProgramBuilder, spec: ConvSpec, base: int, n: int, ci0: int, tci: int, y0: int, th_in: int,
                x0: int, tw_in: int, sram0: int, row_step: int, ph: int, pw: int) -> None:
    """LOAD INP of input-channel blocks [ci0, ci0 + tci) rows [y0, y0 + th_in) (padded coordinates,
    ``row_step`` DRAM rows apart) and columns [x0, x0 + tw_in) into SRAM rows from ``sram0``."""
    hd, wd = spec.hd, spec.wd
    if row_step > 1:
        ypad0 = ypad1 = 0
        yreal = y0
    else:
        ypad0 = max(0, ph - y0)
        ypad1 = max(0, y0 + th_in - (ph + hd))
        yreal = y0 + ypad0 - ph
    xpad0 = max(0, pw - x0)
    xpad1 = max(0, x0 + tw_in - (pw + wd))
    xreal = x0 + xpad0 - pw
    ysize, xsize = th_in - ypad0 - ypad1, tw_in - xpad0 - xpad1
    if ysize <= 0 or xsize <= 0:
        raise LoweringError(f"an input tile lies entirely in the padding of {spec}")
    whole = (row_step == 1 and not (ypad0 or ypad1 or xpad0 or xpad1) and ysize == hd and xsize == wd)
    if whole:  # the blocks are contiguous in DRAM: one load for all of them
        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram0, base + ((n * spec.cib + ci0) * hd) * wd,
                       tci * hd, wd, wd))
        return
    for ci in range(tci):
        dram = base + ((n * spec.cib + ci0 + ci) * hd + yreal) * wd + xreal
        b.emit(isa.Mem(isa.OP_LOAD, isa.MEM_INP, sram0 + ci * th_in * tw_in, dram, ysize, xsize,
                       wd * row_step, ypad0, ypad1, xpad0, xpad1))


def dense_spec(batch: int, k: int, m: int) -> ConvSpec:
    """A dense layer y[n, m] = sum_k x[n, k] w[m, k] as a 1x1 convolution over a 1 x batch image."""
    return ConvSpec(n=1, cin=k, h=1, w=batch, cout=m)


def run_layer(lp: LayerProgram, q: np.ndarray, *, pad_value: int = 0, seed: int | None = 0,
              sim: object | None = None) -> np.ndarray:
    """Execute a lowered conv on the functional simulator: int codes (N, C, H, W) -> int8 (N, K, OH, OW)."""
    from tvm_lowbit.vta.sim import Simulator

    prog = lp.program
    s = sim if sim is not None else Simulator(prog.cfg, seed=seed, hazard_distance=HAZARD_DISTANCE)
    dram = prog.dram_image()
    x = pack_input(q, lp.spec, pad_value)
    ib = prog.buffers["inp"]
    dram[ib.offset:ib.offset + x.nbytes] = x.view(np.uint8).reshape(-1)
    s.run(prog, dram)
    ob = prog.buffers["out"]
    return unpack_output(dram[ob.offset:ob.offset + ob.nbytes], lp.spec)

