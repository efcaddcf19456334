"""A wheel built from the repo, installed (not editable) into a fresh venv, finds its target files and shipped
tuning databases and compiles the built-in model for x86 and rasp4b, run from outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# run inside the fresh venv from a folder outside the repo: everything it reports must come from the wheel
CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import numpy as np
    import torch

    import tvm_lowbit
    from tvm_lowbit import FGQ, quantize, targets, tune
    from tvm_lowbit.models import load_pretrained

    home = Path(tvm_lowbit.__file__).resolve().parent
    out = {"package": str(home), "targets_dir": str(targets.TARGETS_DIR.resolve()),
           "targets": targets.available(), "schedules_dir": str(tune.SCHEDULES_DIR.resolve())}
    for name in ("x86-host", "rasp4b"):
        d = tune.SCHEDULES_DIR / name
        out[f"schedules_{name}"] = [p.name for p in sorted(d.iterdir())] if d.is_dir() else []
    out["rasp4b_emulated_note"] = tune.emulated_default("rasp4b") is not None

    torch.manual_seed(0)
    calib = torch.randn(8, 1, 28, 28)
    q = quantize(load_pretrained(), FGQ(group_size=4, act_bits=8), calib, progress=False)
    x = calib[:1].numpy()
    x86 = tvm_lowbit.compile(q, x, "x86")
    with torch.no_grad():
        ref = q(calib[:1]).numpy()
    out["x86_lowered"] = len(x86.report.lowered)
    out["x86_tuning_dir"] = None if x86.tuning is None else str(Path(x86.tuning.directory).resolve())
    out["x86_max_diff"] = float(np.abs(x86.run(x) - ref).max())
    out["x86_ref_scale"] = float(np.abs(ref).max())
    pi = tvm_lowbit.compile(q, x, "rasp4b")
    out["rasp4b_target"] = pi.target.name
    out["rasp4b_lowered"] = len(pi.report.lowered)
    out["rasp4b_tuning_dir"] = None if pi.tuning is None else str(Path(pi.tuning.directory).resolve())
    print("RESULT " + json.dumps(out))
""")


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_wheel_install_finds_targets_and_schedules_and_compiles(tmp_path: Path) -> None:
    import json

    if not (REPO / ".git").exists():
        pytest.skip("builds the wheel from a git checkout's files")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_LOWBIT_TARGETS",
                                                              "TVM_LOWBIT_SCHEDULES", "PYTHONHOME")}
    # build from a copy of the checkout's files (tracked or new, not ignored): a build inside the repo would leave
    # build/ behind, whose stale copies of moved modules a later wheel would pick up
    src = tmp_path / "src"
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], env, REPO).split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(src)], env, tmp_path)
    [wheel] = list(wheels.glob("tvm_lowbit-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env,
                     tmp_path).strip())
    # the dependencies (tvm, torch, numpy ...) come from this interpreter's site-packages, added as a plain path:
    # a path line in a .pth does not run that folder's own .pth files, so the repo's editable install stays out
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         env, tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "check.py").write_text(CHECK)
    stdout = _run([str(py), "check.py"], env, work)
    res = json.loads(stdout.split("RESULT ", 1)[1])
    venv_root = str(venv.resolve())
    assert res["package"].startswith(venv_root), f"tvm_lowbit imported from {res['package']}, not the wheel"
    assert res["targets_dir"].startswith(venv_root) and res["schedules_dir"].startswith(venv_root)
    assert {"x86-host", "rasp4b", "rasp5", "vta-sim"} <= set(res["targets"])
    for name in ("x86-host", "rasp4b"):
        assert {"database_workload.json", "database_tuning_record.json"} <= set(res[f"schedules_{name}"]), res
    # the shipped Pi database is tuned on the cycle estimate, with its default-schedule estimates: applied by default
    assert {"MEASURED_BY_ESTIMATE", "default_schedules.json"} <= set(res["schedules_rasp4b"]), res
    assert not res["rasp4b_emulated_note"]
    assert (Path(res["schedules_dir"]) / "README.md").is_file()
    # the shipped x86 database was applied by default, from the installed package
    assert res["x86_tuning_dir"] is not None and res["x86_tuning_dir"].startswith(venv_root)
    assert res["x86_lowered"] > 0 and res["rasp4b_lowered"] == res["x86_lowered"]
    assert res["x86_max_diff"] <= 1e-3 * max(res["x86_ref_scale"], 1.0), res
    # the estimate-tuned Pi database applies by default too (when its records match), from the installed package
    assert res["rasp4b_target"] == "rasp4b"
    assert res["rasp4b_tuning_dir"] is None or res["rasp4b_tuning_dir"].startswith(venv_root), res
    cli = _run([str(venv / "bin" / "tvm-lowbit"), "targets"], env, work)
    assert "rasp4b" in cli and "x86-host" in cli
