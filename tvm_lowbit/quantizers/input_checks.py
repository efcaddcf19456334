"""Calibration data checked before any quantization work: empty, NaN/Inf, constant or all-zero data is refused
with a clear error (all-zero calibration data silently cost 75 points of top-1 before this check).

Constant (and all-zero) data can be accepted on purpose: ``quantize(..., allow_degenerate=True)``, or wrap the
array with :func:`accept_degenerate` where the call to ``quantize`` is not yours (the CLI's
``--allow-degenerate-calib`` does this). Empty or non-finite data is always an error: no activation range can
come from it."""

from __future__ import annotations

import numpy as np
import torch


class DegenerateCalibrationError(ValueError):
    """Calibration data that cannot give activation ranges (empty, NaN/Inf, constant, all zero)."""


class AcceptedCalibration(np.ndarray):
    """An array the caller accepted as calibration data although it is constant (see :func:`accept_degenerate`)."""


def accept_degenerate(calib: np.ndarray) -> np.ndarray:
    """``calib`` marked so that ``quantize`` accepts it even when it is constant or all zero."""
    return np.asarray(calib).view(AcceptedCalibration)


def _as_arrays(calib: object) -> list[np.ndarray] | None:
    """The arrays to check: an array/tensor, or a list/tuple of batches (or (input, label) pairs); None for
    other iterables (a DataLoader is not consumed twice)."""
    if isinstance(calib, torch.Tensor):
        return [calib.detach().cpu().numpy()]
    if isinstance(calib, np.ndarray):
        return [calib]
    if isinstance(calib, (list, tuple)):
        out = []
        for b in calib:
            if isinstance(b, (list, tuple)) and b:
                b = b[0]
            if isinstance(b, torch.Tensor):
                out.append(b.detach().cpu().numpy())
            elif isinstance(b, np.ndarray):
                out.append(b)
            else:
                return None
        return out
    return None


def check_calibration(calib: object, allow_degenerate: bool = False, what: str = "calibration data") -> None:
    """Raise a ``DegenerateCalibrationError`` when ``calib`` is empty, holds NaN/Inf, or (unless
    ``allow_degenerate``, or the array came from :func:`accept_degenerate`) is constant or all zero.
    Iterables other than arrays, tensors and lists of them are checked by the quantizer as it reads them."""
    if isinstance(calib, AcceptedCalibration):
        allow_degenerate = True
    arrays = _as_arrays(calib)
    if arrays is None:
        return
    if not arrays or all(a.size == 0 for a in arrays) or (len(arrays) == 1 and arrays[0].ndim == 0):
        raise DegenerateCalibrationError(f"{what} is empty: pass a few hundred representative inputs")
    lo = hi = None
    for i, a in enumerate(arrays):
        if a.size == 0:
            continue
        if a.dtype.kind not in "fiub":
            raise DegenerateCalibrationError(f"{what} has dtype {a.dtype}: pass numeric model inputs (float32)")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            where = f" (batch {i})" if len(arrays) > 1 else ""
            raise DegenerateCalibrationError(f"{what}{where} has {bad} NaN/Inf value(s) of {a.size}: clean the inputs; "
                                             "no activation range can be computed from them")
        a_lo, a_hi = float(a.min()), float(a.max())
        lo = a_lo if lo is None else min(lo, a_lo)
        hi = a_hi if hi is None else max(hi, a_hi)
    if allow_degenerate or lo is None:
        return
    if lo == hi:
        kind = "all zero" if lo == 0 else f"constant (every value is {lo:g})"
        raise DegenerateCalibrationError(
            f"{what} is {kind}: the activation ranges calibrated on it would be meaningless (all-zero data cost "
            "75 points of top-1 in a test); pass representative inputs, or allow_degenerate=True "
            "(CLI: --allow-degenerate-calib) if this is intended")


__all__ = ["AcceptedCalibration", "DegenerateCalibrationError", "accept_degenerate", "check_calibration"]

