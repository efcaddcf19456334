"""The x86 glue kernels of branch x86-glue2, each bit for bit against the graph it replaces:

``PoolQuantize`` (``passes/pool_quantize.py``, kernel ``kernels/pool.py``): a float32 max pool and the next
layer's ``quantize_act`` in one scheduled kernel.

* The kernel against the two calls it replaces (Relax's own ``max_pool2d`` legalization and the plain
  division ``quantize_act``), both layouts, padded / unpadded / ceil-mode pools, channel counts that take
  16, 8, 4 lanes or none, signed and unsigned codes, inputs with ties at half a step and signed zeros: the
  pooled float32 bits and the codes equal.  A kernel whose scale is 1 % off must differ (the comparison can
  fail).
* Whole builds (``tvm_lowbit.compile``, x86) of a ShuffleNet-style stem (the pool feeds only a quantizer)
  and a ResNet-style one (the pool feeds a quantizer and the residual add) with the pass and with it
  replaced by the identity: the output and every layer's int32 accumulators equal, and the pass fired.
* Refusals: a quantizer without the plain-division attribute, an average pool.

``ShuffleQuantize`` (``passes/shuffle_quantize.py``, kernel ``kernels/shuffle.py``): ShuffleNet's NHWC concat +
channel shuffle + split + the next quantizer in one kernel: the graph with and without it at ShuffleNetV2's
shapes (float halves and codes), halves read twice, a quantizer without the attribute; a kernel fed its
parts in the wrong order must differ; a permutation that is no shuffle is left alone; whole builds of
ShuffleNet-style blocks with and without the pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_lowbit
import tvm_lowbit.backends.cpu as cpu
from tvm_lowbit import FGQ, kernels, quantize
from tvm_lowbit.kernels.pool import NAME
from tvm_lowbit.kernels.shuffle import NAME as SHUFFLE_NAME
from tvm_lowbit.passes.apply_kernel_schedules import apply_default_schedules
from tvm_lowbit.passes.fuse_add_quantize import ACT_QUANT_ATTR, act_quant_attrs
from tvm_lowbit.passes.pool_quantize import pool_quantize
from tvm_lowbit.passes.schedule_float_ops import build_pipeline
from tvm_lowbit.passes.shuffle_quantize import shuffle_quantize
from tvm_lowbit.targets import load_target

X86 = load_target("x86-host").tvm_target()
CONFIG = FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7)


# --- the kernel against the unfused calls ----------------------------------------------------------------

def _graph(shape: tuple[int, ...], layout: str, pool: tuple[int, int, int, bool], scale: float, bits: int,
           signed: bool, keep_pool: bool, attr: bool = True, avg: bool = False) -> tvm.IRModule:
    """``c = quantize_act(max_pool2d(x))`` (and ``p`` as a second output when ``keep_pool``), as
    ``LowerIntegerLayers`` emits the quantizer."""
    k, s, pad, ceil = pool
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    op = relax.op.nn.avg_pool2d if avg else relax.op.nn.max_pool2d
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(op(x, pool_size=(k, k), strides=(s, s), padding=(pad, pad, pad, pad),
                           ceil_mode=ceil, layout=layout))
            c = bb.emit_te(kernels.quantize_act, p, scale=scale, bits=bits, signed=signed,
                           primfunc_name_hint="quantize_act",
                           primfunc_attrs={**kernels.kernel_attrs("quantize_act"),
                                           **(act_quant_attrs(scale, bits, signed) if attr else {})})
            out = bb.emit_output(relax.Tuple([c, p]) if keep_pool else c)
        bb.emit_func_output(out)
    return bb.get()


def _vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    mod = apply_default_schedules(mod, X86)  # the kernels' own schedules, as the CPU backend builds them
    return relax.VirtualMachine(tvm.compile(mod, target=X86, relax_pipeline=build_pipeline(X86)), tvm.cpu())


def _outputs(vm: relax.VirtualMachine, x: np.ndarray) -> list[np.ndarray]:
    out = vm["main"](tvm.runtime.tensor(x))
    return [np.asarray(o.numpy()) for o in ([out] if hasattr(out, "numpy") else list(out))]


def _input(shape: tuple[int, ...], scale: float, seed: int) -> np.ndarray:
    """Values around the codes' range, many exactly at half a step (ties), signed zeros, some far out."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 40 * scale).astype(np.float32)
    ties = (np.round(rng.uniform(-140, 140, shape)) + 0.5).astype(np.float32) * np.float32(scale)
    pick = rng.uniform(size=shape)
    x = np.where(pick < 0.3, ties, x)
    x = np.where((pick > 0.9) & (pick < 0.95), np.float32(-0.0), x)
    x = np.where(pick >= 0.95, np.float32(0.0), x)
    return x.astype(np.float32)


