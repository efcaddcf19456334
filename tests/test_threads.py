"""The thread-safety contract (tvm_lowbit.artifact, docs/design/safety.md): one Artifact shared by threads runs
correctly (a VM per thread), and ``tvm_lowbit.compile`` may be called from several threads at once
(``torch.export`` is serialized by ``importer.EXPORT_LOCK``; before, a float model segfaulted or a quantized one
raised ``reg < frame->register_file.size()``, and two compiles failed in ``torch.export``)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import tvm_lowbit
from tvm_lowbit import FGQ, quantize


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).eval()


X = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)


def in_threads(fn: Callable[[int], object], n: int) -> list[object]:
    """``fn(i)`` in ``n`` threads started together; their results, or the first exception raised again."""
    results: list[object] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {"float": small(0), "quantized": quantize(small(0), FGQ(first_layer="fgq"), X, progress=False)}


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_one_artifact_run_from_four_threads(models: dict[str, nn.Module], kind: str) -> None:
    art = tvm_lowbit.compile(models[kind], X[:1])
    inputs = [X[i:i + 1] for i in range(4)]
    expected = [art.run(x) for x in inputs]  # single-threaded reference

    def work(i: int) -> bool:
        for _ in range(30):
            np.testing.assert_array_equal(art.run(inputs[i]), expected[i])
            np.testing.assert_array_equal(art.run_all(inputs[(i + 1) % 4])[0], expected[(i + 1) % 4])
        return art.median_ms(inputs[i], repeat=3) > 0

    assert in_threads(work, 4) == [True] * 4


def test_compile_from_two_threads(models: dict[str, nn.Module]) -> None:
    pair = [models["quantized"], quantize(small(1), FGQ(first_layer="fgq", group_size=8), X, progress=False)]
    alone = [tvm_lowbit.compile(m, X[:2]).run(X[:2]) for m in pair]
    for _ in range(2):
        arts = in_threads(lambda i: tvm_lowbit.compile(pair[i], X[:2]), 2)
        for art, ref in zip(arts, alone):
            assert not art.report.fallback
            np.testing.assert_array_equal(art.run(X[:2]), ref)


def test_float_and_quantized_compile_together(models: dict[str, nn.Module]) -> None:
    pair = [models["float"], models["quantized"]]
    arts = in_threads(lambda i: tvm_lowbit.compile(pair[i], X[:1]), 2)
    with torch.no_grad():
        np.testing.assert_allclose(arts[0].run(X[:1]), pair[0](torch.from_numpy(X[:1])).numpy(), rtol=1e-4,
                                   atol=1e-4)
    assert len(arts[1].report.lowered) == 2
