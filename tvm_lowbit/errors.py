"""The compiler's error type, in a module of its own so that every stage (import, build, artifact, backends)
raises the same class without importing one another."""

from __future__ import annotations


class CompileError(RuntimeError):
    """A model or a file that cannot be compiled, built, loaded or run here, with what to do about it."""
