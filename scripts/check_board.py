#!/usr/bin/env python3
"""Run a built-in quantized model on an (emulated) Raspberry Pi over TVM RPC and compare its top-1
predictions with the fake-quant model run on this host in PyTorch.

The model is quantized exactly as ``scripts/bench_accuracy.py`` does it (``--scheme auto``: Auto with
``--budget`` on the held-out validation split, ``--calib`` images from ``calibration_split``, gptq
rounding; ``--scheme fgq``: FGQ N=4, 8-bit activations), compiled for ``--target`` with a fixed batch, and
run on ``--images`` test images in batches over one RPC session.  Without ``--tracker`` an emulated board
is started (``scripts/board/setup.sh`` must have built it) and stopped at the end.

    python scripts/check_board.py --model mobilenet --scheme auto --budget 0.5 --images 1000 --json out.json
    python scripts/check_board.py --model resnet20 --scheme fgq --target rasp5 --images 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tvm_lowbit  # noqa: E402
from tvm_lowbit import data  # noqa: E402
from tvm_lowbit.deploy import board as emu  # noqa: E402
from tvm_lowbit.deploy.remote import Board, bounded, open_session  # noqa: E402
from tvm_lowbit.models import load_pretrained  # noqa: E402
from tvm_lowbit.quantizers import FGQ, quantize  # noqa: E402


def build_qmodel(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The quantized (fake-quant) model and a one-line description of its configuration."""
    model = load_pretrained(args.model)
    if args.scheme == "fgq":
        calib = data.calibration_set(args.calib)
        return quantize(model, FGQ(group_size=4, act_bits=8), calib, progress=False), "FGQ N=4 a8"
    from tvm_lowbit.models.mobilenet import calibration_split, validation_split
    from tvm_lowbit.quantizers.auto import Auto

    try:
        budget: float | str = float(args.budget)
    except ValueError:
        budget = args.budget
    # as scripts/bench_accuracy.py mobilenet_rows: calibration_split(--calib), the 5000 held-out images
    q = quantize(model, Auto(budget=budget, rounding=args.rounding), calibration_split(args.calib), validation_split())
    res = q.tvm_lowbit_auto
    print(res.table())
    print(res.summary(), flush=True)
    return q, f"Auto {res.budget} {args.rounding}"


