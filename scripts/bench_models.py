"""Real models through tvm_lowbit: quantize, compare with FP32, compile, compare with the fake-quant model.

Models (``tvm_lowbit/models``): the torchvision zoo (random weights, batch norm calibrated on photos),
EfficientNet-Lite2 with its real ImageNet weights (``efficientnet-lite2-pad``: the same network with its
``Conv2dStaticSamePadding`` convs rewritten as ZeroPad2d + nn.Conv2d, a user-side workaround that shows
what fails after the padding failure), and paraphrase-MiniLM-L3-v2 (ONNX, and its PyTorch port).  CNNs are
evaluated on views of real photos (``models/photos.py``; calibration photos are held apart from the
evaluation photos); MiniLM on a handful of real sentences.

Variants: ``fp32``; ``ort-int8`` (ONNX Runtime: static QDQ, per-channel, s8s8, MinMax, calibrated on the
calibration photos, for CNNs; dynamic int8 for the transformer); ``int8`` (``Auto(formats=["int8"])``, see ``int8_config``);
``fgq-n4`` (``FGQ(group_size=4)``); ``auto`` (``Auto(budget="agree>=90")`` for CNNs, int4 / int8 / float per layer, checked on 36
views of each calibration photo with one standard error to spare, see ``auto_config``; ``"cos>=0.98"`` for MiniLM, see ``minilm_auto_config``: fitted on 96 calibration sentences, checked on
the other 32 with a margin); budgets are never checked on the evaluation inputs.  MiniLM's ``int8`` and
``auto`` smooth Linear input outliers into the weights first (``quantizers.smoothing``, alpha 0.8).

Each row: ``metric`` ``agree_top1`` (percent of evaluation views whose argmax equals FP32's) or
``cos_min`` (lowest per-sentence cosine of the mean-pooled embedding to FP32's); ``avg_weight_bits``
(bits of the compiled model's constants per conv/linear weight, so biases and scales count too; 8 for
ORT's int8); ``quantize_s``; ``compiled_agree`` (percent of inputs where the compiled model's argmax
equals the fake-quant model's; for MiniLM the lowest cosine of the compiled embeddings to the
fake-quant model's); ``target`` (``x86``: built and run here; ``rasp5``: built, and its bundle run on the
emulated Pi 5, Cortex-A76 under qemu-user, on the first ``--board-views`` inputs; ``--board-views 0``: build
only, ``compiled_agree`` empty; MiniLM's rasp5 rows are build only).  A step that fails fills ``error``
(exception text and the innermost tvm_lowbit frame) instead of stopping the run.  Extra fields: ``n``
(inputs), ``kl`` (mean KL of the softmax to FP32's), ``max_abs_diff`` (compiled vs fake-quant outputs),
``bit_identical`` (percent of inputs whose compiled outputs equal the fake-quant outputs bit for bit: 100
expected where the model is integer end to end, e.g. int8 with an int8 classifier), ``float_layers`` (every
conv/linear left float, named: the quantizer's ``path (class): why`` and the compiler's fallbacks),
``board_s`` (wall seconds on the emulated board), ``cos_mean``, ``weight_bytes`` (MiniLM: the compiled model's
constant bytes, its int8 word-embedding table included; ORT: the int8 ``.onnx`` file).  MiniLM's rows come
from its PyTorch port packed into one float input (``models/minilm.PackedMiniLM``: the pooled embedding
is the model output, so Auto's cos budget and the compiled model see the issue's metric); quantizing
the two-input encoder with (ids, mask) directly is covered by tests/test_zoo.py.

    python scripts/bench_models.py --quick --json bench-models.json
    python scripts/bench_models.py --models efficientnet-lite2 --variants fp32,ort-int8,int8,fgq-n4
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit.deploy.board import board_exec, qemu_cpu
from tvm_lowbit.deploy.bundle import export_bundle
from tvm_lowbit.formats import avg_weight_bits, model_weight_bytes, parse_format
from tvm_lowbit.models import efficientnet_lite, minilm, photos, zoo
from tvm_lowbit.quantizers.embedding import QEmbedding, embedding_bytes
from tvm_lowbit.quantizers.auto import parse_budget

CNNS = (*zoo.ARCHS, "efficientnet-lite2", "efficientnet-lite2-pad")
MODELS = (*CNNS, "minilm")
VARIANTS = ("fp32", "ort-int8", "int8", "fgq-n4", "auto")
TARGETS = {"x86": "x86-host", "rasp5": "rasp5"}
CNN_AUTO_BUDGET = "agree>=90"
MINILM_AUTO_BUDGET = "cos>=0.98"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def error_text(e: BaseException, step: str) -> str:
    """``step: Type: message (innermost tvm_lowbit frame)``, one line."""
    where = ""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if "tvm_lowbit" in fr.filename and "bench_models" not in fr.filename:
            where = f" (at {fr.filename.split('tvm_lowbit/')[-1]}:{fr.lineno} in {fr.name})"
            break
    msg = " ".join(str(e).split())
    return f"{step}: {type(e).__name__}: {msg[:600]}{where}"


class QuantizeTimeout(Exception):
    """A quantization ran past ``--max-quantize-s``; the traceback shows where it was."""


class time_limit:
    """Raise :class:`QuantizeTimeout` in the main thread after ``seconds`` (SIGALRM; 0 = no limit)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def _fire(self, signum: int, frame: Any) -> None:
        raise QuantizeTimeout(f"still running after --max-quantize-s={self.seconds}s; stopped")

    def __enter__(self) -> "time_limit":
        if self.seconds > 0:
            signal.signal(signal.SIGALRM, self._fire)
            signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds > 0:
            signal.alarm(0)