CASES = [  # (shape, layout, (kernel, stride, pad, ceil), bits, signed)
    ((1, 18, 18, 24), "NHWC", (3, 2, 1, False), 8, False),   # ShuffleNet's stem pool: 24 channels, 8 lanes
    ((2, 16, 16, 64), "NHWC", (3, 2, 1, False), 8, True),    # ResNet's, signed codes, 16 lanes
    ((1, 15, 15, 20), "NHWC", (2, 2, 0, True), 4, False),    # ceil mode, no padding, 4 lanes, 4-bit
    ((1, 9, 9, 3), "NHWC", (3, 1, 1, False), 8, False),      # 3 channels: no vector
    ((1, 24, 14, 14), "NCHW", (3, 2, 1, False), 8, False),   # NCHW: parallel rows only
]


@pytest.mark.parametrize("keep_pool", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{c[0][-1] if c[1] == 'NHWC' else c[0][1]}" for c in CASES])
def test_kernel_is_bit_identical_to_the_two_calls(case: tuple, keep_pool: bool) -> None:
    shape, layout, pool, bits, signed = case
    scale = float(np.float32(0.0371))
    plain = _graph(shape, layout, pool, scale, bits, signed, keep_pool)
    fused, n = pool_quantize(plain)
    assert n == 1
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert any(name.startswith(NAME) for name in names) and not any(
        name.startswith("quantize_act") for name in names), names
    want_vm, got_vm = _vm(plain), _vm(fused)
    for seed in range(3):
        x = _input(shape, scale, seed)
        want, got = _outputs(want_vm, x), _outputs(got_vm, x)
        assert len(want) == len(got) == (2 if keep_pool else 1)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype and w.shape == g.shape
            assert np.array_equal(w.view(np.uint8), g.view(np.uint8)), f"seed {seed}: {np.sum(w != g)} differ"


def test_the_kernel_is_vectorized_and_parallel() -> None:
    fused, _ = pool_quantize(_graph((1, 18, 18, 24), "NHWC", (3, 2, 1, False), 0.05, 8, False, False))
    sched = apply_default_schedules(fused, X86)
    funcs = [f for gv, f in sched.functions_items() if gv.name_hint.startswith(NAME)]
    assert len(funcs) == 1
    text = funcs[0].script()
    assert "T.vectorized" in text and "T.parallel" in text
    assert "pad_temp" not in text  # the padding stage inlined into the window's reads


def test_a_wrong_scale_is_caught() -> None:
    """The fused kernel with its scale 1 % off against the unfused graph: some code must differ."""
    shape, layout, pool = (1, 18, 18, 24), "NHWC", (3, 2, 1, False)
    scale = float(np.float32(0.0371))
    plain = _graph(shape, layout, pool, scale, 8, False, False)
    wrong, n = pool_quantize(_graph(shape, layout, pool, float(np.float32(scale * 1.01)), 8, False, False))
    assert n == 1
    x = _input(shape, scale, 0)
    assert not np.array_equal(_outputs(_vm(plain), x)[0], _outputs(_vm(wrong), x)[0])


def test_refusals_leave_the_module_unchanged() -> None:
    for mod in (_graph((1, 8, 8, 16), "NHWC", (3, 2, 1, False), 0.05, 8, False, False, attr=False),
                _graph((1, 8, 8, 16), "NHWC", (3, 2, 1, False), 0.05, 8, False, False, avg=True)):
        new, n = pool_quantize(mod)
        assert n == 0
        tvm.ir.assert_structural_equal(new, mod)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _graph((1, 8, 8, 16), "NHWC", (3, 2, 1, False), 0.05, 8, False, False)
    monkeypatch.setenv("TVM_LOWBIT_POOL_QUANT", "off")
    assert pool_quantize(mod)[1] == 0
    monkeypatch.delenv("TVM_LOWBIT_POOL_QUANT")
    assert pool_quantize(mod)[1] == 1


# --- whole builds ----------------------------------------------------------------------------------------

def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class ShuffleStem(nn.Module):
    """ShuffleNetV2's stem: conv, max pool read only by the two branches' convs (one quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 24, stride=2)
        self.left = nn.Sequential(_cbr(24, 24, groups=24, relu=False), _cbr(24, 16, 1))
        self.right = _cbr(24, 16, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        return self.fc(torch.cat((self.left(x), self.right(x)), 1).mean((2, 3)))


class ResNetStem(nn.Module):
    """ResNet's stem: conv, max pool read by the first block's conv and its residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.block = nn.Sequential(_cbr(16, 16), _cbr(16, 16, relu=False))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        return self.fc(torch.relu(self.block(x) + x).mean((2, 3)))


def _quantized(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return quantize(model, CONFIG, torch.randn(32, 3, size, size), progress=False)


def _compile(q: nn.Module, x: np.ndarray, monkeypatch: pytest.MonkeyPatch, run_pass: bool,
             name: str = "pool_quantize", real: Callable[[tvm.IRModule], tuple[tvm.IRModule, int]] = pool_quantize
             ) -> tuple[list[np.ndarray], int]:
    """Run ``x`` through ``q`` compiled for the host with ``backends.cpu``'s pass ``name`` as it is, or
    replaced by the identity; returns the outputs (with every layer's accumulators) and the fusions made."""
    done: list[int] = []

    def spy(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        out, n = real(mod) if run_pass else (mod, 0)
        done.append(n)
        return out, n

    monkeypatch.setattr(cpu, name, spy)
    art = tvm_lowbit.compile(q, x, expose_acc=True)
    monkeypatch.undo()
    assert len(done) == 1, "the pass did not run in the build"
    return [np.asarray(o) for o in art.run_all(x)], done[0]


@pytest.mark.parametrize("model,size", [(ShuffleStem, 36), (ResNetStem, 16)], ids=["shufflenet", "resnet"])
def test_build_is_bit_identical_with_and_without(model: type[nn.Module], size: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    q = _quantized(model(), size)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with_pass, n = _compile(q, x, monkeypatch, True)
    assert n == 1, "the pool and its quantizer were not fused in the build"
    without, n0 = _compile(q, x, monkeypatch, False)
    assert n0 == 0
    assert len(with_pass) == len(without) > 1  # the output and the accumulators
    for g, w in zip(with_pass, without):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), np.abs(g.astype(np.float64) - w).max()


# --- ShuffleQuantize -------------------------------------------------------------------------------------

def _shuffle_graph(h: int, c: int, split: bool, scale: float = 0.05, attr: bool = True, keep_half: bool = False,
                   axes: tuple[int, ...] = (0, 1, 2, 4, 3), swap: bool = False) -> tvm.IRModule:
    """NHWCShuffle's form of a ShuffleNetV2 block end: concat of two halves, the shuffle, [split], the
    quantizer of the second half (``keep_half``: that half is also a function output)."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, h, h, c // 2), "float32"))
    b = relax.Var("b", relax.TensorType((1, h, h, c // 2), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            cat = bb.emit(relax.op.concat([b, a] if swap else [a, b], axis=3))
            r = bb.emit(relax.op.reshape(cat, (1, h, h, 2, c // 2)))
            t = bb.emit(relax.op.permute_dims(r, list(axes)))
            s = bb.emit(relax.op.reshape(t, (1, h, h, c)))
            if split:
                sp = bb.emit(relax.op.split(s, [c // 2], axis=3))
                x1, x2 = bb.emit(relax.TupleGetItem(sp, 0)), bb.emit(relax.TupleGetItem(sp, 1))
            else:
                x1, x2 = None, s
            q = bb.emit_te(kernels.quantize_act, x2, scale=scale, bits=8, signed=False,
                           primfunc_name_hint="quantize_act",
                           primfunc_attrs={**kernels.kernel_attrs("quantize_act"),
                                           **(act_quant_attrs(scale, 8, False) if attr else {})})
            outs = [o for o in (x1, q, x2 if keep_half and split else None) if o is not None]
            out = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        bb.emit_func_output(out)
    return bb.get()


def _run_two(vm: relax.VirtualMachine, xs: list[np.ndarray]) -> list[np.ndarray]:
    out = vm["main"](*(tvm.runtime.tensor(x) for x in xs))
    return [np.asarray(o.numpy()) for o in ([out] if hasattr(out, "numpy") else list(out))]


SHUFFLE_CASES = [  # (h, channels, split, attr, keep_half)
    (28, 116, True, True, False),   # ShuffleNetV2 x1.0's stage 2: float x1', codes of x2
    (7, 464, True, True, False),    # stage 4
    (14, 232, False, True, False),  # a stage's last block: the whole shuffle quantized
    (8, 24, True, True, True),      # x2 read by the quantizer and returned: float and codes
    (8, 24, True, False, False),    # a quantizer without the plain-division attribute: float pieces only
]


@pytest.mark.parametrize("case", SHUFFLE_CASES, ids=[f"{c[0]}x{c[1]}-{'split' if c[2] else 'whole'}"
                                                     f"{'-noattr' if not c[3] else ''}{'-keep' if c[4] else ''}"
                                                     for c in SHUFFLE_CASES])
def test_shuffle_kernel_is_bit_identical(case: tuple) -> None:
    h, c, split, attr, keep_half = case
    plain = _shuffle_graph(h, c, split, attr=attr, keep_half=keep_half)
    fused, n = shuffle_quantize(plain)
    assert n == 1
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert any(name.startswith(SHUFFLE_NAME) for name in names), names
    assert any(name.startswith("quantize_act") for name in names) == (not attr), names
    want_vm, got_vm = _vm(plain), _vm(fused)
    for seed in range(2):
        rng = np.random.default_rng(seed)
        xs = [_input((1, h, h, c // 2), 0.05, seed), rng.standard_normal((1, h, h, c // 2)).astype(np.float32)]
        want, got = _run_two(want_vm, xs), _run_two(got_vm, xs)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype and w.shape == g.shape
            assert np.array_equal(w.view(np.uint8), g.view(np.uint8)), f"seed {seed}: {np.sum(w != g)} differ"


def test_shuffle_kernel_with_its_parts_swapped_differs() -> None:
    """A kernel that takes the halves in the wrong order (the concat of (b, a), fused) against the plain
    graph of (a, b) on the test's inputs: the comparison must see it."""
    plain = _shuffle_graph(8, 24, True)
    wrong, n = shuffle_quantize(_shuffle_graph(8, 24, True, swap=True))
    assert n == 1
    rng = np.random.default_rng(0)
    xs = [_input((1, 8, 8, 12), 0.05, 0), rng.standard_normal((1, 8, 8, 12)).astype(np.float32)]
    want, got = _run_two(_vm(plain), xs), _run_two(_vm(wrong), xs)
    assert not any(np.array_equal(w, g) for w, g in zip(want, got))


def test_a_permutation_that_is_no_shuffle_is_left_alone() -> None:
    mod = _shuffle_graph(8, 24, True, axes=(0, 2, 1, 3, 4))
    new, n = shuffle_quantize(mod)
    assert n == 0
    tvm.ir.assert_structural_equal(new, mod)


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlocks(nn.Module):
    """ShuffleNetV2's blocks: a stride-2 block (two branches, concat, shuffle), two stride-1 blocks (chunk,
    the right half through convs, concat with the left half, shuffle), then a head conv."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, stride=2)
        self.left = nn.Sequential(_cbr(16, 16, groups=16, relu=False), _cbr(16, c // 2, 1))
        self.right = nn.Sequential(_cbr(16, c // 2, 1), _cbr(c // 2, c // 2, groups=c // 2, relu=False),
                                   _cbr(c // 2, c // 2, 1))
        self.blocks = nn.ModuleList(nn.Sequential(_cbr(c // 2, c // 2, 1),
                                                  _cbr(c // 2, c // 2, groups=c // 2, relu=False),
                                                  _cbr(c // 2, c // 2, 1)) for _ in range(2))
        self.head = _cbr(c, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = _shuffle(torch.cat((self.left(x), self.right(x)), 1))
        for block in self.blocks:
            x1, x2 = x.chunk(2, dim=1)
            x = _shuffle(torch.cat((x1, block(x2)), 1))
        return self.fc(self.head(x).mean((2, 3)))


def test_shuffle_build_is_bit_identical_with_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    q = _quantized(ShuffleBlocks(), 32, seed=1)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with_pass, n = _compile(q, x, monkeypatch, True, "shuffle_quantize", shuffle_quantize)
    assert n == 3, "the three shuffles were not fused in the build"
    without, n0 = _compile(q, x, monkeypatch, False, "shuffle_quantize", shuffle_quantize)
    assert n0 == 0
    assert len(with_pass) == len(without) > 1
    for g, w in zip(with_pass, without):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), np.abs(g.astype(np.float64) - w).max()
