"""Re-tune the shipped Raspberry Pi databases (tvm_lowbit/schedules/rasp4b, rasp5) on the cycle estimate: one command,
no board. Each target is tuned into a fresh folder (<target>.new) with MetaSchedule and the EstimateRunner (each
candidate runs on the emulated board, warm, and llvm-mca times the blocks it executed; tvm_lowbit.cost), then swapped
in for the old folder. The models are the ones scripts/bench_arm.py measures (--calib images as there), so the
shipped records match what its floor checks:

  resnet20      the trained Fashion-MNIST ResNet-20, tvm-fgq-n4 (FGQ N=4, 8-bit activations, first conv int8,
                classifier ternary)
  mobilenet     the trained Fashion-MNIST MobileNet, tvm-fgq-n4 and tvm-auto (bench_arm's Auto mix: budget 0.5
                points on 2000 held-out images, its default formats)
  resnet18-224  the ResNet-18 at ImageNet shape (1x3x224x224, random weights, seed 0), tvm-fgq-n4

--trials is per model variant and target (64: 64 for resnet20, 128 for mobilenet's two variants, ...). Every kernel
task's default schedule is measured first (default_schedules.json in the folder: estimated run time and executed
instructions); each candidate's instructions are recorded beside its record (record_instructions.json), and
`compile` applies a task's fastest record that needs fewer estimated cycles and no more instructions than that
default (else the default). Printed: per target, wall and CPU seconds (this process and its children: the builder,
the board's qemu, llvm-mca), the load average, and per task the default and best estimated microseconds and
instructions.

After each model variant is tuned, its records are judged inside the model (tvm_lowbit.judge): the model is built
with the default schedules and with the candidate records, run once on the emulated board, and the estimate of
model.so is attributed to each kernel's functions; a record is kept only when its kernel's functions need fewer
estimated cycles and no more instructions in the model than with the default schedule (a refused workload's next
candidate is tried, --judge-rounds builds in all). The verdicts go to in_model.json in the folder; compile then
applies only records judged there. --judge-only judges the existing folders without tuning.

    python scripts/tune_pi.py                                   # rasp4b and rasp5, every model, 64 trials each, swap in
    python scripts/tune_pi.py --targets rasp4b --no-swap        # tune into tvm_lowbit/schedules/rasp4b.new only
    python scripts/tune_pi.py --models resnet20 --trials 128
    python scripts/tune_pi.py --models mobilenet --variants tvm-auto --add   # add one variant's records
    python scripts/tune_pi.py --judge-only --targets rasp4b --models resnet20  # judge the shipped rasp4b records
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
from tvm_lowbit.judge import JudgeReport, judge_model  # noqa: E402

# the bench_arm variants tuned per model (what the shipped folders hold)
MODEL_VARIANTS = {"resnet20": ("tvm-fgq-n4",), "mobilenet": ("tvm-fgq-n4", "tvm-auto"),
                  "resnet18-224": ("tvm-fgq-n4",)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def judge(name: str, q: object, x: object, target: str, folder: Path, rounds: int) -> JudgeReport:
    """Judge ``folder``'s records inside model ``name`` on ``target``, printing the one-line summary and timings."""
    t0, c0 = time.time(), cpu_seconds()
    rep = judge_model(q, x, target, folder, label=name, rounds=rounds)
    print(f"{rep.text()} ({time.time() - t0:.0f} s wall, {cpu_seconds() - c0:.0f} CPU s)", flush=True)
    return rep


