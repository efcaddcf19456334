"""The one question the lowering pass asks of a layer's weight: ``decompose(weight_format, w_int,
group_size)``, answered by the registered format that records ``weight_format``."""

from __future__ import annotations

import numpy as np

from tvm_lowbit.formats.base import WeightFormat, WeightObject, format_for_recorded, recorded_names, registered_formats


def kernel_family(obj: WeightObject) -> str:
    """"ternary", "pow2" or "int": the kernels that take this decomposed weight."""
    spec = format_for_recorded(str(obj.format))
    if spec is None or spec.family is None:
        raise ValueError(f"no registered weight format records {obj.format!r} with an integer kernel")
    return spec.family


def _guess(w_int: np.ndarray) -> tuple[WeightObject | None, str]:
    """A layer with no recorded format: every format's guesses in rank order, the first that fits."""
    tries: list[tuple[int, int, WeightFormat]] = sorted(
        ((rank, n, f) for f in registered_formats() for rank, n in f.guesses), key=lambda t: t[0])
    reasons = []
    for _, n, f in tries:
        tw, why = f.decompose(f.recorded[0] if f.recorded else None, w_int, n)
        if tw is not None:
            return tw, ""
        reasons.append((f, why))
    if not reasons:
        return None, "no registered weight format guesses a layer with no recorded format"
    first = reasons[0][0]
    others = list(dict.fromkeys(f.description for f, _ in reasons if f is not first))
    return None, reasons[0][1] + (f" (nor {' nor '.join(others)})" if others else "")


def decompose(weight_format: str | None, w_int: np.ndarray, group_size: int | None
              ) -> tuple[WeightObject | None, str]:
    """The integer weight ``w_int`` of a layer recorded with ``weight_format`` ("ternary", "pow2", "int",
    "int4", "int8", any registered format's, or None when unknown) as the object its kernels take, or
    (None, why it does not fit)."""
    if weight_format is None:
        return _guess(w_int)
    spec = format_for_recorded(weight_format)
    if spec is None:
        return None, (f"no integer kernel for weight format {weight_format!r} "
                      f"(known: {', '.join(recorded_names())})")
    return spec.decompose(weight_format, w_int, group_size)