MAX_QUANTIZE_S = 0  # set from --max-quantize-s


@dataclass
class Row:
    model: str
    variant: str
    metric: str
    value: float | None = None
    avg_weight_bits: float | None = None
    quantize_s: float | None = None
    compiled_agree: float | None = None
    target: str = "x86"
    error: str | None = None
    n: int | None = None
    kl: float | None = None
    max_abs_diff: float | None = None
    cos_mean: float | None = None
    direct_error: str | None = None   # older runs (MiniLM): what the direct calls raised
    bit_identical: float | None = None  # percent of inputs whose outputs equal the fake-quant's bit for bit
    float_layers: list[str] | None = None  # layers left float: quantizer's (path (class): why) + compiler's
    board_s: float | None = None      # wall seconds of the emulated-board runs (rasp5)
    weight_bytes: int | None = None   # MiniLM: bytes of the compiled model's constants (ORT: the int8 .onnx file)
    quantize_cpu_s: float | None = None  # process CPU seconds (all threads) of the quantization

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        return {k: v for k, v in d.items() if v is not None or k in
                ("value", "avg_weight_bits", "quantize_s", "compiled_agree")}

    def add_error(self, text: str) -> None:
        self.error = text if self.error is None else f"{self.error}; {text}"


class Results:
    def __init__(self, path: str | None) -> None:
        self.rows: list[Row] = []
        self.path = path

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.save()
        status = f"ERROR {row.error}" if row.error else ""
        log(f"row {row.model} {row.variant} {row.target}: {row.metric}={_fmt(row.value)} "
            f"bits={_fmt(row.avg_weight_bits)} q={_fmt(row.quantize_s)}s compiled_agree={_fmt(row.compiled_agree)} {status}")

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps({"rows": [r.as_dict() for r in self.rows]}, indent=1))


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


# --------------------------------------------------------------------------------------------
# CNNs on photo views
# --------------------------------------------------------------------------------------------

@dataclass
class CnnCase:
    name: str
    model: nn.Module
    calib: torch.Tensor       # calibration-photo views (also Auto's budget check)
    evalx: torch.Tensor       # evaluation-photo views


def load_cnn(name: str, size: int, eval_per_photo: int, calib_per_photo: int) -> CnnCase:
    if name.startswith("efficientnet-lite2"):
        s = efficientnet_lite.SIZE
        calib = efficientnet_lite.normalize(photos.views("calib", s, calib_per_photo))
        evalx = efficientnet_lite.normalize(photos.views("eval", s, eval_per_photo))
        model = efficientnet_lite.load()
        if name.endswith("-pad"):  # user-side workaround of the padding failure, to measure what follows it
            model = efficientnet_lite.explicit_padding(model)
        return CnnCase(name, model, calib, evalx)
    cal_imgs = photos.views("calib", size, calib_per_photo)
    model = zoo.load(name, size, calib_images=cal_imgs)
    return CnnCase(name, model, zoo.normalize(cal_imgs), zoo.normalize(photos.views("eval", size, eval_per_photo)))