def print_judgements(reports: list[JudgeReport]) -> None:
    """The in-model verdicts of every judged model, one table."""
    if not reports:
        return
    lines = [r.table().splitlines() for r in reports]
    print("\nin the model (est. cycles and instructions of the workload's functions in model.so, one inference):")
    print("\n".join(lines[0][:2] + [ln for t in lines for ln in t[2:]]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="rasp5,rasp4b")
    ap.add_argument("--models", default=",".join(MODEL_VARIANTS), help=f"comma list of {', '.join(MODEL_VARIANTS)} "
                    "(default all: what the shipped folders hold)")
    ap.add_argument("--variants", default=None, help="comma list: only these bench_arm variants of the models "
                    "(default: each model's, " + "; ".join(f"{m}: {', '.join(v)}" for m, v in MODEL_VARIANTS.items())
                    + ")")
    ap.add_argument("--trials", type=int, default=64, help="trials per model variant and target, shared out over its "
                    "kernel tasks by MetaSchedule's gradient scheduler (default 64)")
    ap.add_argument("--trials-per-task", type=int, default=16, help="at most this many per task (default 16)")
    ap.add_argument("--calib", type=int, default=256, help="calibration images, as bench_arm's --calib (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1, help="warm emulated boards measuring at once (default 1)")
    ap.add_argument("--schedules", type=Path, default=tune.SCHEDULES_DIR, help="the folder holding <target>/")
    ap.add_argument("--no-swap", action="store_true", help="leave the result in <target>.new")
    ap.add_argument("--add", action="store_true", help="tune into the shipped <target>/ itself (add a model's "
                    "records to it; a task already tuned there is resumed, not re-run)")
    ap.add_argument("--judge-only", action="store_true", help="tune nothing: judge the records of <schedules>/<target>/ "
                    "inside the models and write its in_model.json")
    ap.add_argument("--judge-rounds", type=int, default=2, help="tuned builds per model when judging: a workload "
                    "whose record loses in the model gets its next candidate in the next build (default 2)")
    ap.add_argument("--no-judge", action="store_true", help="do not judge the records in the model after tuning")
    args = ap.parse_args()
    models = args.models.split(",")
    for m in models:
        if m not in MODEL_VARIANTS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODEL_VARIANTS)}")
    wanted = None if args.variants is None else set(args.variants.split(","))
    jobs = [(m, v) for m in models for v in MODEL_VARIANTS[m] if wanted is None or v in wanted]
    if not jobs:
        ap.error(f"no variant of {args.models} in --variants {args.variants}")

    import torch

    torch.set_num_threads(1)
    benches = {m: load_model(m, args.calib) for m in models}
    qmodels = [(f"{m} {v}", benches[m], tvm_model(v, benches[m])) for m, v in jobs]
    for target in args.targets.split(","):
        if args.judge_only:
            judged = [judge(name, q, bench.x, target, args.schedules / target, args.judge_rounds)
                      for name, bench, q in qmodels]
            print_judgements(judged)
            continue
        new = args.schedules / (target if args.add else f"{target}.new")
        if not args.add:
            shutil.rmtree(new, ignore_errors=True)
        wall0, cpu0, load0 = time.time(), cpu_seconds(), os.getloadavg()
        trials = failed = 0
        rows = []
        judged: list[JudgeReport] = []
        for name, bench, q in qmodels:
            t0, c0 = time.time(), cpu_seconds()
            rep = tune.tune(q, bench.x, target, trials_per_task=args.trials_per_task, work_dir=new,
                            only_kernels=True, seed=args.seed, max_trials_global=args.trials,
                            estimate_workers=args.parallel, scheduler="gradient")
            print(f"{name}: {rep.text()} ({time.time() - t0:.0f} s wall, {cpu_seconds() - c0:.0f} CPU s)", flush=True)
            if rep.failed:
                print(f"  {rep.failed} failed candidates; first: {rep.errors[0].strip().splitlines()[-1][:300]}")
            trials, failed = trials + rep.trials_run, failed + rep.failed
            rows += [(name, v) for v in rep.versus]
            if not args.no_judge:
                judged.append(judge(name, q, bench.x, target, new, args.judge_rounds))
        wall, cpu, load1 = time.time() - wall0, cpu_seconds() - cpu0, os.getloadavg()
        print(f"\n{target}: {trials} trials ({failed} failed) in {wall:.0f} s wall, {cpu:.0f} CPU s; "
              f"per trial {wall / max(trials, 1):.1f} s wall, {cpu / max(trials, 1):.1f} CPU s "
              f"(tasks, default-schedule measurements and XGBoost included); load average "
              f"{load0[0]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} (1/5/15 min) at the end")
        print("| model | task | default est. us | default insns | best est. us | its insns | best/default | "
              "fastest record: est. us, insns | applied |")
        print("|---|---|---|---|---|---|---|---|---|")

        def num(v: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
            return "-" if v is None else f"{v * scale:{fmt}}"

        for model, v in rows:
            r = f"{v.best / v.default:.3f}" if v.best is not None and v.default else "-"
            fastest = "" if not v.insns_veto else f"{num(v.fastest, 1e6)}, {num(v.fastest_insns, fmt=',.0f')}"
            applied = "yes" if v.wins else "no (default kept)"
            if v.insns_veto:
                applied += ": the fastest record executes more instructions"
            print(f"| {model} | {v.task} | {num(v.default, 1e6)} | {num(v.default_insns, fmt=',.0f')} | "
                  f"{num(v.best, 1e6)} | {num(v.best_insns, fmt=',.0f')} | {r} | {fastest} | {applied} |")
        print(flush=True)
        print_judgements(judged)
        (new / ".lock").unlink(missing_ok=True)  # the writers' lock file: not part of the database
        if not args.no_swap and not args.add:
            old = args.schedules / target
            shutil.rmtree(old, ignore_errors=True)
            new.rename(old)
            print(f"{old}: replaced by the database tuned on the estimate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