def fake_quant_predictions(q: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([q(torch.from_numpy(x[i:i + batch])).argmax(1)
                          for i in tqdm(range(0, len(x), batch), desc="fake-quant (host)", leave=False)]).numpy()


def board_predictions(lib: Path, x: np.ndarray, batch: int, board: Board, key: str,
                      timings: list[float]) -> np.ndarray:
    """Upload ``lib`` once, run every batch of ``x`` (the last one zero-padded) in one session."""
    import tvm
    from tvm import relax

    sess = open_session(board, key)
    step_s = board.step_timeout_s
    try:
        bounded(lambda: sess.upload(str(lib)), step_s, "upload")
        rlib = bounded(lambda: sess.load_module(lib.name), step_s, "load the model")
        dev = sess.cpu(0)
        vm = bounded(lambda: relax.VirtualMachine(rlib, dev), step_s, "create the VM")
        preds = []
        for i in tqdm(range(0, len(x), batch), desc=f"board ({key})", unit="batch"):
            xb = x[i:i + batch]
            n = len(xb)
            if n < batch:
                xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
            t0 = time.perf_counter()
            out = bounded(lambda: vm["main"](tvm.runtime.tensor(np.ascontiguousarray(xb), dev)).numpy(), step_s,
                          f"run batch {i // batch}")
            timings.append(time.perf_counter() - t0)
            preds.append(out.argmax(-1)[:n])
        return np.concatenate(preds)
    finally:
        sess = rlib = dev = vm = None  # noqa: F841 - a board serves one session at a time
        import gc
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet", choices=("mobilenet", "resnet20"))
    ap.add_argument("--scheme", default="auto", choices=("auto", "fgq"))
    ap.add_argument("--budget", default="0.5", help="Auto's budget (points of top-1 drop, or agree>=X); default 0.5")
    ap.add_argument("--rounding", default="gptq", choices=("nearest", "gptq"), help="Auto's rounding (default gptq)")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (default 1024)")
    ap.add_argument("--target", default="rasp4b", choices=("rasp4b", "rasp5"))
    ap.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    ap.add_argument("--batch", type=int, default=100, help="compiled batch size (default 100)")
    ap.add_argument("--tracker", default=None, help="HOST:PORT of a tracker with a board; default: start one")
    ap.add_argument("--key", default=None, help="the board's tracker key (default: the target name)")
    ap.add_argument("--qmodel", type=Path, default=None,
                    help="cache of the quantized model (torch.save): loaded if it exists, else written")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.model == "resnet20" and args.scheme == "auto":
        ap.error("--scheme auto is the compact model's search: use --model mobilenet")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # the emulated board inherits it
    key = args.key or args.target
    t_start = time.perf_counter()

    started: dict[str, Any] = {}
    name = f"check-{os.getpid()}"
    boot: threading.Thread | None = None
    tracker = args.tracker
    if tracker is None:
        tracker_port = emu.free_port()
        rpc_port = next(p for p in iter(emu.free_port, None) if p not in (tracker_port, tracker_port + 1))
        tracker = f"127.0.0.1:{tracker_port}"

        def power_on() -> None:  # the board boots while the host quantizes and compiles
            try:
                started["state"] = emu.start(name, args.target, boards=1, key=key, rpc_port=rpc_port,
                                             tracker_port=tracker_port, log=lambda *_: None)
            except BaseException as e:  # noqa: BLE001 - reported in the main thread
                started["error"] = e

        boot = threading.Thread(target=power_on, daemon=True)
        boot.start()
    try:
        x, y = data.load("test", limit=args.images)
        made_by = {"model": args.model, "scheme": args.scheme, "budget": args.budget, "rounding": args.rounding,
                   "calib": args.calib}
        if args.qmodel is not None and args.qmodel.is_file():
            saved = torch.load(args.qmodel, map_location="cpu", weights_only=False)
            if not isinstance(saved, dict) or saved.get("made_by") != made_by:
                got = saved.get("made_by") if isinstance(saved, dict) else "unknown options"
                raise SystemExit(f"--qmodel {args.qmodel} was made with {got}, not {made_by}: "
                                 "pass another path (or delete it) to quantize again")
            q, config = saved["qmodel"].eval(), f"{saved['config']} (loaded from {args.qmodel})"
        else:
            q, config = build_qmodel(args)
            if args.qmodel is not None:
                tmp = args.qmodel.with_name(args.qmodel.name + ".tmp")
                torch.save({"made_by": made_by, "config": config, "qmodel": q}, tmp)
                tmp.replace(args.qmodel)
        print(f"quantized: {config} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        ref = fake_quant_predictions(q, x)
        t0 = time.perf_counter()
        art = tvm_lowbit.compile(q, x[:args.batch], args.target)
        print(f"compiled for {args.target}: {art.report.text()} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if boot is not None:
            boot.join(timeout=300)
            if "error" in started or "state" not in started:
                raise SystemExit(f"the emulated board did not start: {started.get('error', 'timed out')}")
        timings: list[float] = []
        with tempfile.TemporaryDirectory(prefix="check-board-") as tmp:
            lib = art.export(Path(tmp) / "artifact") / "model.so"
            lib = lib.rename(lib.with_name(f"{args.target}_{args.model}_{args.scheme}_model.so"))
            got = board_predictions(lib, x, args.batch, Board(tracker=tracker, key=key, step_timeout_s=900.0,
                                                              session_timeout_s=36000.0), key, timings)
    finally:
        if boot is not None:
            boot.join(timeout=300)
            emu.stop(name, log=lambda *_: None)
            left = emu.tagged_processes(emu.run_dir(name))
            if left:
                print(f"WARNING: board processes still running: {left}", file=sys.stderr)
            else:
                shutil.rmtree(emu.run_dir(name), ignore_errors=True)  # its logs

    n = len(x)
    agree = 100.0 * float((got == ref).mean())
    res = {"model": args.model, "scheme": args.scheme, "config": config, "target": args.target, "images": n,
           "agreement_pct": round(agree, 3), "disagreements": int((got != ref).sum()),
           "board_top1": round(100.0 * float((got == y).mean()), 2),
           "fakequant_top1": round(100.0 * float((ref == y).mean()), 2),
           "batch": args.batch, "board_ms_per_image": round(1e3 * sum(timings) / max(n, 1), 1),
           "seconds": round(time.perf_counter() - t_start, 1)}
    print()
    print(f"{'model':10s} {'scheme':7s} {'target':7s} {'images':>6s} {'agree %':>8s} {'board top1':>10s} "
          f"{'fq top1':>8s} {'ms/img':>7s}")
    print(f"{res['model']:10s} {res['scheme']:7s} {res['target']:7s} {n:6d} {agree:8.3f} {res['board_top1']:10.2f} "
          f"{res['fakequant_top1']:8.2f} {res['board_ms_per_image']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if agree >= 99.9 else 1


if __name__ == "__main__":
    sys.exit(main())
