"""Re-tune the shipped Raspberry Pi databases (tvm_lowbit/schedules/rasp4b, rasp5) on the cycle estimate: one command,
no board. Each target is tuned into a fresh folder (<target>.new) with MetaSchedule and the EstimateRunner (each
candidate runs on the emulated board, warm, and llvm-mca times the blocks it executed; tvm_lowbit.cost), then swapped
in for the old folder. The models are the ones scripts/bench_arm.py measures (--calib images as there), so the
shipped records match what its floor checks:

  resnet20   the trained Fashion-MNIST ResNet-20, tvm-fgq-n4 (FGQ N=4, 8-bit activations, first conv int8,
             classifier ternary)
  mobilenet  the trained Fashion-MNIST MobileNet, tvm-fgq-n4

Every kernel task's default schedule is measured first (default_schedules.json in the folder); `compile` applies a
task's records only when its best one beats that default by the estimate. Printed: per target, wall and CPU seconds
(this process and its children: the builder, the board's qemu, llvm-mca), the load average, and per task the default
and best estimated microseconds.

    python scripts/tune_pi.py                                   # rasp4b and rasp5, both models, 64 trials each, swap in
    python scripts/tune_pi.py --targets rasp4b --no-swap        # tune into tvm_lowbit/schedules/rasp4b.new only
    python scripts/tune_pi.py --models resnet20 --trials 128
    python scripts/tune_pi.py --models mobilenet --add          # add a model's records to the shipped folders
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_arm import load_model, tvm_model  # noqa: E402 - the models bench_arm measures

from tvm_lowbit import tune  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="rasp4b,rasp5")
    ap.add_argument("--models", default="resnet20,mobilenet", help="comma list of resnet20, mobilenet (default both: "
                    "what the shipped folders hold)")
    ap.add_argument("--trials", type=int, default=64, help="trials per model and target, shared out over the model's "
                    "kernel tasks by MetaSchedule's gradient scheduler (default 64)")
    ap.add_argument("--trials-per-task", type=int, default=16, help="at most this many per task (default 16)")
    ap.add_argument("--calib", type=int, default=256, help="calibration images, as bench_arm's --calib (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1, help="warm emulated boards measuring at once (default 1)")
    ap.add_argument("--schedules", type=Path, default=tune.SCHEDULES_DIR, help="the folder holding <target>/")
    ap.add_argument("--no-swap", action="store_true", help="leave the result in <target>.new")
    ap.add_argument("--add", action="store_true", help="tune into the shipped <target>/ itself (add a model's "
                    "records to it; a task already tuned there is resumed, not re-run)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    benches = [load_model(m, args.calib) for m in args.models.split(",")]
    for target in args.targets.split(","):
        new = args.schedules / (target if args.add else f"{target}.new")
        if not args.add:
            shutil.rmtree(new, ignore_errors=True)
        wall0, cpu0, load0 = time.time(), cpu_seconds(), os.getloadavg()
        trials = failed = 0
        rows = []
        for bench in benches:
            q = tvm_model("tvm-fgq-n4", bench)
            rep = tune.tune(q, bench.x, target, trials_per_task=args.trials_per_task, work_dir=new,
                            only_kernels=True, seed=args.seed, max_trials_global=args.trials,
                            estimate_workers=args.parallel, scheduler="gradient")
            print(rep.text(), flush=True)
            if rep.failed:
                print(f"  {rep.failed} failed candidates; first: {rep.errors[0].strip().splitlines()[-1][:300]}")
            trials, failed = trials + rep.trials_run, failed + rep.failed
            rows += [(bench.name, v) for v in rep.versus]
        wall, cpu, load1 = time.time() - wall0, cpu_seconds() - cpu0, os.getloadavg()
        print(f"\n{target}: {trials} trials ({failed} failed) in {wall:.0f} s wall, {cpu:.0f} CPU s; "
              f"per trial {wall / max(trials, 1):.1f} s wall, {cpu / max(trials, 1):.1f} CPU s "
              f"(tasks, default-schedule measurements and XGBoost included); load average "
              f"{load0[0]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} (1/5/15 min) at the end")
        print(f"| model | task | default est. us | best tuned est. us | tuned/default | applied |")
        print("|---|---|---|---|---|---|")
        for model, v in rows:
            d = f"{v.default * 1e6:.2f}" if v.default is not None else "-"
            b = f"{v.best * 1e6:.2f}" if v.best is not None else "-"
            r = f"{v.best / v.default:.3f}" if v.best is not None and v.default else "-"
            print(f"| {model} | {v.task} | {d} | {b} | {r} | {'yes' if v.wins else 'no (default kept)'} |")
        print(flush=True)
        (new / ".lock").unlink(missing_ok=True)  # the writers' lock file: not part of the database
        if not args.no_swap and not args.add:
            old = args.schedules / target
            shutil.rmtree(old, ignore_errors=True)
            new.rename(old)
            print(f"{old}: replaced by the database tuned on the estimate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
