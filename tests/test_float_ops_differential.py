"""Differential test: every float op family a user's model plausibly contains, compiled by
``tvm_lowbit.compile`` for the x86 host, against PyTorch on the same input.

Tolerance: ``max |compiled - torch| <= 1e-4 * max(1, max |torch|)`` per op. Float32 rounding differences
(a reduction summed in another order, exp/tanh approximations) stay below 1e-5 relative on these small
shapes; a miscompile (a read out of bounds, a wrong index, a wrong axis) is off by far more: the LSTM
``out[:, -1]`` this test was written for was off by 1e7..1e30.

All families are compiled as one model with one output per family (one compile, a few tens of seconds);
``python tests/test_float_ops_differential.py`` prints the table of max errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvm_lowbit
from tvm_lowbit.errors import CompileError
from tvm_lowbit.importer import import_torch
from tvm_lowbit.importer_checks import check_exported

REL_TOL = 1e-4
X_SHAPE = (2, 4, 6, 6)
# the families that are refused, and the op their error names
REFUSED = {"amax": "Unsupported function types ['amax.default']",
           "min over a dim": "Unsupported function types ['min.dim']",
           "index two dims x[:, [0, -1], [1, -2]]": "unsupported op aten.index.Tensor",
           "index two axes x[[0, 1], :, [2, -3]]": "unsupported op aten.index.Tensor"}


class Fn(nn.Module):
    def __init__(self, fn, *mods: nn.Module) -> None:  # noqa: ANN001
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.mods)


def seq(x: torch.Tensor) -> torch.Tensor:  # (2, 4, 6, 6) -> (batch 2, time 6, features 24)
    return x.permute(0, 3, 1, 2).reshape(2, 6, 24)


def families() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    lstm, gru, rnn = nn.LSTM(24, 16, batch_first=True), nn.GRU(24, 16, batch_first=True), nn.RNN(24, 8)
    return {
        "conv2d": Fn(lambda x, m: m(x), nn.Conv2d(4, 6, 3, padding=1)),
        "conv2d stride/dilation": Fn(lambda x, m: m(x), nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=2)),
        "conv2d depthwise": Fn(lambda x, m: m(x), nn.Conv2d(4, 4, 3, groups=4)),
        "conv_transpose2d": Fn(lambda x, m: m(x), nn.ConvTranspose2d(4, 3, 3, stride=2)),
        "conv1d": Fn(lambda x, m: m(x.flatten(2)), nn.Conv1d(4, 5, 3, padding=1)),
        "linear": Fn(lambda x, m: m(x.flatten(1)), nn.Linear(144, 7)),
        "matmul/bmm": Fn(lambda x: torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2))),
        "einsum": Fn(lambda x: torch.einsum("bchw,bdhw->bcd", x, x)),
        "max_pool2d": Fn(lambda x: F.max_pool2d(x, 2)),
        "max_pool2d ceil/pad": Fn(lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
        "avg_pool2d": Fn(lambda x: F.avg_pool2d(x, 3, 1, 1)),
        "adaptive_avg_pool2d": Fn(lambda x: F.adaptive_avg_pool2d(x, (3, 2))),
        "batch_norm (eval)": Fn(lambda x, m: m(x), nn.BatchNorm2d(4).eval()),
        "layer_norm": Fn(lambda x, m: m(x), nn.LayerNorm([6, 6])),
        "group_norm": Fn(lambda x, m: m(x), nn.GroupNorm(2, 4)),
        "instance_norm": Fn(lambda x: F.instance_norm(x)),
        "relu/relu6/leaky": Fn(lambda x: F.relu(x) + F.relu6(3 * x) + F.leaky_relu(x, 0.1)),
        "gelu": Fn(lambda x: F.gelu(x) + F.gelu(x, approximate="tanh")),
        "silu/hardswish/hardsigmoid": Fn(lambda x: F.silu(x) + F.hardswish(x) + F.hardsigmoid(x)),
        "sigmoid/tanh/softplus/elu": Fn(lambda x: torch.sigmoid(x) + torch.tanh(x) + F.softplus(x) + F.elu(x)),
        "prelu": Fn(lambda x, m: m(x), nn.PReLU(4)),
        "softmax/log_softmax": Fn(lambda x: F.softmax(x, dim=-1) + F.log_softmax(x, dim=1)),
        "elementwise math": Fn(lambda x: torch.sqrt(x.abs() + 1) * torch.exp(-x * x) + torch.log1p(x.abs())
                               + x.clamp(-0.5, 0.5) + torch.where(x > 0, x, -x) / (x.abs() + 1) + x ** 2),
        "reductions": Fn(lambda x: torch.cat([x.mean((2, 3)), x.sum(-1).flatten(1), x.max(1).values.flatten(1),
                                              x.var(1).flatten(1)], 1)),
        "amax": Fn(lambda x: x.amax(1)),
        "min over a dim": Fn(lambda x: x.min(-1)[0]),
        "argmax": Fn(lambda x: x.flatten(1).argmax(-1).to(torch.float32)),
        "select x[:, -1]": Fn(lambda x: x[:, -1]),
        "select x[:, 1]": Fn(lambda x: x[:, 1]),
        "select x[..., -2]": Fn(lambda x: x[..., -2]),
        "slice x[..., -3:]": Fn(lambda x: x[..., -3:]),
        "slice x[:, :, 1:-1:2]": Fn(lambda x: x[:, :, 1:-1:2]),
        "narrow": Fn(lambda x: x.narrow(2, 1, 3)),
        "index list x[:, [0, -1, 2]]": Fn(lambda x: x[:, [0, -1, 2]]),
        "index two dims x[:, [0, -1], [1, -2]]": Fn(lambda x: x[:, [0, -1], [1, -2]]),
        "index two axes x[[0, 1], :, [2, -3]]": Fn(lambda x: x[[0, 1], :, [2, -3]]),
        "index_select": Fn(lambda x: torch.index_select(x, 3, torch.tensor([5, 0, 2]))),
        "gather": Fn(lambda x: torch.gather(x, 3, (x.abs() * 10).long() % 6)),
        "computed index x[:, i]": Fn(lambda x: x.flatten(1)[:, (x[0, 0, 0, :2].abs() * 10).long() % 144]),
        "embedding": Fn(lambda x, m: m((x.abs() * 7).long() % 10).flatten(2), nn.Embedding(10, 3)),
        "cat/stack": Fn(lambda x: torch.cat([x, torch.stack([x[:, 0], x[:, 3]], 1)], 1)),
        "split/chunk": Fn(lambda x: torch.cat([a * (i + 1) for i, a in enumerate(x.chunk(2, dim=1))], 1)
                          + torch.cat(x.split([1, 5], dim=2)[::-1], 2)),
        "reshape/permute/transpose": Fn(lambda x: x.reshape(2, 12, 12).permute(2, 0, 1).transpose(0, 2) + 0),
        "squeeze/unsqueeze/expand": Fn(lambda x: x.mean(1, keepdim=True).expand(2, 3, 6, 6).unsqueeze(0).squeeze(0)),
        "repeat/flip": Fn(lambda x: x.repeat(1, 2, 1, 1).flip(-1)),
        "interpolate nearest": Fn(lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
        "interpolate bilinear": Fn(lambda x: F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=False)),
        "pixel_shuffle": Fn(lambda x: F.pixel_shuffle(x, 2)),
        "cumsum": Fn(lambda x: torch.cumsum(x, dim=-1)),
        "pad": Fn(lambda x: F.pad(x, (1, 2, 0, 1))),
        "lstm out[:, -1]": Fn(lambda x, m: m(seq(x))[0][:, -1], lstm),
        "lstm h_n": Fn(lambda x, m: m(seq(x))[1][0], lstm),
        "gru out[:, -1]": Fn(lambda x, m: m(seq(x))[0][:, -1], gru),
        "rnn (time-major)": Fn(lambda x, m: m(seq(x).transpose(0, 1))[0][-1], rnn),
        "multihead attention": Fn(lambda x, m: m(seq(x), seq(x), seq(x), need_weights=False)[0],
                                  nn.MultiheadAttention(24, 4, batch_first=True)),
        "scaled_dot_product_attention": Fn(lambda x: F.scaled_dot_product_attention(x, x, x)),
        "transformer encoder layer": Fn(lambda x, m: m(seq(x)),
                                        nn.TransformerEncoderLayer(24, 4, 32, dropout=0.0, batch_first=True)),
    }


class AllFamilies(nn.Module):
    def __init__(self, fams: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(fams)
        self.fams = nn.ModuleList(fams.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(f(x) for f in self.fams)


def refused(fams: dict[str, nn.Module], x: torch.Tensor) -> dict[str, str]:
    """op family -> the importer's error, for the families TVM's importer refuses (by the op's name)."""
    out = {}
    for name, f in fams.items():
        try:
            check_exported(torch.export.export(f.eval(), (x,)))  # the ops TVM converts wrongly
            import_torch(f.eval(), x)  # the ops TVM does not know
        except CompileError as e:
            out[name] = str(e)
    return out


def max_errors() -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """(op family -> (max |compiled - torch|, the allowed error), op family -> why it is refused)."""
    torch.manual_seed(1)
    x = torch.randn(*X_SHAPE)
    fams = families()
    refusals = refused(fams, x)
    model = AllFamilies({k: v for k, v in fams.items() if k not in refusals}).eval()
    with torch.no_grad():
        refs = [r.numpy() for r in model(x)]
    art = tvm_lowbit.compile(model, x.numpy())
    outs = art.run_all(x.numpy())
    assert len(outs) == len(refs)
    errs = {}
    for name, y, ref in zip(model.names, outs, refs):
        assert y.shape == ref.shape, f"{name}: shape {y.shape} != torch {ref.shape}"
        ref64 = ref.astype(np.float64)
        err = float(np.max(np.abs(y.astype(np.float64) - ref64))) if ref.size else 0.0
        errs[name] = (err if np.all(np.isfinite(y)) else float("inf"),
                      REL_TOL * max(1.0, float(np.max(np.abs(ref64))) if ref.size else 1.0))
    return errs, refusals


@pytest.fixture(scope="module")
def results() -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    return max_errors()


@pytest.mark.parametrize("name", list(families()))
def test_compiled_matches_torch_or_is_refused_by_name(results: tuple[dict, dict], name: str) -> None:
    errors, refusals = results
    if name in refusals:  # never compiled: the error names the op TVM cannot import
        assert name in REFUSED, f"{name} is refused: {refusals[name]}"
        assert REFUSED[name] in refusals[name], refusals[name]
        return
    assert name not in REFUSED, f"{name} is no longer refused: move it out of REFUSED"
    err, tol = errors[name]
    assert err <= tol, f"{name}: max |compiled - torch| = {err:.3g} > {tol:.3g}"


if __name__ == "__main__":
    errs, refs = max_errors()
    for name in families():
        if name in refs:
            print(f"| {name} | refused | | {refs[name].split(': ', 1)[-1]} |")
        else:
            err, tol = errs[name]
            print(f"| {name} | {err:.2e} | {tol:.1e} | {'ok' if err <= tol else 'WRONG'} |")


def test_compile_refuses_multi_axis_index_by_name() -> None:
    """End to end: ``tvm_lowbit.compile`` (through the importer) refuses the op by name."""
    x = torch.randn(*X_SHAPE)
    with pytest.raises(CompileError, match=r"unsupported op aten\.index\.Tensor at graph node 'index'.*2 axes"):
        tvm_lowbit.compile(Fn(lambda x: x[:, [0, -1], [1, -2]]), x.numpy())


def test_normalize_take_rewrites_what_reads_out_of_bounds() -> None:
    """The pass itself: a negative constant index becomes non-negative, a computed one uses mode "wrap",
    one out of range is refused with the op, shape and axis."""
    import tvm
    from tvm import relax

    from tvm_lowbit.passes import NormalizeTake, normalize_take

    x = relax.Var("x", relax.TensorType((2, 5, 3), "float32"))
    i = relax.Var("i", relax.TensorType((2,), "int64"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, i]):
        a = bb.emit(relax.op.take(x, relax.const(-1, "int64"), axis=1))
        b = bb.emit(relax.op.take(x, relax.const(np.array([0, -3], "int64")), axis=-1))
        c = bb.emit(relax.op.take(x, i, axis=2))
        bb.emit_func_output(relax.Tuple([a, b, c]))
    text = normalize_take(bb.get()).script()
    assert 'R.take(x, R.const(4, "int64"), axis=1, mode="fast")' in text, text
    assert 'R.take(x, i, axis=2, mode="wrap")' in text, text
    assert "mode=\"fast\"" not in text.split("R.take(x, i")[1].split("\n")[0]
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.take(x, relax.const(5, "int64"), axis=1)))
    with pytest.raises(Exception, match=r"take \(indexing\) of a tensor of shape \(2, 5, 3\) with index 5 on axis 1"):
        NormalizeTake()(bb.get())
