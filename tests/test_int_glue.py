"""The float glue between integer kernels, made cheaper and kept exact: ``FuseAddQuantize`` (residual add
[+ ReLU] and the next ``quantize_act`` in one loop, x86) and ``NHWCShuffle`` (ShuffleNet's concat / channel
shuffle / split in NHWC).

Every model is compiled with and without the pass (the pass replaced by the identity in
``backends.cpu``): outputs and every layer's int32 accumulators (``expose_acc``) must be equal bit for bit,
and the outputs must equal the fake-quant model's.  The refusals (a broadcast add, an add with another user,
a quantizer without the plain-division form, a reshape that is no channel shuffle) are tested, and a fused
loop with a scale 1 % off is shown to change the output, so the bit-for-bit comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_lowbit
import tvm_lowbit.backends.cpu as cpu
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.artifact import Artifact
from tvm_lowbit.importer import import_torch, layer_infos
from tvm_lowbit.passes.fuse_add_quantize import ACT_QUANT_ATTR, fuse_add_quantize
from tvm_lowbit.passes.lower_integer_layers import lower_integer_layers
from tvm_lowbit.passes.nhwc_shuffle import nhwc_shuffle
from tvm_lowbit.passes.schedule_float_ops import build_pipeline
from tvm_lowbit.targets import load_target

X86 = load_target("x86-host").tvm_target()
CONFIG = FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq", alpha_bits=7)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class ResidualNet(nn.Module):
    """ResNet's glue (stem, max pool, two basic blocks: add + ReLU feeding the next block's conv and its
    residual) and MobileNetV2's (an add without ReLU before a conv), plus a broadcast add (a bias vector)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.b1, self.b2 = nn.Sequential(_cbr(16, 16), _cbr(16, 16, relu=False)), \
            nn.Sequential(_cbr(16, 16), _cbr(16, 16, relu=False))
        self.mb = _cbr(16, 16, 1, relu=False)
        self.head = _cbr(16, 32, 1)
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, 32).reshape(1, 32, 1, 1))
        self.tail = _cbr(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        x = torch.relu(self.b1(x) + x)
        x = torch.relu(self.b2(x) + x)
        x = self.mb(x) + x                       # no ReLU (MobileNetV2)
        x = self.tail(self.head(x) + self.shift)  # a broadcast add: not fused
        return self.fc(x.mean((2, 3)))


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNet(nn.Module):
    """ShuffleNetV2's glue: a stride-2 block (two branches, concat, shuffle), then stride-1 blocks (chunk,
    the right half through convs, concat with the left half, shuffle), with channel counts that are no
    multiple of 16."""

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
        x = nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        x = _shuffle(torch.cat((self.left(x), self.right(x)), 1))
        for block in self.blocks:
            x1, x2 = x.chunk(2, dim=1)
            x = _shuffle(torch.cat((x1, block(x2)), 1))
        return self.fc(self.head(x).mean((2, 3)))


def _quantized(model: nn.Module, size: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return quantize(model, CONFIG, torch.randn(32, 3, size, size), progress=False)


def _compile(q: nn.Module, x: np.ndarray, monkeypatch: pytest.MonkeyPatch, name: str, run_pass: bool
             ) -> tuple[Artifact, int]:
    """Compile with ``backends.cpu``'s pass ``name`` as it is, or replaced by the identity; returns the artifact
    and how many rewrites the pass made in the build."""
    real = getattr(cpu, name)
    done: list[int] = []

    def spy(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        out, n = real(mod) if run_pass else (mod, 0)
        done.append(n)
        return out, n

    monkeypatch.setattr(cpu, name, spy)
    art = tvm_lowbit.compile(q, x, expose_acc=True)
    monkeypatch.undo()
    assert len(done) == 1, "the pass did not run in the build"
    return art, done[0]


def _run_all(art: Artifact, x: np.ndarray) -> list[np.ndarray]:
    outs = art.run_all(x)  # the logits and every layer's accumulators (expose_acc)
    assert len(outs) > 1, "the build exposes no accumulators: the comparison would check the logits only"
    return [np.asarray(o) for o in outs]


def _assert_same_bits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), np.abs(g.astype(np.float64) - w).max()


def _lowered(q: nn.Module, x: np.ndarray, target: tvm.target.Target = X86) -> tvm.IRModule:
    mod, _ = lower_integer_layers(import_torch(q, torch.from_numpy(x)), layer_infos(q), target=target)
    return mod


def _calls(mod: tvm.IRModule, name: str) -> int:
    n = 0

    def visit(e: relax.Expr) -> None:
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name:
            n += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return n


def _broadcast_adds(mod: tvm.IRModule) -> int:
    """``relax.add`` calls whose two operands differ in shape."""
    n = 0

    def visit(e: relax.Expr) -> None:
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.add":
            a, b = (tuple(int(d) for d in x.ty.shape) for x in e.args)
            n += a != b

    relax.analysis.post_order_visit(mod["main"], visit)
    return n


# --- FuseAddQuantize -----------------------------------------------------------------------------------

def test_fused_add_quantize_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = 0
    q = _quantized(ResidualNet(), seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32)
    mod, fused = fuse_add_quantize(_lowered(q, x))
    assert fused == 3  # the two add + ReLU blocks and MobileNetV2's add; not the broadcast add
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sum(n.startswith("add_quantize") for n in names) == 3, names
    art, n = _compile(q, x, monkeypatch, "fuse_add_quantize", True)
    assert n == 3  # in the build too (before the tuned database's legalization)
    with_pass = _run_all(art, x)
    without = _run_all(_compile(q, x, monkeypatch, "fuse_add_quantize", False)[0], x)
    _assert_same_bits(with_pass, without)  # the output and every layer's accumulators
    with torch.no_grad():
        np.testing.assert_array_equal(with_pass[0], q(torch.from_numpy(x)).numpy())


def _build(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(mod, target=X86, relax_pipeline=build_pipeline(X86)), tvm.cpu())


def test_fused_loop_codes_on_many_inputs_and_a_wrong_scale_is_caught() -> None:
    """The fused module against the unfused one on several inputs; a fused loop whose scale is 1 % off (a
    wrong rewrite) must change the output (the comparison can fail)."""
    q = _quantized(ResidualNet())
    x0 = np.zeros((1, 3, 16, 16), np.float32)
    lowered = _lowered(q, x0)
    fused, n = fuse_add_quantize(lowered)
    assert n == 3
    off = lowered
    for gv, f in lowered.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and ACT_QUANT_ATTR in f.attrs:
            s, bits, signed = f.attrs[ACT_QUANT_ATTR]
            off = off.copy() if hasattr(off, "copy") else off
            off[gv] = f.with_attr(ACT_QUANT_ATTR, [float(np.float32(float(s) * 1.01)), bits, signed])
    wrong, _ = fuse_add_quantize(off)
    plain_vm, fused_vm, wrong_vm = _build(lowered), _build(fused), _build(wrong)
    rng = np.random.default_rng(3)
    differs = False
    for _ in range(4):
        x = tvm.runtime.tensor(3 * rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
        want, got, bad = (np.asarray(vm["main"](x)[0].numpy()) for vm in (plain_vm, fused_vm, wrong_vm))
        assert np.array_equal(want.view(np.uint32), got.view(np.uint32))
        differs |= not np.array_equal(want, bad)
    assert differs, "a scale 1 % off went unnoticed: the comparison cannot fail"


def test_refusals_leave_the_module_unchanged() -> None:
    q = _quantized(ResidualNet())
    x = np.zeros((1, 3, 16, 16), np.float32)
    lowered = _lowered(q, x)
    # the plain-division attribute is what the pass reads: without it (aarch64's reciprocal form) no fusion
    stripped = lowered.copy() if hasattr(lowered, "copy") else lowered
    for gv, f in lowered.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and ACT_QUANT_ATTR in f.attrs:
            stripped[gv] = f.without_attr(ACT_QUANT_ATTR)
    assert fuse_add_quantize(stripped)[1] == 0
    # the broadcast add (head + shift) keeps its add and its own quantize_act
    mod, _ = fuse_add_quantize(lowered)
    assert _broadcast_adds(lowered) == _broadcast_adds(mod) == 1


def test_an_add_with_another_user_is_not_fused() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = _cbr(3, 16), _cbr(16, 16, relu=False), _cbr(16, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            s = self.b(x) + x
            return self.fc((self.c(torch.relu(s)) + s).mean((2, 3)))  # s read by the ReLU and the last add

    q = _quantized(TwoUsers())
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    lowered = _lowered(q, x)
    mod, fused = fuse_add_quantize(lowered)
    assert fused == 0
    tvm.ir.assert_structural_equal(mod, lowered)


# --- NHWCShuffle ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["x86-host", "rasp5"])
def test_shuffle_runs_in_nhwc_after_lowering(target: str) -> None:
    q = _quantized(ShuffleNet(), size=32)
    x = np.zeros((1, 3, 32, 32), np.float32)
    lowered = _lowered(q, x, load_target(target).tvm_target())
    mod, removed = nhwc_shuffle(lowered)
    assert removed == 3, removed  # the transposes back to NHWC before each block's conv and the head
    assert _calls(mod, "relax.permute_dims") <= _calls(lowered, "relax.permute_dims") - 3
    assert _calls(mod, "relax.concat") == _calls(lowered, "relax.concat") == 3


def test_nhwc_shuffle_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = 1
    q = _quantized(ShuffleNet(), size=32, seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
    art, n = _compile(q, x, monkeypatch, "nhwc_shuffle", True)
    assert n == 3
    with_pass = _run_all(art, x)
    without = _run_all(_compile(q, x, monkeypatch, "nhwc_shuffle", False)[0], x)
    _assert_same_bits(with_pass, without)
    with torch.no_grad():
        np.testing.assert_allclose(with_pass[0], q(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_a_permute_that_is_no_channel_shuffle_is_left_alone() -> None:
    """``reshape(n, g, c/g, h, w)`` followed by a swap of h and w (not the shuffle's swap of g and c/g)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            r = bb.emit(relax.op.reshape(t, (1, 2, 4, 4, 4)))
            p = bb.emit(relax.op.permute_dims(r, [0, 1, 2, 4, 3]))
            s = bb.emit(relax.op.reshape(p, (1, 8, 4, 4)))
            out = bb.emit_output(relax.op.permute_dims(s, [0, 2, 3, 1]))
        bb.emit_func_output(out)
    mod = bb.get()
    new, removed = nhwc_shuffle(mod)
    assert removed == 0
    tvm.ir.assert_structural_equal(new, mod)
    data = np.arange(128, dtype=np.float32).reshape(1, 4, 4, 8)
    got = _build(new)["main"](tvm.runtime.tensor(data)).numpy()
    want = data.transpose(0, 3, 1, 2).reshape(1, 2, 4, 4, 4).transpose(0, 1, 2, 4, 3).reshape(1, 8, 4, 4)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
