"""Schemes as a registry with versioned configs: quantize() dispatches on the config's type, every config
writes a dict that reads back into an equal object, also out of a saved .pt2."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.quantizers import (FGQ, INQ, Auto, SchemeConfig, config_from_dict, register_scheme, registered_configs,
                                   registered_schemes, unregister_scheme)
from tvm_lowbit.quantizers.auto import build_mixed
from tvm_lowbit.quantizers.pact import PACT
from tvm_lowbit.quantizers.sq import SQ

CONFIGS = [
    FGQ(),
    FGQ(group_size=16, act_bits=4, threshold="twn", overrides={"fc": "float", "layer1.*": {"act_bits": 8}}),
    Auto(),
    Auto(budget="agree>=99.5", formats=("int4", "int8", "float"), cost={"int4": 1.0, "int8": 2.0, "float": 8.0},
         overrides={"fc": ["int8", "float"]}, rounding="nearest"),
    INQ(bits=4, portions=(0.5, 1.0), overrides={"fc": {"bits": 3}}, granularity="channel"),
    SQ(inner="fgq", schedule=(0.5, 1.0)),
    PACT(act_bits=3, weight_bits=2, alpha_decay=None),
]


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mid(torch.relu(self.bn(self.conv(x)))))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(cfg: SchemeConfig) -> None:
    d = cfg.to_dict()
    assert d["scheme"] == cfg.SCHEME and d["version"] == cfg.VERSION == 1
    back = config_from_dict(json.loads(json.dumps(d)))
    assert type(back) is type(cfg) and back == cfg
    assert type(cfg).from_dict(d) == cfg


def test_registries_list_the_schemes() -> None:
    assert list(registered_schemes()) == ["fgq", "auto"]
    assert registered_configs() == {"fgq": FGQ, "auto": Auto, "inq": INQ, "sq": SQ, "pact": PACT}


def test_unreadable_configs_name_scheme_and_version() -> None:
    with pytest.raises(ValueError, match=r"fgq config is version 2; this tvm_lowbit reads fgq config version 1"):
        config_from_dict({**FGQ().to_dict(), "version": 2})
    with pytest.raises(ValueError, match="sq config has no version"):
        config_from_dict({"scheme": "sq", "inner": "twn"})
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'gptq' \(version 1\).*known: fgq, auto"):
        config_from_dict({"scheme": "gptq", "version": 1})
    with pytest.raises(ValueError, match=r"fgq config version 1: unknown field\(s\) formats"):
        config_from_dict({**FGQ().to_dict(), "formats": {}})
    with pytest.raises(ValueError, match="a 'inq' config cannot be read as FGQ"):
        FGQ.from_dict(INQ().to_dict())
    cost = lambda layer, fmt, numel, nbytes: float(nbytes)  # noqa: E731
    with pytest.raises(ValueError, match=r"auto config version 1: cost was the function .*<lambda>"):
        config_from_dict(json.loads(json.dumps(Auto(cost=cost).to_dict())))


@dataclass(frozen=True)
class KeepFloat(SchemeConfig):
    """A toy scheme: the model as it is, marked with its config."""

    SCHEME = "keep-float"
    VERSION = 1

    note: str = ""


def keep_float(model: nn.Module, config: KeepFloat, calib_data: object, val_data: object, *, inplace: bool,
               progress: bool) -> nn.Module:
    q = model if inplace else copy.deepcopy(model)
    q.tvm_lowbit_config = config.to_dict()
    return q


def test_quantize_dispatches_on_the_registered_config_type() -> None:
    model = Small().eval()
    with pytest.raises(TypeError, match="unknown quantization scheme KeepFloat; known schemes: FGQ, Auto"):
        tvm_lowbit.quantize(model, KeepFloat(), None)
    register_scheme(KeepFloat, keep_float)  # the one registration line
    try:
        q = tvm_lowbit.quantize(model, KeepFloat("hi"), None)
        assert q is not model and config_from_dict(q.tvm_lowbit_config) == KeepFloat("hi")
        assert list(registered_schemes()) == ["fgq", "auto", "keep-float"]
    finally:
        unregister_scheme(KeepFloat)
    assert "keep-float" not in registered_configs()
    with pytest.raises(TypeError, match="unknown quantization scheme INQ"):  # a training-loop config
        tvm_lowbit.quantize(model, INQ(), None)


def test_saved_model_config_reads_back(tmp_path) -> None:
    pytest.importorskip("tvm")
    from tvm_lowbit.compiler import save_quantized

    torch.manual_seed(0)
    model = Small().eval()
    calib = torch.randn(32, 3, 8, 8)
    cfg = FGQ(group_size=8, first_layer="fgq", overrides={"mid": {"act_bits": 4}}, bias_correction=False)
    auto = Auto(budget="agree>=99", formats=("int4", "ternary", "float"))
    for i, q in enumerate([tvm_lowbit.quantize(model, cfg, calib, progress=False),
                           build_mixed(model, {"conv": "int8", "mid": "ternary", "fc": "int4"}, calib, auto)]):
        path = save_quantized(q, calib[:1], tmp_path / f"q{i}.pt2")
        extra = {"tvm_lowbit.json": ""}  # the file save_quantized writes beside the program
        torch.export.load(str(path), extra_files=extra)
        saved = json.loads(extra["tvm_lowbit.json"])["config"]
        assert config_from_dict(saved) == (cfg, auto)[i]


USER_MODEL = '''
import copy
from dataclasses import dataclass

from torch import nn

from tvm_lowbit.quantizers import SchemeConfig, register_scheme, registered_schemes


@dataclass(frozen=True)
class Mark(SchemeConfig):
    SCHEME = "mark"
    VERSION = 1
    note: str = "default"


def mark(model, config, calib_data, val_data, *, inplace, progress):
    q = model if inplace else copy.deepcopy(model)
    print("mark scheme ran with note", config.note)
    return q


if "mark" not in registered_schemes():
    register_scheme(Mark, mark)


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
'''


def test_cli_runs_a_scheme_the_model_file_registers(tmp_path, capsys) -> None:
    pytest.importorskip("tvm")
    import numpy as np

    from tvm_lowbit import cli
    from tvm_lowbit.quantizers import api

    (tmp_path / "user.py").write_text(USER_MODEL)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    (tmp_path / "mark.json").write_text(json.dumps({"note": "from file"}))
    (tmp_path / "wrong.json").write_text(json.dumps(FGQ().to_dict()))
    base = ["quantize", "--model", f"{tmp_path}/user.py:make", "--calib", str(tmp_path / "calib.npy")]
    try:
        cli.main([*base, "--scheme", "mark", "--out", str(tmp_path / "a.pt2")])
        assert "mark scheme ran with note default" in capsys.readouterr().out and (tmp_path / "a.pt2").is_file()
        cli.main([*base, "--scheme", "mark", "--config", str(tmp_path / "mark.json"), "--out", str(tmp_path / "b.pt2")])
        assert "mark scheme ran with note from file" in capsys.readouterr().out
        for extra, message in [(["--scheme", "nope"], "unknown scheme 'nope': available: fgq, auto, mark, inq, sq, pact"),
                               (["--scheme", "mark", "--config", str(tmp_path / "wrong.json")],
                                "a mark config is a JSON object with \"scheme\": \"mark\" \\(got 'fgq'\\)"),
                               (["--scheme", "mark", "--config", str(tmp_path / "none.json")], "not a readable JSON")]:
            with pytest.raises(SystemExit):
                cli.main([*base, *extra, "--out", str(tmp_path / "c.pt2")])
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    finally:
        for cls in [c for name, c in api.registered_schemes().items() if name == "mark"]:
            unregister_scheme(cls)
