"""Auto's search against a noisy check: readings refitted against each mix's smooth damage (isotonic
regression), a confidence of binomial standard errors, the cheapest mix that meets the budget by the
fit over every built mix; and bench_models' CNN check set (every view of the calibration photos)."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.models import photos, zoo
from tvm_lowbit.quantizers.auto import (Auto, Budget, Evaluation, agreement_se, judge, mean_kl, monotone_fit,
                                        outputs)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_models.py"


def _mix(cost: float, damage: float, agree: float, drop: float = float("nan"), cos_min: float = float("nan")
         ) -> Evaluation:
    return Evaluation({"layer": f"c{cost:g}"}, cost, int(cost), cost, float("nan"), agree, drop, False, "path", 0.0,
                      cos_min, damage)


# --------------------------------------------------------------------------------------------
# The fit and the standard error
# --------------------------------------------------------------------------------------------

def test_monotone_fit_keeps_ordered_readings_and_pools_a_lucky_one() -> None:
    assert monotone_fit([0.0, 0.1, 0.2], [100.0, 95.0, 91.0]) == [100.0, 95.0, 91.0]
    # the mix at damage 0.2 reads better than the less damaged one at 0.1: both get their mean
    assert monotone_fit([0.0, 0.1, 0.2, 0.3], [100.0, 89.0, 92.0, 85.0]) == pytest.approx([100.0, 90.5, 90.5, 85.0])
    # a violation reaching back several mixes pools all of them
    assert monotone_fit([0.1, 0.2, 0.3], [90.0, 89.0, 94.0]) == pytest.approx([91.0, 91.0, 91.0])
    # the input order does not matter, only the damage does; a NaN damage counts as the largest
    assert monotone_fit([0.3, 0.0, 0.2, 0.1], [85.0, 100.0, 92.0, 89.0]) == pytest.approx([85.0, 100.0, 90.5, 90.5])
    assert monotone_fit([float("nan"), 0.1], [99.0, 90.0]) == pytest.approx([94.5, 94.5])
    with pytest.raises(ValueError, match="2 damages but 3 readings"):
        monotone_fit([0.0, 0.1], [1.0, 2.0, 3.0])


def test_monotone_fit_is_the_least_squares_non_increasing_fit() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 9)
        dmg = [rng.random() for _ in range(n)]
        reading = [rng.choice([85.0, 88.0, 90.0, 91.5, 93.0, 100.0]) for _ in range(n)]
        fit = monotone_fit(dmg, reading)
        order = sorted(range(n), key=lambda i: dmg[i])
        assert all(fit[a] >= fit[b] - 1e-12 for a, b in zip(order, order[1:]))
        assert sum(fit) == pytest.approx(sum(reading))  # pooling moves readings, never adds to them
        # no other non-increasing fit is closer: compare with small moves of the fit that keep it monotone
        sse = sum((f - r) ** 2 for f, r in zip(fit, reading))
        for i in range(n):
            for step in (-0.5, 0.5):
                moved = list(fit)
                moved[i] += step
                if all(moved[a] >= moved[b] - 1e-12 for a, b in zip(order, order[1:])):
                    assert sum((f - r) ** 2 for f, r in zip(moved, reading)) >= sse - 1e-9


def test_agreement_standard_error() -> None:
    # 92 % agreement: (35 + 1) / 434 differing predictions on 432 inputs
    q = 36 / 434
    assert agreement_se(100 * (1 - 35 / 432), 432) == pytest.approx(100 * math.sqrt(q * (1 - q) / 432))
    # three times the inputs: ~1 / sqrt(3) of the error
    assert agreement_se(92.0, 432) / agreement_se(92.0, 144) == pytest.approx(1 / math.sqrt(3), rel=0.03)
    assert 0 < agreement_se(100.0, 432) < agreement_se(100.0, 50)


def test_mean_kl_is_the_softmax_kl() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    pa, pb = torch.softmax(a.double(), -1).numpy(), torch.softmax(b.double(), -1).numpy()
    want = float(np.mean(np.sum(pa * (np.log(pa) - np.log(pb)), axis=1)))
    assert mean_kl(a, b) == pytest.approx(want, rel=1e-9)
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# The verdicts
# --------------------------------------------------------------------------------------------

def test_judge_does_not_take_the_lucky_cheap_reading() -> None:
    budget = Budget("agree", 90.0)
    most = _mix(32.0, 0.0, 100.0)
    safe = _mix(6.0, 0.02, 94.0)
    unlucky = _mix(5.0, 0.04, 89.5)
    lucky = _mix(4.0, 0.06, 90.3)  # cheapest reading >= 90, but more damaged than a mix that read 89.5
    evals = [most, safe, unlucky, lucky]
    judge(evals, budget)
    assert lucky.fitted == pytest.approx((89.5 + 90.3) / 2) and not lucky.met
    assert not unlucky.met and safe.met and most.met
    assert min((e for e in evals if e.met), key=lambda e: e.cost) is safe
    # read alone (no less damaged mix that read worse), the same mix meets the budget
    alone = [most, safe, lucky]
    judge(alone, budget)
    assert lucky.met and lucky.fitted == 90.3


def test_judge_gates_on_the_own_reading_too() -> None:
    budget = Budget("agree", 90.0)
    costly = _mix(6.0, 0.02, 89.0)  # lifted to 91 by a more damaged mix that read 93
    cheap = _mix(4.0, 0.05, 93.0)
    judge([costly, cheap], budget)
    assert costly.fitted == pytest.approx(91.0) and cheap.fitted == pytest.approx(91.0)
    assert not costly.met and cheap.met


def test_judge_confidence_and_margin() -> None:
    budget = Budget("agree", 90.0)
    e = _mix(4.0, 0.05, 91.0)
    judge([e], budget, confidence=1.0, n_check=144)
    assert e.fitted == pytest.approx(91.0 - agreement_se(91.0, 144)) and not e.met  # 2.4 points of error
    judge([e], budget, confidence=1.0, n_check=4000)
    assert e.fitted == pytest.approx(91.0 - agreement_se(91.0, 4000)) and e.met  # 0.45 points
    judge([e], budget, margin=1.5)
    assert e.fitted == 91.0 and not e.met


def test_judge_drop_and_cos_budgets() -> None:
    # drop: the reading is -drop, so a mix that drops less than a less damaged one is the lucky one
    budget = Budget("drop", 1.0)
    a, b = _mix(6.0, 0.01, 95.0, drop=1.4), _mix(4.0, 0.03, 93.0, drop=0.4)
    judge([a, b], budget)
    assert a.fitted == pytest.approx(-0.9) and b.fitted == pytest.approx(-0.9)
    assert not a.met and b.met
    judge([a, b], budget, confidence=1.0, n_check=100)  # 7 % of the predictions changed: ~2.6 points of error
    assert not b.met
    # cos: the lowest cosine, no standard error
    budget = Budget("cos", 0.98)
    c, d = _mix(6.0, 0.002, 0.979, cos_min=0.979), _mix(4.0, 0.004, 0.985, cos_min=0.985)
    judge([c, d], budget, margin=0.0)
    assert c.fitted == pytest.approx(0.982) and d.fitted == pytest.approx(0.982) and d.met and not c.met
    judge([c, d], budget, margin=0.005)
    assert not d.met


def test_confidence_is_validated() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="confidence"):
            Auto(budget="agree>=90", confidence=bad)
    with pytest.raises(ValueError, match="cos budget"):
        Auto(budget="cos>=0.98", confidence=1.0)
    assert Auto(budget="agree>=90", confidence=1.0).to_dict()["confidence"] == 1.0


# --------------------------------------------------------------------------------------------
# The search on a small model
# --------------------------------------------------------------------------------------------

class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Mlp().eval()
    return model, torch.randn(128, 24), torch.randn(300, 24)


def test_search_records_the_damage_and_returns_the_cheapest_fitted_mix(mlp, tmp_path) -> None:
    model, calib, check = mlp
    cfg = Auto(budget="agree>=90", formats=("int4", "int8", "float"), sensitivity="full", sensitivity_images=64,
               rounding_images=64, max_evals=6, cache_dir=str(tmp_path), confidence=1.0)
    q = tvm_lowbit.quantize(model, cfg, calib, check, progress=False)
    res = q.tvm_lowbit_auto
    ref = outputs(model, check)
    # the damage of the returned mix is its mean KL to FP32 on the check inputs, measured on the model itself
    chosen = next(e for e in res.evaluations if e.formats == res.formats)
    assert chosen.damage == pytest.approx(mean_kl(ref, outputs(q, check)), rel=1e-6)
    # the fitted readings are non-increasing in the damage and lie one standard error under the fit
    by_damage = sorted(res.evaluations, key=lambda e: e.damage)
    raw = monotone_fit([e.damage for e in res.evaluations], [e.agree for e in res.evaluations])
    for e, r in zip(res.evaluations, raw):
        assert e.fitted == pytest.approx(r - agreement_se(e.agree, len(check)))
    assert all(a.fitted + agreement_se(a.agree, 300) >= b.fitted + agreement_se(b.agree, 300) - 1e-9
               for a, b in zip(by_damage, by_damage[1:]))
    # the result is the cheapest mix that meets the budget by its fit and its own reading
    met = [e for e in res.evaluations if e.met]
    assert res.met and chosen.met and chosen.cost == min(e.cost for e in met)
    assert all(e.fitted >= 90.0 - 1e-9 and e.agree >= 90.0 - 1e-9 for e in met)
    assert res.confidence == 1.0 and "1 standard errors" in res.summary()


def test_a_stricter_confidence_never_picks_a_cheaper_mix(mlp, tmp_path) -> None:
    """With backoff off (max_evals spent by the binary search), the same builds are read more strictly."""
    model, calib, check = mlp
    picked = []
    for conf in (0.0, 2.0):
        cfg = Auto(budget="agree>=90", formats=("int4", "int8", "float"), sensitivity="full", sensitivity_images=64,
                   rounding_images=64, max_evals=4, cache_dir=str(tmp_path), confidence=conf)
        res = tvm_lowbit.quantize(model, cfg, calib, check, progress=False).tvm_lowbit_auto
        picked.append(res.cost)
        assert res.met and res.agree - conf * agreement_se(res.agree, 300) >= 90.0 - 1e-9
    assert picked[1] >= picked[0]


# --------------------------------------------------------------------------------------------
# bench_models: the CNN check set
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_models_auto_search", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_models_auto_search"] = module
    spec.loader.exec_module(module)
    return module


def test_cnn_auto_checks_on_every_view_of_the_calibration_photos(bench: ModuleType) -> None:
    calib = zoo.normalize(photos.views("calib", 16, 2))
    case = bench.CnnCase("resnet18", nn.Identity(), calib, calib[:1])
    check = bench.auto_check_views(case)
    n_photos = len(photos.CALIB_PHOTOS)
    assert len(check) == bench.AUTO_CHECK_VIEWS * n_photos == 36 * n_photos
    # the calibration views are the first views of every photo; the rest are further views of the same photos
    per_photo = check.reshape(n_photos, bench.AUTO_CHECK_VIEWS, *check.shape[1:])
    assert torch.equal(torch.as_tensor(per_photo[:, :2]).reshape(calib.shape), torch.as_tensor(calib))
    assert len({bytes(np.asarray(v).tobytes()) for v in check}) == len(check)
    cfg = bench.auto_config("agree>=90")
    assert cfg.confidence == bench.AUTO_CONFIDENCE == 1.0 and cfg.formats == bench.CNN_AUTO_FORMATS
