"""Versioned scheme configurations: every scheme's config (FGQ, Auto, INQ, SQ, PACT) is a frozen dataclass
with ``SchemeConfig`` mixed in, so it writes itself as a plain dict (``to_dict``: JSON-able, with
"scheme" and "version" keys) and reads back into an equal object (``from_dict``, or
``config_from_dict`` for any registered scheme).  A quantized model keeps its config's dict as
``tvm_lowbit_config``, which ``compiler.save_quantized`` writes into the ``.pt2``.

A config whose fields change meaning gets a new ``VERSION``; ``from_dict`` refuses other versions
with an error naming the scheme and both versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

C = TypeVar("C", bound="SchemeConfig")
_CALLABLE = "callable"  # a dict {"callable": "module.name"} stands for a function a saved config cannot hold


def _plain(v: object, where: str) -> object:
    """``v`` as JSON-able Python: mappings -> dicts, tuples -> lists, a callable -> {"callable": name}."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x, where) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, where) for x in v]
    if callable(v):
        return {_CALLABLE: f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"}
    raise TypeError(f"{where}: a {type(v).__name__} cannot be written into a saved config")


class SchemeConfig:
    """Mixin for a scheme's frozen dataclass config: ``SCHEME`` (its name), ``VERSION``, ``to_dict``,
    ``from_dict``."""

    SCHEME = ""
    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        """{"scheme": ..., "version": ..., field: value, ...}, JSON-able."""
        out: dict[str, Any] = {"scheme": self.SCHEME, "version": self.VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = _plain(getattr(self, f.name), f"{self.SCHEME} config field {f.name!r}")
        return out

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """The config ``to_dict`` wrote (also after a JSON round trip)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a {cls.SCHEME} config is read from a dict, got {type(d).__name__}")
        scheme, version = d.get("scheme"), d.get("version")
        if scheme != cls.SCHEME:
            raise ValueError(f"a {scheme!r} config cannot be read as {cls.__name__} (scheme {cls.SCHEME!r})")
        if version != cls.VERSION:
            got = "has no version (saved before configs were versioned)" if version is None else f"is version {version}"
            raise ValueError(f"the {cls.SCHEME} config {got}; this tvm_lowbit reads {cls.SCHEME} config version "
                             f"{cls.VERSION}: quantize the model again")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(known) - {"scheme", "version"})
        if unknown:
            raise ValueError(f"{cls.SCHEME} config version {version}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, v in d.items():
            if name not in known:
                continue
            f = known[name]
            if isinstance(v, Mapping) and set(v) == {_CALLABLE}:
                raise ValueError(f"{cls.SCHEME} config version {version}: {name} was the function {v[_CALLABLE]}, "
                                 f"which a saved config cannot hold; build {cls.__name__}({name}=...) again")
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
            kwargs[name] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
        return cls(**kwargs)


_CONFIGS: dict[str, type[SchemeConfig]] = {}


def register_config(cls: type[C]) -> type[C]:
    """Make ``config_from_dict`` read ``cls``'s dicts (by its ``SCHEME``); returns ``cls``."""
    if not cls.SCHEME:
        raise ValueError(f"{cls.__name__}: a scheme config needs a SCHEME name")
    if _CONFIGS.get(cls.SCHEME, cls) is not cls:
        raise ValueError(f"scheme {cls.SCHEME!r} is already registered ({_CONFIGS[cls.SCHEME].__name__})")
    _CONFIGS[cls.SCHEME] = cls
    return cls


def unregister_config(scheme: str) -> None:
    """Remove a registered config (for tests that register a toy scheme)."""
    _CONFIGS.pop(scheme, None)


def registered_configs() -> dict[str, type[SchemeConfig]]:
    """Scheme name -> config class, in registration order."""
    return dict(_CONFIGS)


def config_from_dict(d: Mapping[str, Any]) -> SchemeConfig:
    """The config object a ``to_dict`` dict describes (any registered scheme)."""
    if not isinstance(d, Mapping) or "scheme" not in d:
        raise ValueError(f"a saved scheme config is a dict with a 'scheme' key, got {d!r}")
    cls = _CONFIGS.get(str(d["scheme"]))
    if cls is None:
        raise ValueError(f"unknown quantization scheme {d['scheme']!r} (version {d.get('version')}) in the config; "
                         f"known: {', '.join(_CONFIGS)}")
    return cls.from_dict(d)
