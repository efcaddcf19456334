"""tvm_lowbit.profile: per-function CPU/wall time of a compiled model's VM calls."""

from __future__ import annotations

import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize
from tvm_lowbit.profile import base_name, profile_calls, profile_table


def test_base_name_groups_instances() -> None:
    assert base_name("ternary_conv2d_vnni12") == "ternary_conv2d_vnni"
    assert base_name("fused_add_relu") == "fused_add_relu"
    assert base_name("max_pool2d_1") == "max_pool2d"
    assert base_name("fused_tir_negative5_tir_exp5_add5_divide") == "fused_tir_negative_tir_exp_add_divide"


def test_profile_names_the_kernels_and_counts_every_call() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 4)).eval()
    q = quantize(model, FGQ(group_size=4, act_bits=8, first_layer="fgq", last_layer="fgq"),
                 torch.randn(16, 8, 8, 8), progress=False)
    x = torch.randn(1, 8, 8, 8).numpy()
    art = tvm_lowbit.compile(q, x)
    rows = profile_calls(art.executable, [x], runs=3, warmup=1)
    names = {r.name for r in rows}
    kernels = {base_name(k) for k in art.report.kernel_names.values()}
    # every lowered kernel is called (by its PrimFunc name) and timed
    assert kernels and all(any(n.startswith(k) for n in names) for k in kernels), (kernels, names)
    assert sum(r.calls for r in rows if any(r.name.startswith(k) for k in kernels)) == len(art.report.lowered)
    assert all(r.cpu_ms >= 0 and r.wall_ms >= 0 for r in rows)
    assert [r.cpu_ms for r in rows] == sorted((r.cpu_ms for r in rows), reverse=True)
    assert "sum" in profile_table(rows).splitlines()[-1]
