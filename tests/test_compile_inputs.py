"""``compile``, ``save_quantized`` and the artifact take what the model's ``forward`` takes: a tensor of any
dtype, a tuple (positional inputs) or a dict (keyword inputs such as ``input_ids`` / ``attention_mask``);
mismatched input names, counts and dtypes are one-line errors naming the inputs (issue 16 item 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.artifact import Artifact, load_artifact
from tvm_lowbit.compiler import compile_saved, save_quantized
from tvm_lowbit.quantizers.layers import quant_layers


class TokenEncoder(nn.Module):
    """Token ids and an attention mask (int64) -> masked mean of two linear layers (a tiny BERT stand-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
        m = attention_mask[:, :, None].to(y.dtype)
        return (y * m).sum(1) / m.sum(1).clamp(min=1.0)


@pytest.fixture(scope="module")
def token_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (32, 6), generator=g)
    mask = torch.ones(32, 6, dtype=torch.int64)
    mask[::2, 4:] = 0
    torch.manual_seed(0)
    cfg = tvm_lowbit.FGQ(group_size=4, first_layer="fgq", last_layer="int8")
    q = tvm_lowbit.quantize(TokenEncoder().eval(), cfg, {"input_ids": ids, "attention_mask": mask}, progress=False)
    assert set(quant_layers(q)) == {"fc1", "fc2"}
    return q, ids, mask


@pytest.fixture(scope="module")
def dict_art(token_model) -> Artifact:
    """The token model compiled for x86 from a dict example input (4 rows)."""
    q, ids, mask = token_model
    return tvm_lowbit.compile(q, {"input_ids": ids[:4], "attention_mask": mask[:4]}, "x86-host")


def _want(q: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return q(ids, mask).numpy()


def test_dict_example_input_compiles_and_runs_by_name_and_order(token_model, dict_art: Artifact,
                                                                tmp_path: Path) -> None:
    q, ids, mask = token_model
    art = dict_art
    assert [(s.name, s.shape, s.dtype) for s in art.inputs] == [("input_ids", (4, 6), "int64"),
                                                              ("attention_mask", (4, 6), "int64")]
    assert sorted(art.report.lowered) == ["fc1", "fc2"] and not art.report.fallback
    feed = {"attention_mask": mask[4:8].numpy(), "input_ids": ids[4:8].numpy()}  # any key order
    want = _want(q, ids[4:8], mask[4:8])
    np.testing.assert_allclose(art.run(feed), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(art.run((ids[4:8].numpy(), mask[4:8].numpy())), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(art.run((ids[4:8].int().numpy(), mask[4:8].numpy())), want, rtol=0, atol=1e-6)
    assert art.median_ms(feed, repeat=2) > 0
    # the export keeps the input table; the loaded artifact checks the same way
    back = load_artifact(art.export(tmp_path / "art"))
    assert back.inputs == art.inputs
    np.testing.assert_allclose(back.run(feed), want, rtol=0, atol=1e-6)


def test_tuple_example_input_compiles(token_model) -> None:
    q, ids, mask = token_model
    art = tvm_lowbit.compile(q, (ids[:4], mask[:4]), "x86-host")
    np.testing.assert_allclose(art.run((ids[:4].numpy(), mask[:4].numpy())), _want(q, ids[:4], mask[:4]),
                               rtol=0, atol=1e-6)


def test_mismatched_inputs_are_one_line_errors(token_model, dict_art: Artifact) -> None:
    q, ids, mask = token_model
    art = dict_art
    i, m = ids[:4].numpy(), mask[:4].numpy()
    cases = [({"ids": i, "attention_mask": m}, r"input names \['attention_mask', 'ids'\] do not match .*input_ids"),
             ({"input_ids": i.astype(np.float32), "attention_mask": m},
              r"input 'input_ids': dtype float32 does not match the compiled int64"),
             (i, r"one array given, the model takes 2 inputs \(input_ids \[4, 6\] int64, attention_mask"),
             ((i,), r"1 inputs given, the model takes 2"),
             ({"input_ids": i[:2], "attention_mask": m}, r"input 'input_ids': shape \(2, 6\) does not match")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            art.run(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(tvm_lowbit.compiler.CompileError, match=r"torch.export failed .*\{ids: \(4, 6\) int64"):
        tvm_lowbit.compile(q, {"ids": ids[:4], "attention_mask": mask[:4]}, "x86-host")


def test_single_float_input_keeps_its_behaviour() -> None:
    lin = nn.Sequential(nn.Linear(8, 4)).eval()
    x = np.random.default_rng(0).standard_normal((2, 8))  # float64: compiled as float32, as before
    art = tvm_lowbit.compile(lin, x, "x86-host")
    assert art.input_dtype == "float32" and art.input_shape == (2, 8) and art.inputs == ()
    with torch.no_grad():
        want = lin(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(art.run(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_save_quantized_dict_input_and_rasp5_build(token_model, tmp_path: Path) -> None:
    q, ids, mask = token_model
    path = save_quantized(q, {"input_ids": ids[:4], "attention_mask": mask[:4]}, tmp_path / "tok.pt2")
    art = compile_saved(path, "x86-host")
    assert [s.name for s in art.inputs] == ["input_ids", "attention_mask"]
    assert sorted(art.report.lowered) == ["fc1", "fc2"]
    np.testing.assert_allclose(art.run({"input_ids": ids[:4].numpy(), "attention_mask": mask[:4].numpy()}),
                               _want(q, ids[:4], mask[:4]), rtol=0, atol=1e-6)
    pi = tvm_lowbit.compile(q, {"input_ids": ids[:4], "attention_mask": mask[:4]}, "rasp5")  # build only
    assert [s.dtype for s in pi.inputs] == ["int64", "int64"] and sorted(pi.report.lowered) == ["fc1", "fc2"]