def num_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@torch.no_grad()
def logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 16) -> np.ndarray:
    return np.concatenate([model(x[i:i + batch]).float().numpy() for i in range(0, len(x), batch)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def kl_mean(ref: np.ndarray, out: np.ndarray) -> float:
    lp, lq = log_softmax(ref), log_softmax(out)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def agree(a: np.ndarray, b: np.ndarray) -> float:
    return 100.0 * float((a.argmax(1) == b.argmax(1)).mean())


def run_compiled(art: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """The artifact (compiled for ``batch`` inputs) over all of ``x``; the last chunk is padded."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(art.run(chunk))[:n])
    return np.concatenate(outs)


def fake_quant_bits(model: nn.Module) -> float:
    """Average bits per conv/linear weight of the fake-quant model as it would be stored (codes, scale codes,
    per-channel scales; float layers 32): ``tvm_lowbit.formats.avg_weight_bits``, the figure Auto's budget
    search reports.  Biases and batch-norm constants are not counted (the compiled rows count them)."""
    return float(avg_weight_bits(model))


def compile_rows(res: Results, base: Row, model: nn.Module, x: torch.Tensor, want: np.ndarray, targets: list[str],
                 batch: int, nweights: int) -> None:
    """Build for each target and run: x86 here on every input, rasp5 on the emulated Pi 5 (``--board-views``
    inputs); agreement, max |diff| and bit-identical share against ``want`` (the fake-quant logits)."""
    xs = x.numpy()
    if not targets:  # --targets none: the fake-quant row alone (bits of its weights, no compiled constants)
        res.add(Row(**{**base.__dict__, "target": "none", "avg_weight_bits": fake_quant_bits(model)}))
    for t in targets:
        row = Row(**{**base.__dict__, "target": t})
        try:
            log(f"{base.model} {base.variant}: compiling for {TARGETS[t]}")
            tc = time.time()
            art = tvm_lowbit.compile(model, xs[:batch], TARGETS[t])
            log(f"{base.model} {base.variant}: compiled for {t} in {time.time() - tc:.0f}s "
                f"({art.weight_bytes} constant bytes)")
            if row.avg_weight_bits is None and nweights:
                row.avg_weight_bits = 8.0 * art.weight_bytes / nweights
            row.float_layers = float_layers(model, art)
            got, ref = None, want
            if t == "x86":
                got = run_compiled(art, xs, batch)
            elif BOARD_VIEWS != 0:
                tb = time.time()
                n = len(xs) if BOARD_VIEWS < 0 else min(BOARD_VIEWS, len(xs))
                log(f"{base.model} {base.variant}: running {n} inputs on the emulated {t} ({qemu_cpu(TARGETS[t])})")
                got, ref = run_on_board(art, xs[:n], batch, TARGETS[t]), want[:n]
                row.board_s, row.n = time.time() - tb, n
            if got is not None:
                row.compiled_agree = agree(got, ref)
                row.max_abs_diff = float(np.abs(got - ref).max())
                row.bit_identical = identical_share(got, ref)
        except Exception as e:  # noqa: BLE001 - the row records what broke
            row.add_error(error_text(e, f"compile {t}"))
        res.add(row)


BOARD_VIEWS = -1  # set from --board-views: inputs run on the emulated board (-1: all, 0: build only)


def run_on_board(art: Any, x: np.ndarray, batch: int, target: str) -> np.ndarray:
    """The board artifact (compiled for ``batch`` inputs) over all of ``x`` on the emulated board of
    ``target``: its bundle's C++ runner (``deploy.bundle``) under qemu-user, once per chunk of ``batch``
    (the last chunk padded), each chunk's input and output as raw float32 files."""
    outs = []
    with tempfile.TemporaryDirectory() as tmp:
        b = export_bundle(art, Path(tmp) / "bundle", x[:batch])
        runner = b / json.loads((b / "meta.json").read_text())["bundle"]["runner"]
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
            np.ascontiguousarray(chunk, np.float32).tofile(b / f"in{i}.bin")
            shape = "x".join(str(d) for d in chunk.shape)
            r = board_exec([str(runner), "model.so", f"in{i}.bin", shape, f"out{i}.bin", "--runs", "1"],
                           qemu_cpu(target), cwd=b, timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"the bundle runner failed on the emulated {target} (rc {r.returncode}): "
                                   f"{(r.stderr or r.stdout)[-400:]}")
            outs.append(np.fromfile(b / f"out{i}.bin", np.float32).reshape(batch, -1)[:n])
    return np.concatenate(outs)


def identical_share(got: np.ndarray, want: np.ndarray) -> float:
    """Percent of inputs whose every output value equals ``want``'s bit for bit (float32)."""
    g = np.ascontiguousarray(got, np.float32).reshape(len(got), -1)
    w = np.ascontiguousarray(want, np.float32).reshape(len(want), -1)
    return 100.0 * float((g.view(np.uint32) == w.view(np.uint32)).all(1).mean())


def float_layers(model: nn.Module, art: Any) -> list[str]:
    """Every conv/linear layer that stays float, named: the quantizer's (``tvm_lowbit_report.left_float``:
    path (class): why) and the compiler's fallbacks (a quantized layer the lowering kept in float)."""
    rep = getattr(model, "tvm_lowbit_report", None)
    names = [str(s) for s in rep.left_float] if rep is not None else []
    return names + [f"{name}: compiled in float: {why}" for name, why in art.report.fallback]


CALIBRATION = "best"  # per tensor, the one of minmax / percentile / mse / entropy with the least output error


def int8_config() -> tvm_lowbit.Auto:
    """Uniform int8 (w8a8) through the public API: Auto with one candidate format (no sensitivity pass,
    one build).  Activation clips chosen per tensor (``calibration="best"``): on EfficientNet-Lite2
    (96 evaluation / 96 calibration views) min-max and best keep FP32's top-1 on 90 of 96 views, MSE
    (the 8-bit default) on 88, entropy on 2."""
    return tvm_lowbit.Auto(budget="agree>=0", formats=("int8",), calibration=CALIBRATION)


AUTO_SENSITIVITY_IMAGES = 16  # the sensitivity pass only ranks layers; every mix is verified in full
AUTO_MAX_EVALS = 8            # mixes built and verified (each is a full build: ~8 network forwards)


# CNN Auto's candidate formats.  Below 5 average weight bits on EfficientNet-Lite2 the choice is int4
# or int8 per layer (float for the few tiny early layers): ternary / power-of-two weights cost each
# layer ~10x int4's output KL, and the one verified mix that took two ternary-n16 1x1 convs (4.57 bits,
# 90.3 % on the check views) kept FP32's top-1 on only 87.5 % of the evaluation views where the
# int4/int8 mix at 4.72 bits kept 93.75 % (docs/results-models.md, lite2-auto).  Fewer formats also
# make the sensitivity pass and the path (hence the binary search) shorter.  Alone it does not meet the
# floor: the search then chose 4.60 bits reading 90.3 % on the 72 check views and 86.5 % on the
# evaluation views (the check is too noisy at the budget line; see the doc).  ``int4-g0`` (int4 with one
# float32 scale per output channel) is the cheap option: int4 in groups of 32 also stores an 8-bit scale
# code per group, so an all-int4 Lite2 counts 4.54 bits as compiled and an all-int4-g0 one 4.17, which
# leaves the search 0.83 bits rather than 0.46 of int8/float upgrades under 5 (bit accounting only; the
# per-layer damage of each option on calibration photos decides which layers take it).
CNN_AUTO_FORMATS = ("int4-g0", "int4", "int8", "float")


AUTO_MARGIN = 0.0  # --auto-margin: points of agreement a CNN Auto mix must read above its budget on the check
# CNN Auto's check set: every distinct view of the calibration photos (``photos.view_list`` has 36 per photo;
# 432 views of the 12 photos), of which the first --calib-views per photo are the calibration inputs.  More
# views of the same photos are cheap (one forward each per verified mix) and cut the noise of an agreement
# reading: its binomial standard error at 92 % is 2.3 points on 144 views, 1.3 on 432 (views of one photo
# are correlated, so the true error is larger).  They stay calibration photos: the evaluation photos are
# never seen.
AUTO_CHECK_VIEWS = 36
# --auto-confidence: a CNN Auto mix must beat its budget by this many binomial standard errors of its
# (monotone-fitted) check reading (``Auto.confidence``).  One standard error: a one-sided ~84 % bound for
# independent views, chosen a priori (not fitted to any evaluation).
AUTO_CONFIDENCE = 1.0


def auto_config(budget: str) -> tvm_lowbit.Auto:
    """Auto with the per-tensor calibration of ``int8_config``, int4 / int8 / float per layer
    (``CNN_AUTO_FORMATS``), the sensitivity pass on 16 calibration inputs and at most 8 verified
    mixes, to fit issue 16's 20 minutes on a 5 M-parameter model; ``AUTO_MARGIN`` and
    ``AUTO_CONFIDENCE`` standard errors to spare on the check views (``auto_check_views``)."""
    cos = parse_budget(budget).kind == "cos"
    return tvm_lowbit.Auto(budget=budget, formats=CNN_AUTO_FORMATS, calibration=CALIBRATION,
                           sensitivity_images=AUTO_SENSITIVITY_IMAGES, max_evals=AUTO_MAX_EVALS,
                           margin=0.0 if cos else AUTO_MARGIN, confidence=0.0 if cos else AUTO_CONFIDENCE)


def auto_check_views(case: CnnCase) -> torch.Tensor:
    """CNN Auto's check set: ``AUTO_CHECK_VIEWS`` views of every calibration photo, normalized as
    ``load_cnn`` normalizes the calibration views (the first ones are those views)."""
    per_photo = max(AUTO_CHECK_VIEWS, len(case.calib) // len(photos.CALIB_PHOTOS))
    if case.name.startswith("efficientnet-lite2"):
        return efficientnet_lite.normalize(photos.views("calib", efficientnet_lite.SIZE, per_photo))
    return zoo.normalize(photos.views("calib", int(case.calib.shape[-1]), per_photo))


MINILM_SMOOTH_ALPHA = 0.8  # MiniLM int8, static activations, 16 eval sentences: none 0.9917, 0.5 0.981, 0.8 0.9968
MINILM_MARGIN = 0.005      # 32 check sentences read ~0.002 above the 16 evaluation ones (int4 / int4-g16, all layers)


def minilm_int8_config() -> tvm_lowbit.Auto:
    """``int8_config`` with the Linear input outliers smoothed into the weights first."""
    return tvm_lowbit.Auto(budget="agree>=0", formats=("int8",), calibration=CALIBRATION,
                           smooth_alpha=MINILM_SMOOTH_ALPHA)


def minilm_auto_config(budget: str) -> tvm_lowbit.Auto:
    """Auto for the transformer: int4 (groups of 32 or 16, GPTQ codes) or int8 per layer (ternary and
    power-of-two weights cost this model 0.72 / 0.51 cosine even as weights alone), smoothing first,
    the budget checked on the last quarter of the calibration sentences (no ``val_data``) and met
    with ``MINILM_MARGIN`` to spare."""
    return tvm_lowbit.Auto(budget=budget, formats=("int4", "int4-g16", "int8"), calibration=CALIBRATION,
                           sensitivity_images=AUTO_SENSITIVITY_IMAGES, max_evals=AUTO_MAX_EVALS,
                           smooth_alpha=MINILM_SMOOTH_ALPHA, margin=MINILM_MARGIN)


def quantize_variant(variant: str, case: CnnCase) -> nn.Module:
    if variant == "fgq-n4":
        return tvm_lowbit.quantize(case.model, tvm_lowbit.FGQ(group_size=4), case.calib, progress=True)
    if variant == "int8":
        return tvm_lowbit.quantize(case.model, int8_config(), case.calib, case.calib, progress=True)
    if variant == "auto":
        return tvm_lowbit.quantize(case.model, auto_config(CNN_AUTO_BUDGET), case.calib, auto_check_views(case),
                                   progress=True)
    raise ValueError(variant)


def ort_static_int8(model: nn.Module, calib: torch.Tensor) -> bytes:
    """ONNX Runtime static int8: QDQ, per-channel weights, s8 activations and weights, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{"x": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (calib[:1],), buf, input_names=["x"], output_names=["y"], dynamo=False,
                          opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, q = Path(tmp) / "raw.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        raw.write_bytes(buf.getvalue())
        quant_pre_process(str(raw), str(pre))
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return q.read_bytes()


def ort_run(model_bytes: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def bench_cnn(res: Results, name: str, variants: list[str], targets: list[str], size: int, eval_pp: int,
              calib_pp: int, batch: int) -> None:
    log(f"{name}: loading (views: {eval_pp}/eval photo, {calib_pp}/calibration photo)")
    try:
        case = load_cnn(name, size, eval_pp, calib_pp)
    except Exception as e:  # noqa: BLE001
        res.add(Row(name, "fp32", "agree_top1", error=error_text(e, "load")))
        return
    nw = num_weights(case.model)
    ref = logits(case.model, case.evalx)
    n = len(case.evalx)
    log(f"{name}: {nw / 1e6:.2f} M conv/linear weights, input {tuple(case.evalx.shape[1:])}, {n} eval views, "
        f"{len(case.calib)} calibration views; FP32 top-1 classes used: {len(set(ref.argmax(1).tolist()))}")
    for variant in variants:
        base = Row(name, variant, "agree_top1", n=n)
        if variant == "fp32":
            base.value, base.quantize_s, base.kl = 100.0, 0.0, 0.0
            compile_rows(res, base, case.model, case.evalx, ref, targets, batch, nw)
            continue
        if variant == "ort-int8":
            base.target, base.avg_weight_bits = "ort", 8.0
            try:
                t = time.time()
                qb = ort_static_int8(case.model, case.calib)
                base.quantize_s = time.time() - t
                out = ort_run(qb, {"x": case.evalx.numpy()})[0]
                base.value, base.kl = agree(out, ref), kl_mean(ref, out)
            except Exception as e:  # noqa: BLE001
                base.add_error(error_text(e, "ort-int8"))
            res.add(base)
            continue
        log(f"{name} {variant}: quantizing")
        t, tc = time.time(), time.process_time()
        try:
            with time_limit(MAX_QUANTIZE_S):
                q = quantize_variant(variant, case)
        except Exception as e:  # noqa: BLE001
            base.quantize_s, base.quantize_cpu_s = time.time() - t, time.process_time() - tc
            base.add_error(error_text(e, "quantize"))
            res.add(base)
            continue
        base.quantize_s, base.quantize_cpu_s = time.time() - t, time.process_time() - tc
        try:
            out = logits(q, case.evalx)
            base.value, base.kl = agree(out, ref), kl_mean(ref, out)
        except Exception as e:  # noqa: BLE001
            base.add_error(error_text(e, "fake-quant forward"))
            res.add(base)
            continue
        compile_rows(res, base, q, case.evalx, out, targets, batch, nw)


# --------------------------------------------------------------------------------------------
# MiniLM (ONNX, token ids + attention mask)
# --------------------------------------------------------------------------------------------

MINILM_WORD_PROBES = ("int4-g16", "int4-g8")  # word-table formats tried after the search (logged, not searched)


def minilm_word_table_probe(q: nn.Module, packed: nn.Module, x: torch.Tensor, ref: np.ndarray) -> None:
    """Log the evaluation cosine of ``q`` with its word table re-quantized in each ``MINILM_WORD_PROBES`` format
    (the search ran with the int8 table, so these figures were not checked by its budget)."""
    for fmt in MINILM_WORD_PROBES:
        qq = copy.deepcopy(q)
        qq.encoder.word = QEmbedding("encoder.word", packed.encoder.word, parse_format(fmt))
        with torch.no_grad():
            c = minilm.cosines(qq(x).numpy(), ref)
        log(f"minilm auto, word table {fmt} after the search (not checked by its budget): cos_min {c.min():.4f} "
            f"(mean {c.mean():.4f}); embedding tables {embedding_bytes(qq)[0]:,d} bytes")


def bench_minilm(res: Results, variants: list[str], targets: list[str]) -> None:
    """ORT: the ONNX file, dynamic int8.  tvm_lowbit: the PyTorch encoder packed into one float input
    (``minilm.PackedMiniLM``, mean-pooled embeddings out), whose embeddings give ``value``.  Calibration
    sentences (``CALIB_SENTENCES``) are held apart from the evaluation sentences."""
    name = "minilm"
    try:
        path = minilm.onnx_path()
        feed, cfeed = minilm.inputs(), minilm.inputs(minilm.CALIB_SENTENCES)
        ref = minilm.embed(path, feed)
        packed = minilm.PackedMiniLM(minilm.load_torch(path))
        x, xc = minilm.pack(feed), minilm.pack(cfeed)
    except Exception as e:  # noqa: BLE001
        res.add(Row(name, "fp32", "cos_min", error=error_text(e, "load")))
        return
    n = len(ref)
    nw = num_weights(packed)
    log(f"{name}: {path.name}, {n} sentences x {feed['input_ids'].shape[1]} tokens, {nw / 1e6:.2f} M linear weights")

    def cos_row(row: Row, emb: np.ndarray) -> None:
        c = minilm.cosines(emb, ref)
        row.value, row.cos_mean = float(c.min()), float(c.mean())

    def compile_cos(row: Row, model: nn.Module, want: np.ndarray) -> None:
        if not targets:  # --targets none: the fake-quant row alone (bits of its weights, no compiled constants)
            res.add(Row(**{**row.__dict__, "target": "none", "avg_weight_bits": fake_quant_bits(model)}))
        for t in targets:
            r = Row(**{**row.__dict__, "target": t})
            try:
                log(f"{name} {row.variant}: compiling for {TARGETS[t]}")
                art = tvm_lowbit.compile(model, x.numpy(), TARGETS[t])
                r.avg_weight_bits = 8.0 * art.weight_bytes / nw
                r.weight_bytes = art.weight_bytes
                r.float_layers = float_layers(model, art)
                log(f"{name} {row.variant} {t}: {art.weight_bytes:,d} constant bytes; embedding tables gathered "
                    f"from integers: {art.report.embeddings or 'none'}")
                if t == "x86":
                    got = np.asarray(art.run(x.numpy()))
                    r.compiled_agree = float(minilm.cosines(got, want).min())
                    r.max_abs_diff = float(np.abs(got - want).max())
                    r.bit_identical = identical_share(got, want)
            except Exception as e:  # noqa: BLE001
                r.add_error(error_text(e, f"compile {t}"))
            res.add(r)

    configs = {"int8": minilm_int8_config,
               "fgq-n4": lambda: tvm_lowbit.FGQ(group_size=4),
               "auto": lambda: minilm_auto_config(MINILM_AUTO_BUDGET)}
    for variant in variants:
        row = Row(name, variant, "cos_min", n=n)
        if variant == "fp32":
            row.value, row.cos_mean, row.quantize_s = 1.0, 1.0, 0.0
            with torch.no_grad():
                emb = packed(x).numpy()
            row.max_abs_diff = float(np.abs(emb - ref).max())  # PyTorch port vs the ONNX file
            compile_cos(row, packed, emb)
            continue
        if variant == "ort-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            row.target, row.avg_weight_bits = "ort", 8.0
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.time()
                    quantize_dynamic(str(path), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8)
                    row.quantize_s = time.time() - t
                    row.weight_bytes = (Path(tmp) / "q.onnx").stat().st_size
                    cos_row(row, minilm.embed(Path(tmp) / "q.onnx", feed))
            except Exception as e:  # noqa: BLE001
                row.add_error(error_text(e, "ort-int8 dynamic"))
            res.add(row)
            continue
        cfg = configs[variant]()
        log(f"{name} {variant}: quantizing the packed float-input model")
        t = time.time()
        try:
            with time_limit(MAX_QUANTIZE_S):
                # auto: no val_data, Auto checks its budget on held-out calibration sentences
                q = tvm_lowbit.quantize(packed, cfg, xc, xc, progress=True) if variant == "int8" else \
                    tvm_lowbit.quantize(packed, cfg, xc, progress=True)
            row.quantize_s = time.time() - t
            with torch.no_grad():
                emb = q(x).numpy()
            cos_row(row, emb)
            ebytes, entries = embedding_bytes(q)
            log(f"{name} {variant}: embedding tables {ebytes:,d} bytes for {entries:,d} entries as compiled; "
                f"conv/linear {fake_quant_bits(q):.2f} bits a weight; all weights and tables "
                f"{8.0 * (model_weight_bytes(q)[0] + ebytes) / (nw + entries):.2f} bits")
            if variant == "auto":
                minilm_word_table_probe(q, packed, x, ref)
        except Exception as e:  # noqa: BLE001
            row.quantize_s = time.time() - t
            row.add_error(error_text(e, "quantize(PackedMiniLM)"))
            res.add(row)
            continue
        compile_cos(row, q, emb)


# --------------------------------------------------------------------------------------------

def print_table(rows: list[Row]) -> None:
    head = f"{'model':<22} {'variant':<9} {'target':<6} {'metric':<10} {'value':>8} {'bits':>6} {'quant_s':>8} " \
           f"{'cpu_s':>7} {'comp_agree':>10} {'n':>4} {'max_diff':>9} {'bit_id%':>7} {'float':>5} {'kl':>8}  error"
    print(head)
    print("-" * len(head))
    for r in rows:
        err = (r.error or "")
        nfloat = "-" if r.float_layers is None else str(len(r.float_layers))
        print(f"{r.model:<22} {r.variant:<9} {r.target:<6} {r.metric:<10} {_fmt(r.value, 3 if r.metric == 'cos_min' else 1):>8} "
              f"{_fmt(r.avg_weight_bits):>6} {_fmt(r.quantize_s, 1):>8} {_fmt(r.quantize_cpu_s, 1):>7} "
              f"{_fmt(r.compiled_agree, 4 if r.metric == 'cos_min' else 1):>10} {r.n or '-':>4} "
              f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.2g}':>9} {_fmt(r.bit_identical, 1):>7} "
              f"{nfloat:>5} {_fmt(r.kl, 4):>8}  {err}")
    named = {(r.model, r.variant, f) for r in rows for f in (r.float_layers or [])}
    if named:
        print("\nlayers left float (model variant: layer (class): why):")
        for m, v, f in sorted(named):
            print(f"  {m} {v}: {f}")


def main(argv: list[str] | None = None) -> int:
    global MAX_QUANTIZE_S, BOARD_VIEWS, AUTO_MARGIN, AUTO_CHECK_VIEWS, AUTO_CONFIDENCE, CNN_AUTO_BUDGET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here (rewritten after every row)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)} "
                    "(default: all but auto with --quick, all otherwise)")
    ap.add_argument("--targets", default="x86,rasp5", help="x86 (build, run, compare) and/or rasp5 (build only); "
                    "none: no compile, the fake-quant rows alone (target 'none')")
    ap.add_argument("--quick", action="store_true", help="torchvision models at 64x64, 4 views per photo")
    ap.add_argument("--size", type=int, default=None, help="torchvision input size (default 224; 64 with --quick)")
    ap.add_argument("--eval-views", type=int, default=None, help="views per evaluation photo (default 8; 4 quick)")
    ap.add_argument("--calib-views", type=int, default=None, help="views per calibration photo (default 8; 4 quick)")
    ap.add_argument("--batch", type=int, default=8, help="batch the compiled models are built for")
    ap.add_argument("--board-views", type=int, default=-1, help="evaluation inputs the rasp5 build runs on the "
                    "emulated Pi 5 (qemu-user, the bundle runner; -1: all, 0: build only)")
    ap.add_argument("--max-quantize-s", type=int, default=0, help="stop a quantization after this many seconds "
                    "and record where it was as the row's error (0: no limit)")
    ap.add_argument("--auto-margin", type=float, default=0.0, help="CNN auto: points of agreement a mix must "
                    "read above the budget on the check views (their noise; default 0)")
    ap.add_argument("--auto-check-views", type=int, default=AUTO_CHECK_VIEWS, help="CNN auto: views per "
                    f"calibration photo it checks its budget on (1..36, default {AUTO_CHECK_VIEWS}; at least --calib-views)")
    ap.add_argument("--auto-confidence", type=float, default=AUTO_CONFIDENCE, help="CNN auto: binomial standard "
                    f"errors a mix must beat its budget by on the check views (default {AUTO_CONFIDENCE:g})")
    ap.add_argument("--auto-budget", default=CNN_AUTO_BUDGET, help="CNN auto: Auto's budget (default "
                    f"{CNN_AUTO_BUDGET!r}); e.g. 'cos>=0.99' for the random-weight torchvision models, whose top-1 "
                    "has near-ties on every photo (even int8 keeps 17-33 %% agreement there); --auto-margin and "
                    "--auto-confidence apply to agree/drop budgets only")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of these --json files "
                    "(merged, in order; with --json, also write the merged rows there)")
    a = ap.parse_args(argv)
    if a.table:
        merged = [Row(**r) for f in a.table for r in json.loads(Path(f).read_text())["rows"]]
        if a.json:
            Path(a.json).write_text(json.dumps({"rows": [r.as_dict() for r in merged]}, indent=1))
        print_table(merged)
        return 0
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    variants = [v.strip() for v in (a.variants or ",".join(VARIANTS[:-1] if a.quick else VARIANTS)).split(",")]
    targets = [t.strip() for t in a.targets.split(",") if t.strip() and t.strip() != "none"]
    for bad, known, what in ((models, MODELS, "model"), (variants, VARIANTS, "variant"), (targets, TARGETS, "target")):
        unknown = [x for x in bad if x not in known]
        if unknown:
            ap.error(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    size = a.size or (64 if a.quick else 224)
    eval_pp = a.eval_views or (4 if a.quick else 8)
    calib_pp = a.calib_views or (4 if a.quick else 8)
    torch.manual_seed(0)
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    torch.set_num_threads(2)
    MAX_QUANTIZE_S = a.max_quantize_s
    if not 0 <= a.auto_margin < 100:
        ap.error(f"--auto-margin is points of agreement in [0, 100), got {a.auto_margin}")
    if not 1 <= a.auto_check_views <= 36:
        ap.error(f"--auto-check-views is views per calibration photo in 1..36, got {a.auto_check_views}")
    if not 0 <= a.auto_confidence < 10:
        ap.error(f"--auto-confidence is a number of standard errors in [0, 10), got {a.auto_confidence}")
    try:
        parse_budget(a.auto_budget)
    except ValueError as e:
        ap.error(f"--auto-budget {a.auto_budget!r}: {e}")
    AUTO_MARGIN, AUTO_CHECK_VIEWS, AUTO_CONFIDENCE = a.auto_margin, a.auto_check_views, a.auto_confidence
    CNN_AUTO_BUDGET = a.auto_budget
    BOARD_VIEWS = a.board_views
    res = Results(a.json)
    for m in models:
        if m == "minilm":
            bench_minilm(res, variants, targets)
        else:
            bench_cnn(res, m, variants, targets, size, eval_pp, calib_pp, a.batch)
    print_table(res.rows)
    log(f"done: {len(res.rows)} rows, {sum(r.error is not None for r in res.rows)} with errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
