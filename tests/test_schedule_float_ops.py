"""ScheduleFloatOps: the float ops between kernels parallel and vectorized, with bit-identical results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from tvm_lowbit.importer import import_torch
from tvm_lowbit.passes.schedule_float_ops import SCHEDULED_ATTR, build_pipeline

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})


class FloatGlue(nn.Module):
    """The float ops of the zoo models: max pool, residual add + ReLU, a squeeze-excitation gate, layer norm,
    softmax, GELU and an attention matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.max_pool2d(x, 3, 2, 1)                        # [1, 32, 16, 16]
        y = torch.relu(p + p.flip(-1))
        gate = torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = y * gate + nn.functional.hardswish(y)
        t = y.flatten(2).transpose(1, 2)                                # [1, 256, 32] tokens
        t = self.norm(nn.functional.gelu(t))
        att = torch.softmax(t @ t.transpose(1, 2) / 5.0, dim=-1)
        return att @ t


def _build(mod: tvm.IRModule, scheduled: bool) -> relax.VirtualMachine:
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=build_pipeline(TARGET) if scheduled else "default")
    return relax.VirtualMachine(ex, tvm.cpu())


@pytest.mark.parametrize("seed", [0, 1])
def test_scheduled_float_ops_are_bit_identical(seed: int) -> None:
    torch.manual_seed(seed)
    model = FloatGlue().eval()
    x = torch.randn(1, 32, 32, 32)
    mod = import_torch(model, x)
    plain = _build(mod, False)["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    fast = _build(mod, True)["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    assert np.array_equal(plain.view(np.uint32), fast.view(np.uint32)), np.abs(plain - fast).max()
    with torch.no_grad():
        np.testing.assert_allclose(fast, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_the_float_ops_get_parallel_and_vector_loops() -> None:
    model = FloatGlue().eval()
    x = torch.randn(1, 32, 32, 32)
    mod = import_torch(model, x)
    seen: dict[str, tvm.tirx.PrimFunc] = {}

    @tvm.transform.module_pass(opt_level=0)
    def grab(m: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        seen.update({gv.name_hint: f for gv, f in m.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})
        return m

    tvm.compile(mod, target=TARGET, relax_pipeline=tvm.transform.Sequential([build_pipeline(TARGET), grab]))
    done = {n: f for n, f in seen.items() if f.attrs and SCHEDULED_ATTR in f.attrs}
    assert any("max_pool" in n for n in done), sorted(seen)
    text = "\n".join(f.script() for f in done.values())
    assert "T.parallel" in text and "T.vectorized" in text
