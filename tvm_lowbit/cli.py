"""The ``tvm-lowbit`` command line: demo, quantize, compile, tune, deploy, export, targets."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from tvm_lowbit import safe_io


def _err(msg: str, code: int = 2) -> None:
    print(f"tvm-lowbit: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _one_line(e: BaseException) -> str:
    """An exception as one line: its first line of text that is not part of a traceback (TVM's messages
    carry one), at most 400 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~")) and not ln[:1].isdigit()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


# --- strict numbers: argparse types that reject out-of-range, NaN and Inf values before any work ----------

def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


POSITIVE = _int_in(1)
NON_NEGATIVE = _int_in(0)
PORT = _int_in(1, 65535)


def _host_port(text: str) -> str:
    """``HOST:PORT`` with a port in 1..65535 (the tracker address)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``tvm-lowbit: error: argument --batch: must be at least 1, got 0``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _err(f"{message} (see {self.prog} --help)")


def _load_npy(path: str, flag: str) -> np.ndarray:
    """A numeric ``.npy`` array, or a one-line error naming ``flag`` and the file."""
    p = Path(path)
    if not p.is_file():
        _err(f"{flag} {path}: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, UnpicklingError...
        _err(f"{flag} {path}: not a NumPy .npy array ({type(e).__name__}: {_one_line(e)}); save one with np.save")
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        _err(f"{flag} {path}: an .npz archive; {flag} takes one array saved with np.save (.npy)")
    if arr.dtype.kind not in "fiub":
        _err(f"{flag} {path}: dtype {arr.dtype} is not numeric; save float32 model inputs")
    if arr.size == 0:
        _err(f"{flag} {path}: the array is empty (shape {arr.shape})")
    return arr


def _load_model(spec: str):  # -> nn.Module
    """A built-in model name, or ``path/to/file.py:factory`` returning an nn.Module."""
    from torch import nn

    from tvm_lowbit.models.resnet import load_pretrained

    if ":" in spec and spec.split(":")[0].endswith(".py"):
        path, fn = spec.rsplit(":", 1)
        if not Path(path).is_file():
            _err(f"{path}: no such file")
        try:
            mod_spec = importlib.util.spec_from_file_location("user_model", path)
            mod = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(mod)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the user's file may raise anything
            _err(f"{path}: importing it failed: {type(e).__name__}: {_one_line(e)}")
        factory = getattr(mod, fn, None)
        if not callable(factory):
            _err(f"{path} has no function {fn!r}")
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001
            _err(f"{path}:{fn}() failed: {type(e).__name__}: {_one_line(e)}")
        if not isinstance(model, nn.Module):
            _err(f"{path}:{fn}() returned a {type(model).__name__}, not a torch.nn.Module")
        return model.eval()
    try:
        return load_pretrained(spec)
    except (ValueError, FileNotFoundError) as e:
        _err(str(e))


def _calib(path: str | None, n: int, allow_degenerate: bool = False) -> np.ndarray:
    from tvm_lowbit import data
    from tvm_lowbit.quantizers.input_checks import (DegenerateCalibrationError, accept_degenerate,
                                                    check_calibration)

    if path is None:
        return data.calibration_set(n)
    arr = _load_npy(path, "--calib")
    if arr.ndim < 2:
        _err(f"{path}: calibration data must be an array [n, ...] of model inputs, got shape {arr.shape}")
    arr = arr.astype(np.float32)[:n]
    try:
        check_calibration(arr, allow_degenerate, what=f"--calib {path}")
    except DegenerateCalibrationError as e:
        _err(str(e).replace("allow_degenerate=True (CLI: --allow-degenerate-calib)", "--allow-degenerate-calib"))
    return accept_degenerate(arr) if allow_degenerate else arr


def _model_calib(a: argparse.Namespace):  # -> (nn.Module, np.ndarray)
    """The model of ``a.model`` and the calibration data, checked to fit each other on one input (so a
    mislabeled ``--calib`` is an error naming it, not an exception from inside torch)."""
    import torch

    model = _load_model(a.model)
    calib = _calib(a.calib, a.calib_size, a.allow_degenerate_calib)
    if a.calib is not None:
        try:
            with torch.no_grad():
                model(torch.from_numpy(np.ascontiguousarray(calib[:1], np.float32)))
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, IndexError...
            _err(f"--calib {a.calib}: the model cannot run on inputs of shape {tuple(calib[:1].shape)} "
                 f"({type(e).__name__}: {_one_line(e)})")
    return model, calib


def _check_onnx(path: str) -> None:
    """A readable ONNX model file, or a one-line error (a truncated file is a protobuf DecodeError)."""
    if not Path(path).is_file():
        _err(f"{path}: no such file")
    import onnx

    try:
        onnx.checker.check_model(onnx.load(path, load_external_data=False))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, the checker's ValidationError, ...
        _err(f"{path}: not a readable ONNX model ({type(e).__name__}: {_one_line(e)})")


def _fgq_from_args(a: argparse.Namespace):
    from tvm_lowbit import FGQ

    try:
        return FGQ(group_size=a.group_size, act_bits=a.act_bits, threshold=a.threshold, calibration=a.calibration,
                   first_layer=a.first_layer, last_layer=a.last_layer)
    except (ValueError, TypeError) as e:
        _err(str(e))


def _add_fgq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, default=4, help="N: weights sharing one alpha (default 4)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits, 2..8 (default 8)")
    p.add_argument("--threshold", default="exact", help="exact | twn | asym")
    p.add_argument("--calibration", default="auto", help="auto | minmax | percentile | mse | mse_out (default auto: mse at 8 bits, percentile below)")
    p.add_argument("--first-layer", default="float", help="float | fgq (quantize; for inq/sq/pact any value but float)")
    p.add_argument("--last-layer", default="float", help="float | fgq (quantize; for inq/sq/pact any value but float)")
    p.add_argument("--calib", default=None, help=".npy array of calibration inputs (default: Fashion-MNIST train)")
    p.add_argument("--calib-size", type=POSITIVE, default=2048, help="calibration images (default 2048)")
    p.add_argument("--allow-degenerate-calib", action="store_true",
                   help="accept constant or all-zero --calib data (refused by default: it gives meaningless ranges)")


def _checked(check):  # -> the checked path
    """Run an output-path check (``safe_io``), turning its ``OutputError`` into a one-line error."""
    try:
        return check()
    except safe_io.OutputError as e:
        _err(str(e))


def _interleaved_ms(runners: list, x: np.ndarray, repeat: int) -> list[float]:
    """Median ms of one ``run(x)`` of each runner, timed in interleaved rounds (a shared host's load then
    hits every runner alike)."""
    for r in runners:
        r.run(x)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeat):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            r.run(x)
            times[i].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def cmd_demo(a: argparse.Namespace) -> None:
    import torch

    import tvm_lowbit
    from tvm_lowbit import data, evaluate, quantize
    from tvm_lowbit.baselines import ort_int8, torch_fp32, tvm_fp32
    from tvm_lowbit.models import load_pretrained

    cfg = _fgq_from_args(a)
    model = load_pretrained(a.model)
    x, y = data.load("test", limit=a.limit)
    print(f"[1/6] built-in model {a.model}: evaluating FP32 on {len(x)} Fashion-MNIST test images", flush=True)
    fp32 = evaluate.torch_top1(model, x, y, progress=True)
    print(f"[2/6] quantizing with {cfg}", flush=True)
    calib = _calib(a.calib, a.calib_size, a.allow_degenerate_calib)
    q = quantize(model, cfg, calib)
    fq = evaluate.torch_top1(q, x, y, progress=True)
    print(f"[3/6] compiling for {a.target} (batch {a.batch} for accuracy, batch 1 for latency)", flush=True)
    t0 = time.time()
    art = tvm_lowbit.compile(q, x[:a.batch], a.target)
    art1 = tvm_lowbit.compile(q, x[:1], a.target)
    print(f"      {art.report.text()}\n      compiled in {time.time() - t0:.1f} s", flush=True)
    print("[4/6] evaluating the compiled model", flush=True)
    pred = evaluate.predictions(art, x, progress=True)
    with torch.no_grad():
        fq_pred = np.concatenate([q(torch.from_numpy(x[i:i + 500])).argmax(1).numpy() for i in range(0, len(pred), 500)])
    tvm_top1 = 100.0 * float((pred == y[:len(pred)]).mean())
    agree = 100.0 * float((pred == fq_pred[:len(pred)]).mean())
    n_ort = min(256, len(calib))
    print(f"[5/6] onnxruntime int8 (static QDQ, per-channel int8 weights, calibrated on {n_ort} of the same "
          "calibration images): quantizing and evaluating", flush=True)
    ort = ort_int8(model, x[:1], calib[:n_ort])
    ort_top1 = 100.0 * float(np.mean([int(ort.run(x[i:i + 1]).argmax()) == int(y[i]) for i in range(len(x))]))
    print("[6/6] timing at batch 1, interleaved (onnxruntime int8, PyTorch eager, TVM FP32 untuned, TVM FGQ)",
          flush=True)
    base = tvm_fp32(model, torch.from_numpy(x[:1]))
    eager = torch_fp32(model)
    t_ort, t_eager, t_fp32, t_fgq = _interleaved_ms([ort, eager, base, art1], x[:1], a.repeat)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    print()
    print(f"{'':28}{'top-1 %':>10}{'weights (bytes)':>18}{'latency ms':>12}")
    print(f"{'FP32 (PyTorch eager)':28}{fp32:10.2f}{fp32_bytes:18,d}{t_eager:12.3f}")
    print(f"{'int8 (onnxruntime, MLAS)':28}{ort_top1:10.2f}{ort.weight_bytes:18,d}{t_ort:12.3f}")
    print(f"{'FP32 (TVM, untuned)':28}{'':>10}{base.weight_bytes:18,d}{t_fp32:12.3f}")
    print(f"{'FGQ fake-quant (PyTorch)':28}{fq:10.2f}{'':>18}{'':>12}")
    print(f"{'FGQ compiled (TVM ' + art.target.name + ')':28}{tvm_top1:10.2f}{art.weight_bytes:18,d}{t_fgq:12.3f}")
    print(f"\ncompiled vs fake-quant predictions agree on {agree:.2f}% of {len(pred)} images; "
          f"weights {fp32_bytes / max(art.weight_bytes, 1):.1f}x smaller than FP32 and "
          f"{ort.weight_bytes / max(art.weight_bytes, 1):.1f}x smaller than onnxruntime int8; latency "
          f"{t_fgq / t_ort:.2f}x onnxruntime int8's and {t_fgq / t_eager:.2f}x PyTorch's (same run)")


TRAINED_SCHEMES = ("inq", "sq", "pact")


def _training_config(a: argparse.Namespace):
    """The INQ / SQ / PACT configuration object from the command line."""
    def ratios(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            _err(f"--schedule/--portions must be comma-separated numbers, e.g. 0.5,0.75,0.875,1, got {text!r}")

    try:
        if a.scheme == "inq":
            try:
                from tvm_lowbit.quantizers.inq import INQ
            except ImportError as e:
                _err(f"INQ is not available in this build yet (tvm_lowbit.quantizers.inq: {e}); "
                     "use --scheme sq, pact or fgq")
            kw = {"bits": a.bits if a.bits is not None else 5}
            if a.portions:
                kw["portions"] = ratios(a.portions)
            if a.strategy:
                kw["strategy"] = a.strategy
            return INQ(**kw)
        if a.scheme == "sq":
            from tvm_lowbit.quantizers.sq import SQ

            kw = {"inner": a.inner, "group_size": a.group_size, "prob": a.prob, "rule": a.rule, "seed": a.seed,
                  "first_layer": "float" if a.first_layer == "float" else "sq",
                  "last_layer": "float" if a.last_layer == "float" else "sq", "act_bits": a.act_bits}
            if a.portions:
                kw["schedule"] = ratios(a.portions)
            return SQ(**kw)
        from tvm_lowbit.quantizers.pact import PACT

        bits = a.bits if a.bits is not None else 4
        return PACT(act_bits=bits, weight_bits=a.weight_bits or bits,
                    first_layer="float" if a.first_layer == "float" else "pact",
                    last_layer="float" if a.last_layer == "float" else "pact")
    except (ValueError, TypeError) as e:
        _err(str(e))


def cmd_quantize(a: argparse.Namespace) -> None:
    from tvm_lowbit import quantize
    from tvm_lowbit.compiler import save_quantized

    from tvm_lowbit.quantizers import registered_schemes

    out_path = _checked(lambda: safe_io.check_output_file(a.out, a.force, "--out", ours=(".pt2",)))
    model, calib = _model_calib(a)  # a model file (--model path.py:factory) may register its own schemes
    schemes = registered_schemes()
    if a.scheme not in schemes and a.scheme not in TRAINED_SCHEMES:
        _err(f"unknown scheme {a.scheme!r}: available: {', '.join([*schemes, *TRAINED_SCHEMES])} (a scheme registered with "
             "tvm_lowbit.register_scheme in the --model file is available too)")
    if a.config is not None and a.scheme not in TRAINED_SCHEMES:
        q = quantize(model, _config_file(a.config, a.scheme), calib)
    elif a.scheme == "fgq":
        q = quantize(model, _fgq_from_args(a), calib)
    elif a.scheme == "auto":
        q = _quantize_auto(a, model, calib)
    elif a.scheme not in TRAINED_SCHEMES:
        q = quantize(model, schemes[a.scheme](), calib)  # a registered post-training scheme, default config
    else:
        import torch

        from tvm_lowbit import data
        from tvm_lowbit.quantizers.train import flip_crop, train

        cfg = _config_file(a.config, a.scheme) if a.config is not None else _training_config(a)
        if a.from_scratch:
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        x, y = data.load("train", limit=a.subset)
        xv, yv = data.load("test", limit=a.val_size)
        ckpt = a.checkpoint_dir or (a.out + ".ckpt")
        print(f"training {a.model} with {cfg} on {len(x)} Fashion-MNIST images, {a.epochs} epoch(s) per stage; "
              f"checkpoints in {ckpt}", flush=True)
        res = train(model, cfg, (x, y), (xv, yv), epochs_per_stage=a.epochs, lr=a.lr, batch_size=a.batch_size,
                    lr_schedule=a.lr_schedule, checkpoint_dir=ckpt, device=a.device, seed=a.seed,
                    augment=flip_crop(pad_value=(0.0 - data.MEAN) / data.STD))
        model = model.cpu().eval()
        q = res["hook"].export(calib)
        with torch.no_grad():
            pred = torch.cat([q(torch.from_numpy(xv[i:i + 500])).argmax(1) for i in range(0, len(xv), 500)])
        print(f"fake-quant model: top-1 {100.0 * float((pred.numpy() == yv).mean()):.2f}% on {len(xv)} test images")
    out = save_quantized(q, calib[:a.batch], out_path, force=a.force)
    print(f"saved quantized model to {out} (input shape {tuple(calib[:a.batch].shape)})")


def _config_file(path: str, scheme: str):  # -> SchemeConfig
    """``--config FILE.json``: a scheme config as ``SchemeConfig.to_dict`` writes it, for ``--scheme``."""
    import json

    from tvm_lowbit.quantizers import config_from_dict

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        _err(f"--config {path}: not a readable JSON file ({type(e).__name__}: {_one_line(e)})")
    if isinstance(d, dict) and "scheme" not in d:
        d = {"scheme": scheme, "version": 1, **d}
    if not isinstance(d, dict) or d.get("scheme") != scheme:
        _err(f"--config {path}: a {scheme} config is a JSON object with \"scheme\": \"{scheme}\" "
             f"(got {d.get('scheme') if isinstance(d, dict) else type(d).__name__!r})")
    try:
        return config_from_dict(d)
    except (ValueError, TypeError) as e:
        _err(f"--config {path}: {_one_line(e)}")


def _quantize_auto(a: argparse.Namespace, model, calib: np.ndarray):  # -> nn.Module
    """``--scheme auto``: per-layer formats under ``--budget``, verified on the validation data."""
    import json

    from tvm_lowbit import quantize
    from tvm_lowbit.quantizers.auto import Auto, BudgetError

    cost: object = a.cost
    if a.cost != "bytes":
        if not Path(a.cost).is_file():
            _err(f"--cost {a.cost!r}: use 'bytes' or a JSON file mapping format -> cost per weight")
        try:
            cost = json.loads(Path(a.cost).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            _err(f"--cost {a.cost}: not valid JSON ({_one_line(e)}); give a JSON object format -> cost per weight")
    if a.val:
        if not Path(a.val).is_file():
            _err(f"--val {a.val}: no such file (an .npz with arrays x and y)")
        try:
            arrs = np.load(a.val, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, BadZipFile...
            _err(f"--val {a.val}: not a NumPy .npz archive ({type(e).__name__}: {_one_line(e)})")
        if not isinstance(arrs, np.lib.npyio.NpzFile) or "x" not in arrs:
            _err(f"--val {a.val}: the .npz needs an array 'x' of inputs (and 'y' of labels for a drop budget)")
        val = (arrs["x"].astype(np.float32)[:a.val_size], arrs["y"][:a.val_size] if "y" in arrs else None)
    elif ":" in a.model:
        _err("--scheme auto needs validation data for your model: pass --val VAL.npz (arrays x and y, "
             "held out from training and calibration)")
    else:
        from tvm_lowbit.models.mobilenet import validation_split

        val = validation_split(a.val_size)
    try:
        budget: object = float(a.budget)
    except ValueError:
        budget = a.budget
    kw = {"formats": tuple(f.strip() for f in a.formats.split(","))} if a.formats else {}
    try:
        cfg = Auto(budget=budget, cost=cost, act_bits=a.act_bits, **kw)
    except (ValueError, TypeError) as e:
        _err(str(e))
    print(f"searching per-layer formats of {a.model} under the budget {budget} on {len(val[0])} validation "
          "images", flush=True)
    try:
        q = quantize(model, cfg, calib, val)
    except BudgetError as e:
        print(e.best.sensitivity.table())
        _err(str(e))
    res = q.tvm_lowbit_auto
    print(res.sensitivity.table())
    print(res.table())
    print(res.summary())
    if a.heatmap:
        print(f"wrote the sensitivity heat map to {res.sensitivity.plot(a.heatmap)}")
    return q


def cmd_compile(a: argparse.Namespace) -> None:
    from tvm_lowbit.backends import backend_for, source_of
    from tvm_lowbit.compiler import compile_saved
    from tvm_lowbit.targets import TargetError, load_target

    try:
        spec = load_target(a.target)
        backend = backend_for(spec)
    except TargetError as e:
        _err(str(e))
    _fgq_from_args(a)  # bad FGQ options fail here, also for a .pt2 that was quantized already
    out_dir = _checked(lambda: safe_io.check_output_dir(a.out, a.force, "--out"))  # before minutes of compiling
    src, source = a.model, source_of(a.model)
    sched = {"auto": None, "none": False}.get(a.schedules, a.schedules)
    if (why := backend.cli_refusal(spec, source, None if sched in (None, False) else a.schedules)) is not None:
        _err(why)
    if source == "onnx":
        from tvm_lowbit.onnx_quant import quantize_onnx

        _check_onnx(src)
        calib = _calib(a.calib, a.calib_size, a.allow_degenerate_calib)
        art = quantize_onnx(src, _fgq_from_args(a), calib, target=a.target, batch=a.batch)
    elif source == "pt2":
        art = compile_saved(src, a.target, schedules=sched, verbose=False)
    else:
        model, calib = _model_calib(a)
        art = backend.compile_for_cli(model, _fgq_from_args(a), calib, spec, a.batch, sched)
    print(art.report.text())
    if art.tuning is not None:
        print(art.tuning.text())
    elif sched is None and (note := backend.schedules_note(spec)) is not None:
        print(f"note: {note}")
    out = art.export(out_dir, force=a.force)
    print(f"wrote {out}/model.so for {art.target.name} ({art.target.description}); weights {art.weight_bytes:,d} bytes")


def _board_and_host_builds(a: argparse.Namespace, host: bool):  # -> (board Artifact, host Artifact | None, input)
    """The model compiled for ``a.target`` (and for this x86 host, to compare with), and the input to run."""
    import tvm_lowbit
    from tvm_lowbit.compiler import build, compile_saved
    from tvm_lowbit.targets import TargetError, load_target

    try:
        spec = load_target(a.target)
    except TargetError as e:
        _err(str(e))
    cfg = _fgq_from_args(a)
    src = a.model
    if src.endswith(".pt2"):
        art = compile_saved(src, spec)
        host_art = compile_saved(src, "x86-host") if host else None
    elif src.endswith(".onnx"):
        from tvm_lowbit.onnx_quant import quantize_onnx_module

        _check_onnx(src)
        mod, infos = quantize_onnx_module(src, cfg, _calib(a.calib, a.calib_size, a.allow_degenerate_calib), a.batch)
        shape = tuple(int(d) for d in mod["main"].params[0].ty.shape)
        art = build(mod, spec, infos, shape)
        host_art = build(mod, "x86-host", infos, shape) if host else None
    else:
        from tvm_lowbit import quantize

        model, calib = _model_calib(a)
        q = quantize(model, cfg, calib)
        art = tvm_lowbit.compile(q, calib[:a.batch], spec)
        host_art = tvm_lowbit.compile(q, calib[:a.batch], "x86-host") if host else None
    shape = tuple(art.input_shape)
    if a.input:
        x = _load_npy(a.input, "--input").astype(np.float32)
        if tuple(x.shape) != shape:
            _err(f"{a.input} has shape {tuple(x.shape)}, the model was compiled for {shape}")
    elif shape[1:] == (1, 28, 28):  # the built-in models' Fashion-MNIST input
        from tvm_lowbit import data

        x = data.load("test", limit=shape[0])[0]
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return art, host_art, x


def cmd_deploy(a: argparse.Namespace) -> None:
    from tvm_lowbit.deploy.remote import Board, check_reachable, deploy_artifact
    from tvm_lowbit.targets import TargetError, load_target

    board = Board(tracker=a.tracker, key=a.key, host=a.host, port=a.port, wait_s=a.wait,
                  step_timeout_s=a.timeout, retries=a.retries)
    try:
        check_reachable(board, a.key or load_target(a.target).name)  # before minutes of compiling
    except TargetError as e:
        _err(str(e))
    print(f"[1/2] compiling for {a.target}" + ("" if a.no_compare else " and for this host"), flush=True)
    art, host_art, x = _board_and_host_builds(a, not a.no_compare)
    print(f"      {art.report.text()}", flush=True)
    print(f"[2/2] deploying to {board.describe(a.key or art.target.name)}", flush=True)
    rep = deploy_artifact(art, x, board, host_output=None if host_art is None else host_art.run(x),
                          repeat=a.repeat, on_step=lambda step: print(f"      {step}", flush=True))
    print(rep.text())
    if not rep.ok:
        _err(f"the board's output differs from the host's by {rep.max_abs_diff:.3g} (tolerance {rep.tolerance:.3g})")


def cmd_export(a: argparse.Namespace) -> None:
    from tvm_lowbit.deploy.bundle import export_bundle
    from tvm_lowbit.deploy.remote import REL_TOLERANCE

    _checked(lambda: safe_io.check_output_dir(a.bundle, a.force, "--bundle"))  # before minutes of compiling
    art, host_art, x = _board_and_host_builds(a, not a.no_check)
    expected = None if host_art is None else host_art.run(x)
    atol = 0.0 if expected is None else REL_TOLERANCE * max(float(np.abs(expected).max()), 1.0)
    out = export_bundle(art, a.bundle, x, expected, atol, force=a.force)
    print(art.report.text())
    print(f"wrote {out}: model.so, bin/lowbit_runner and lib/ (TVM runtime) for {art.target.name} "
          f"({art.target.description}); copy the folder to the board and run ./run.sh there")


def cmd_tune(a: argparse.Namespace) -> None:
    from tvm_lowbit.backends import backend_for
    from tvm_lowbit.targets import TargetError, load_target

    try:
        spec = load_target(a.target)
        backend = backend_for(spec)
    except TargetError as e:
        _err(str(e))
    if (why := backend.tune_refusal(spec)) is not None:
        _err(why)
    if a.out is not None and Path(a.out).exists() and not Path(a.out).is_dir():
        _err(f"--out {a.out}: exists and is not a folder (the tuning database is a folder)")
    boards = None
    if a.tracker:
        host, _, port = a.tracker.rpartition(":")
        from tvm_lowbit.tune import RPCBoards

        boards = RPCBoards(host, int(port), a.key or spec.name, a.parallel)
    elif not spec.is_host:
        from tvm_lowbit.tune import TuneError, measurement

        try:  # the emulated Pis tune on the cycle estimate without boards
            estimated = measurement(spec, None) == "estimate"
        except TuneError:
            estimated = False
        if not estimated:
            _err(f"{spec.name} is a board: tune through an RPC tracker with --tracker HOST:PORT --key KEY "
                 "(the emulated board: scripts/board/board.py)")
    if a.model.endswith(".pt2"):
        from tvm_lowbit.compiler import load_saved

        mod, infos, _ = load_saved(a.model)
    else:
        import torch

        from tvm_lowbit import quantize
        from tvm_lowbit.compiler import import_torch, layer_infos

        model, calib = _model_calib(a)
        q = quantize(model, _fgq_from_args(a), calib)
        mod, infos = import_torch(q, torch.as_tensor(calib[:a.batch])), layer_infos(q)
    rep = backend.tune_module(mod, spec, infos=infos, trials_per_task=a.trials, work_dir=a.out, boards=boards,
                              only_kernels=a.kernels_only, seed=a.seed, estimate_workers=a.parallel)
    print(rep.text())
    if rep.failed:
        print(f"{rep.failed} candidates failed and were recorded as failed; first error: "
              f"{rep.errors[0].strip().splitlines()[-1]}")


def cmd_targets(_a: argparse.Namespace) -> None:
    from tvm_lowbit.targets import available, load_target

    for name in available():
        t = load_target(name)
        print(f"{name:10} {t.description}")


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="tvm-lowbit", description="Low-bit quantization and compilation with TVM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="quantize the built-in model with FGQ, compile, evaluate: accuracy, size, speed")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--target", default="x86-host")
    p.add_argument("--limit", type=POSITIVE, default=None, help="test images (default: all 10,000)")
    p.add_argument("--batch", type=POSITIVE, default=100, help="batch size of the accuracy build")
    p.add_argument("--repeat", type=POSITIVE, default=30, help="timing repetitions")
    _add_fgq_args(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("quantize", help="quantize a model and save it as a torch.export .pt2")
    p.add_argument("--scheme", default="fgq",
                   help="fgq (post-training) | auto (per-layer formats under --budget) | inq | sq | pact (trained here)"
                        " | a scheme your --model file registers")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="the scheme's config as JSON (the fields of its config class, as to_dict writes them); "
                        "replaces the scheme's command-line options")
    p.add_argument("--model", default="resnet20", help="built-in name or path/to/file.py:factory")
    p.add_argument("--out", required=True, help="the .pt2 file to write (an existing .pt2 is replaced)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a .pt2 file")
    p.add_argument("--batch", type=POSITIVE, default=1, help="batch size the saved program is exported with")
    _add_fgq_args(p)
    g = p.add_argument_group("auto (one weight format per layer, the cheapest mix inside an accuracy budget)")
    g.add_argument("--budget", default="1.0",
                   help="max top-1 drop in points vs FP32 on the validation data (e.g. 1.0), or agree>=99.5 "
                        "(min %% of predictions equal to FP32's)")
    g.add_argument("--cost", default="bytes", help="bytes (weight bytes), or a JSON file: format -> cost per weight")
    g.add_argument("--formats", default=None,
                   help="candidate formats, comma-separated (default ternary-n16,ternary,pow2-3,pow2-4,pow2-5,"
                        "int4,int8,float)")
    g.add_argument("--val", default=None,
                   help=".npz with x (inputs) and y (labels) held out from training (default: the last 5000 "
                        "Fashion-MNIST training images, which the built-in mobilenet never saw)")
    g.add_argument("--heatmap", default=None, help="save the layer x format sensitivity heat map (PNG) here")
    t = p.add_argument_group("training (inq, sq, pact; starts from the model's weights)")
    t.add_argument("--epochs", type=POSITIVE, default=1, help="epochs per stage (default 1)")
    t.add_argument("--subset", type=POSITIVE, default=None, help="train on the first N training images (CPU budgets)")
    t.add_argument("--val-size", type=POSITIVE, default=2000,
                   help="test images for the accuracy printed per stage; auto: validation images")
    t.add_argument("--lr", type=_positive_float, default=0.01, help="peak learning rate per stage (default 0.01, fine-tuning)")
    t.add_argument("--lr-schedule", default="cosine",
                   help="cosine | onecycle (restarted every stage) | cosine-run (one cosine over all stages)")
    t.add_argument("--batch-size", type=POSITIVE, default=128)
    t.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    t.add_argument("--seed", type=NON_NEGATIVE, default=0)
    t.add_argument("--checkpoint-dir", default=None, help="default OUT.ckpt; an existing checkpoint is resumed")
    t.add_argument("--from-scratch", action="store_true", help="re-initialize the model before training")
    t.add_argument("--bits", type=POSITIVE, default=None, help="inq: weight bits (default 5); pact: k (default 4)")
    t.add_argument("--weight-bits", type=POSITIVE, default=None, help="pact: weight bits (default: --bits)")
    t.add_argument("--portions", default=None, help="inq: accumulated portions; sq: ratio schedule (e.g. 0.5,0.75,0.875,1)")
    t.add_argument("--strategy", default=None, help="inq: partition strategy")
    t.add_argument("--inner", default="twn", help="sq: twn | bwn | fgq")
    t.add_argument("--prob", default="linear", help="sq: linear | constant | softmax | sigmoid")
    t.add_argument("--rule", default="paper", help="sq: paper | code (selection rule)")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("compile", help="compile a quantized .pt2, an ONNX model or a built-in model")
    p.add_argument("model", help="MODEL.pt2 (from `quantize`), MODEL.onnx (quantized here), or a built-in name")
    p.add_argument("--target", default="x86-host")
    p.add_argument("--out", required=True, help="artifact folder (model.so + meta.json); must be new, empty or an "
                   "earlier artifact")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files tvm_lowbit did not write")
    p.add_argument("--batch", type=POSITIVE, default=1)
    p.add_argument("--schedules", default="auto",
                   help="tuning database folder to apply; auto (default): the shipped tvm_lowbit/schedules/<target>/ "
                        "unless it was tuned under emulation; none: default schedules")
    _add_fgq_args(p)
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("deploy", help="compile for a board, run it there over TVM RPC, compare with this host, time it")
    p.add_argument("model", nargs="?", default="resnet20", help="built-in name, path/to/file.py:factory, MODEL.pt2 or MODEL.onnx")
    p.add_argument("--target", default="rasp4b", help="the board's target (default rasp4b)")
    p.add_argument("--tracker", type=_host_port, default=None, help="HOST:PORT of a TVM RPC tracker (else connect to --host/--port)")
    p.add_argument("--key", default=None, help="the board's tracker key (default: the target name)")
    p.add_argument("--host", default="127.0.0.1", help="RPC server address for a direct connection")
    p.add_argument("--port", type=PORT, default=9090, help="RPC server port for a direct connection")
    p.add_argument("--repeat", type=POSITIVE, default=10, help="timed runs on the board (default 10)")
    p.add_argument("--wait", type=_positive_float, default=60.0, help="seconds to wait for the tracker and a free board")
    p.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds one remote step (upload, run) may take")
    p.add_argument("--retries", type=NON_NEGATIVE, default=2, help="new attempts after a lost board or a timeout")
    p.add_argument("--no-compare", action="store_true", help="skip the host build and comparison")
    p.add_argument("--input", default=None, help=".npy input of the compiled shape (default: test images)")
    p.add_argument("--batch", type=POSITIVE, default=1)
    _add_fgq_args(p)
    p.set_defaults(fn=cmd_deploy)
    p = sub.add_parser("export", help="a self-contained bundle for a board: model.so, the TVM runtime, a C++ runner")
    p.add_argument("model", nargs="?", default="resnet20", help="built-in name, path/to/file.py:factory, MODEL.pt2 or MODEL.onnx")
    p.add_argument("--target", default="rasp4b", help="an aarch64 board target (default rasp4b)")
    p.add_argument("--bundle", required=True, help="output folder; must be new, empty or an earlier bundle")
    p.add_argument("--force", action="store_true", help="replace --bundle even if it holds files tvm_lowbit did not write")
    p.add_argument("--no-check", action="store_true", help="no host build: the bundle carries no expected output")
    p.add_argument("--input", default=None, help=".npy input of the compiled shape (default: test images)")
    p.add_argument("--batch", type=POSITIVE, default=1)
    _add_fgq_args(p)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("tune", help="autotune a model's kernels and float ops with MetaSchedule (XGBoost); "
                                    "`compile` then applies tvm_lowbit/schedules/<target>/")
    p.add_argument("model", nargs="?", default="resnet20", help="MODEL.pt2 (from `quantize`) or a built-in name")
    p.add_argument("--target", default="x86-host")
    p.add_argument("--trials", type=POSITIVE, default=32, help="measured candidates per task (default 32); a rerun "
                   "only runs the trials a task still lacks")
    p.add_argument("--out", default=None, help="database folder (default tvm_lowbit/schedules/<target>/)")
    p.add_argument("--kernels-only", action="store_true", help="tune the low-bit kernels only, not the float ops")
    p.add_argument("--tracker", type=_host_port, default=None, help="HOST:PORT of a TVM RPC tracker with the boards (board targets)")
    p.add_argument("--key", default=None, help="the boards' tracker key (default: the target name)")
    p.add_argument("--parallel", type=POSITIVE, default=1, help="boards measuring at once (default 1; without "
                   "--tracker on rasp4b/rasp5: warm emulated boards timing candidates on the cycle estimate)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=None)
    p.add_argument("--batch", type=POSITIVE, default=1)
    _add_fgq_args(p)
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("targets", help="list the targets (tvm_lowbit/targets/*.json)")
    p.set_defaults(fn=cmd_targets)
    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except KeyboardInterrupt:
        _err("interrupted", 130)
    except (ValueError, TypeError, OSError, RuntimeError, KeyError) as e:
        if os.environ.get("TVM_LOWBIT_TRACEBACK"):
            raise
        _err(_one_line(e) if isinstance(e, (ValueError, RuntimeError, OSError)) and str(e)
             else f"{type(e).__name__}: {_one_line(e)}")
    except Exception as e:  # noqa: BLE001 - never a traceback from inside TVM, torch or numpy
        if os.environ.get("TVM_LOWBIT_TRACEBACK"):
            raise
        _err(f"unexpected {type(e).__name__}: {_one_line(e)} (set TVM_LOWBIT_TRACEBACK=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
