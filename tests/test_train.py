"""The built-in trainer: DDP (2 CPU ranks, gloo), hook order errors, NaN detection, checkpoint resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvm_lowbit.quantizers.hooks import HookOrderError
from tvm_lowbit.quantizers.pact import PACT
from tvm_lowbit.quantizers.sq import SQ
from tvm_lowbit.quantizers.train import NonFiniteLossError, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_worker import TinyNet, synthetic  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
@pytest.mark.parametrize("scheme", ["sq", "pact"])
def test_ddp_ranks_agree(tmp_path, scheme):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_worker.py"),
                        str(tmp_path), scheme], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert a["steps"] == b["steps"] > 0
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        if k.endswith("num_batches_tracked") or "running_" in k:
            continue  # batch-norm statistics are per rank (DDP broadcasts rank 0's at each forward)
        assert torch.equal(a["state"][k], b["state"][k]), k
    if scheme == "sq":
        assert a["selections"] and a["selections"].keys() == b["selections"].keys()
        for k in a["selections"]:
            assert torch.equal(a["selections"][k], b["selections"][k]), k
        assert a["hook"]["rng"] == b["hook"]["rng"]


def test_hook_order_errors():
    hook = SQ(schedule=(0.5, 1.0)).attach(TinyNet())
    with pytest.raises(HookOrderError, match="outside a stage"):
        hook.after_step()
    with pytest.raises(HookOrderError, match="outside a stage"):
        hook.before_step()
    hook.begin_stage()
    with pytest.raises(HookOrderError, match="inside stage 0"):
        hook.begin_stage()
    hook.end_stage()
    with pytest.raises(HookOrderError, match="outside a stage"):
        hook.end_stage()
    with pytest.raises(HookOrderError, match="before attach"):
        from tvm_lowbit.quantizers.pact import PACTQuantizer
        PACTQuantizer(PACT()).after_step()


def test_nan_loss_names_stage_epoch_step():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = synthetic(32)
    x[20] = float("nan")  # in the second batch of 16 (after the shuffle it may be either; both are named)
    with pytest.raises(NonFiniteLossError, match=r"stage 1/2, epoch 1/1, step [12]/2"):
        train(model, SQ(schedule=(0.5, 1.0)), (x, y), epochs_per_stage=1, batch_size=16, progress=False, log=None)


@pytest.mark.parametrize("cfg", [SQ(inner="bwn", schedule=(0.5, 0.75, 1.0), seed=2), PACT(act_bits=3, weight_bits=3)],
                         ids=["sq", "pact"])
def test_checkpoint_resume_matches_uninterrupted(tmp_path, cfg):
    data, val = synthetic(48), synthetic(16, seed=9)
    kw = dict(epochs_per_stage=2, batch_size=16, lr=0.05, progress=False, log=None, seed=5, device="cpu")

    torch.manual_seed(0)
    full = TinyNet()
    res_full = train(full, cfg, data, val, checkpoint_dir=tmp_path / "a", **kw)
    assert res_full["finished"] and len(res_full["history"]) == len(cfg.schedule if hasattr(cfg, "schedule") else [1])

    if isinstance(cfg, PACT):  # one stage: interrupting means resuming a finished run (nothing left to do)
        torch.manual_seed(1)
        again = TinyNet()
        res = train(again, cfg, data, val, checkpoint_dir=tmp_path / "a", **kw)
        assert res["history"] == res_full["history"]
        for k, v in full.state_dict().items():
            assert torch.equal(v, again.state_dict()[k]), k
        return

    torch.manual_seed(0)
    part = TinyNet()
    r1 = train(part, cfg, data, val, checkpoint_dir=tmp_path / "b", max_stages=1, **kw)
    assert not r1["finished"] and len(r1["history"]) == 1
    torch.manual_seed(123)  # a fresh process would build a different model: the checkpoint overrides it
    resumed = TinyNet()
    r2 = train(resumed, cfg, data, val, checkpoint_dir=tmp_path / "b", **kw)
    assert r2["finished"] and r2["history"] == res_full["history"]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = res_full["hook"].selections(), r2["hook"].selections()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["cosine", "cosine-run"])
def test_lr_schedules(monkeypatch, schedule):
    """cosine restarts at the peak every stage; cosine-run is one cosine over all stages."""
    import math

    lrs: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    torch.manual_seed(0)
    stages, steps = 3, 2  # 32 examples, batch 16
    train(TinyNet(), SQ(schedule=(0.5, 0.75, 1.0)), synthetic(32), epochs_per_stage=1, batch_size=16, lr=0.1,
          lr_schedule=schedule, progress=False, log=None)
    if schedule == "cosine":
        want = [0.1 * 0.5 * (1 + math.cos(math.pi * t / steps)) for _ in range(stages) for t in range(steps)]
    else:
        want = [0.1 * 0.5 * (1 + math.cos(math.pi * n / (stages * steps))) for n in range(stages * steps)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)
