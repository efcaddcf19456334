"""The interface every weight format implements, and the registry the rest of the package asks.

A *format* (``WeightFormat``) is one way a layer's weight can be stored: it names itself (``parse``:
"ternary-n16", "pow2-4", "int4-g64", ...), quantizes a float weight (``quantize``), turns a layer's
integer weight back into the packed object its kernels take (``decompose``, with the reason when it
does not fit), counts the bytes the compiled layer keeps (``storage_bytes``) and names the kernel
family that runs it (``family``: "ternary" | "pow2" | "int"; None for float).

A QuantLayer records the ``format`` attribute of its weight object as ``weight_format`` ("ternary",
"pow2", "int4", "int8", "int"); ``recorded`` lists the strings a format answers for, so the compiler
finds the format of a layer from that string alone (``format_for_recorded``).

Adding a format is one new module with a ``WeightFormat`` subclass and one ``register_format`` line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tvm_lowbit import qmath

WeightObject = qmath.TernaryWeight | qmath.Pow2Weight | qmath.IntWeight


@dataclass(frozen=True)
class Format:
    """A parsed format name: ``kind`` is the registered format that made it ("float", "ternary",
    "pow2", "int", ...), ``bits`` its code width and ``group_size`` its group (ternary N; int: the
    scale group, 0 for one scale per output channel)."""

    name: str
    kind: str
    bits: int = 32
    group_size: int = 0

    @property
    def spec(self) -> "WeightFormat":
        """The registered format this name belongs to."""
        return get_format(self.kind)

    @property
    def is_float(self) -> bool:
        """Whether the layer stays float (its format has no kernel family)."""
        return self.spec.family is None

    @property
    def family(self) -> str | None:
        return self.spec.family

    def quantize(self, w: torch.Tensor) -> WeightObject | None:
        """The weight ``w`` (float) in this format, or None for ``float``."""
        return self.spec.quantize(self, w)

    def weight_bytes(self, w: torch.Tensor) -> int:
        """Bytes the compiled layer keeps for ``w`` in this format."""
        return self.spec.storage_bytes(self.quantize(w), int(w.numel()))


class WeightFormat:
    """One weight format (see the module docstring).  Subclasses set the class attributes and override
    ``parse``, ``quantize`` and ``decompose``; the rounding hooks are optional."""

    kind: str = ""                      # registry key, also ``Format.kind``
    family: str | None = None           # kernel family of what ``decompose`` returns; None: stays float
    recorded: tuple[str, ...] = ()      # ``weight_format`` strings of QuantLayers in this format
    grammar: tuple[str, ...] = ()       # the name forms, for error messages ("ternary[-nN]")
    description: str = ""               # a short noun for reasons ("power-of-two")
    guesses: tuple[tuple[int, int], ...] = ()  # (rank, group size) tried for a layer with no recorded format

    def parse(self, name: str) -> Format | None:
        """The ``Format`` of ``name`` (lower case, stripped) if it is this format's, else None; raises
        ValueError when the name is this format's but its parameters are not allowed."""
        return None

    def quantize(self, fmt: Format, w: torch.Tensor) -> WeightObject | None:
        """The float weight ``w`` in ``fmt`` (a name this format parsed)."""
        raise NotImplementedError(f"weight format {self.kind!r} quantizes no float weight (it is only recorded)")

    def decompose(self, weight_format: str | None, w_int: np.ndarray, group_size: int | None
                  ) -> tuple[WeightObject | None, str]:
        """``w_int`` of a layer recorded as ``weight_format`` as the object its kernels take, or
        (None, why not)."""
        return None, f"weight format {self.kind!r} has no integer kernel"

    def weight_format(self, obj: WeightObject | None) -> str | None:
        """The ``weight_format`` a QuantLayer records for ``obj`` (None: the layer stays float)."""
        return None if obj is None else str(obj.format)

    def storage_bytes(self, obj: WeightObject | None, numel: int) -> int:
        """Bytes of ``obj`` as compiled: codes, scale codes and per-channel scales (float: 4 a weight)."""
        return qmath.weight_storage_bytes(obj, numel)

    def rounding_grid(self, obj: WeightObject) -> tuple[torch.Tensor, int, int] | None:
        """(step per weight, in the weight's shape, float64; lowest code; highest code) of the uniform
        grid ``obj`` lies on, for rounding refinements that keep the scales; None: not uniform."""
        return None

    def with_codes(self, obj: WeightObject, codes: torch.Tensor) -> WeightObject:
        """``obj`` with new integer codes on the grid of ``rounding_grid`` (the weight's shape)."""
        raise NotImplementedError(f"weight format {self.kind!r} has no rounding grid")


_FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Add ``fmt`` to the registry (its ``kind`` and ``recorded`` names must be new); returns it."""
    if not fmt.kind:
        raise ValueError(f"{type(fmt).__name__}: a weight format needs a kind")
    if fmt.kind in _FORMATS:
        raise ValueError(f"weight format {fmt.kind!r} is already registered ({type(_FORMATS[fmt.kind]).__name__})")
    taken = [r for r in fmt.recorded if any(r in f.recorded for f in _FORMATS.values())]
    if taken:
        raise ValueError(f"weight format {fmt.kind!r}: recorded name(s) {', '.join(taken)} already belong to "
                         "another format")
    _FORMATS[fmt.kind] = fmt
    return fmt


def unregister_format(kind: str) -> None:
    """Remove a registered format (for tests that register a toy one)."""
    _FORMATS.pop(kind, None)


def registered_formats() -> list[WeightFormat]:
    """Every registered format, in registration order."""
    return list(_FORMATS.values())


def get_format(kind: str) -> WeightFormat:
    """The registered format of ``kind``."""
    try:
        return _FORMATS[kind]
    except KeyError:
        raise ValueError(f"no weight format {kind!r} is registered (known: {', '.join(_FORMATS)})") from None


def format_for_recorded(weight_format: str) -> WeightFormat | None:
    """The format whose QuantLayers record ``weight_format``, or None."""
    return next((f for f in _FORMATS.values() if weight_format in f.recorded), None)


def recorded_names() -> list[str]:
    """Every recorded ``weight_format`` string, in registration order."""
    return [r for f in _FORMATS.values() for r in f.recorded]


def parse_format(name: str) -> Format:
    """``"ternary"``, ``"ternary-n16"``, ``"pow2-4"``, ``"int4"``, ``"int4-g64"``, ``"int8"``, ``"float"``
    (and any registered format's names)."""
    if isinstance(name, str):
        key = name.strip().lower()
        for f in _FORMATS.values():
            got = f.parse(key)
            if got is not None:
                return got
    forms = [g for f in _FORMATS.values() for g in f.grammar]
    listed = ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else "".join(forms)
    raise ValueError(f"unknown weight format {name!r}: use {listed}")
