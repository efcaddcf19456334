"""``tvm-lowbit export --bundle DIR``: everything a board needs to run the model without Python.

    DIR/model.so            the compiled model (Relax VM executable; the packed low-bit weights and every other
                            parameter are constants inside it, so there is no separate params file to load)
    DIR/meta.json           target, input shape and dtype, lowering report, weight bytes
    DIR/bin/lowbit_runner   C++ runner (tvm_lowbit/runner/lowbit_runner.cc) cross-compiled for the board
    DIR/lib/                the board's TVM runtime: libtvm_runtime.so, libtvm_ffi.so (aarch64, same version
                            as the compiler here)
    DIR/input.bin           an example input (raw float32)
    DIR/expected.bin        the host's output for input.bin (raw float32), which run.sh checks against
    DIR/run.sh              ./run.sh [RUNS]: runs the model, prints per-run times and the check

The aarch64 runtime comes from the emulated board's sysroot when ``scripts/board/setup.sh`` built one with the
same TVM version, otherwise from the apache-tvm / apache-tvm-ffi aarch64 wheels on PyPI (``pip download``);
it is kept in a cache folder (``TVM_LOWBIT_CACHE``, default ``~/.cache/tvm_lowbit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from tvm_lowbit import safe_io
from tvm_lowbit.artifact import write_meta
from tvm_lowbit.deploy.board import board_dir

RUNNER_SRC = Path(__file__).resolve().parent.parent / "runner" / "lowbit_runner.cc"
RUNTIME_LIBS = {"libtvm_runtime.so": "tvm/lib/libtvm_runtime.so", "libtvm_ffi.so": "tvm_ffi/lib/libtvm_ffi.so"}
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


class BundleError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_LOWBIT_CACHE", Path.home() / ".cache" / "tvm_lowbit"))


def _versions() -> tuple[str, str]:
    return version("apache-tvm"), version("apache-tvm-ffi")


def _from_board_sysroot(kit: Path, tvm_v: str, ffi_v: str) -> bool:
    site = board_dir() / "sysroot" / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
    if not all((site / f"{dist}-{v}.dist-info").is_dir()
               for dist, v in (("apache_tvm", tvm_v), ("apache_tvm_ffi", ffi_v))):
        return False
    for name, member in RUNTIME_LIBS.items():
        shutil.copy2(site / member, kit / "lib" / name)
    shutil.copytree(site / "tvm_ffi" / "include", kit / "include", dirs_exist_ok=True)
    return True


def _from_pypi(kit: Path, tvm_v: str, ffi_v: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311", "-d", tmp, "-q", "--disable-pip-version-check",
               f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}"]
        for plat in WHEEL_PLATFORMS:
            cmd[4:4] = ["--platform", plat]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 2:
            raise BundleError(f"could not download the aarch64 apache-tvm {tvm_v} / apache-tvm-ffi {ffi_v} wheels "
                              f"for the board runtime: {r.stderr.strip().splitlines()[-1:] or r.stdout}")
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for member in z.namelist():
                    for name, path in RUNTIME_LIBS.items():
                        if member == path:
                            (kit / "lib" / name).write_bytes(z.read(member))
                    if member.startswith("tvm_ffi/include/") and not member.endswith("/"):
                        dest = kit / "include" / member[len("tvm_ffi/include/"):]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(z.read(member))


def _kit_complete(kit: Path) -> bool:
    return all((kit / "lib" / n).is_file() for n in RUNTIME_LIBS)


def runtime_kit() -> Path:
    """A folder with the aarch64 TVM runtime (``lib/``), the tvm-ffi headers (``include/``) and the runner
    cross-compiled against them (``bin/lowbit_runner``), for the TVM version installed here."""
    tvm_v, ffi_v = _versions()
    kit = cache_dir() / f"aarch64-runtime-tvm{tvm_v}-ffi{ffi_v}"
    runner = runner_binary(kit)
    if runner.is_file():
        return kit
    if not _kit_complete(kit):
        kit.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".kit-", dir=kit.parent))
        try:
            (tmp / "lib").mkdir()
            (tmp / "include").mkdir()
            if not _from_board_sysroot(tmp, tvm_v, ffi_v):
                _from_pypi(tmp, tvm_v, ffi_v)
            if kit.exists() and not _kit_complete(kit):
                shutil.rmtree(kit)  # a kit left half-made
            try:
                tmp.rename(kit)
            except OSError:  # another process (a second test worker) put its complete kit there first: use it
                if not _kit_complete(kit):
                    raise
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        raise BundleError("the runner is cross-compiled with aarch64-linux-gnu-g++, which is not installed: "
                          "apt-get install g++-aarch64-linux-gnu (scripts/setup.sh installs it)")
    (kit / "bin").mkdir(exist_ok=True)
    tmp_bin = safe_io.temp_sibling(runner)  # unique: two exports may build the runner at once
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-o", str(tmp_bin), str(RUNNER_SRC), f"-I{kit / 'include'}",
                        f"-L{kit / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
                        "-Wl,-rpath,$ORIGIN/../lib"], capture_output=True, text=True)
    if r.returncode != 0:
        tmp_bin.unlink(missing_ok=True)
        raise BundleError(f"cross-compiling {RUNNER_SRC.name} failed:\n{r.stderr[-2000:]}")
    tmp_bin.chmod(0o755)
    tmp_bin.rename(runner)
    return kit


def runner_binary(kit: Path) -> Path:
    src_hash = hashlib.sha256(RUNNER_SRC.read_bytes()).hexdigest()[:12]
    return kit / "bin" / f"lowbit_runner-{src_hash}"


def export_bundle(art: Any, directory: str | os.PathLike[str], example: np.ndarray,
                  expected: np.ndarray | None = None, atol: float = 0.0, force: bool = False) -> Path:
    """Write a self-contained bundle for ``art`` (a board ``Artifact``) into ``directory``, atomically (staged in
    a new sibling folder, renamed into place). ``directory`` must be new, empty or an earlier output of
    tvm_lowbit (``safe_io.MARKER``), unless ``force``. ``meta.json`` records every file's sha256.
    ``expected``: the host's output for ``example``; ``run.sh`` then fails if the board differs by more than
    ``atol``."""
    if art.target.arch != "aarch64":
        raise BundleError(f"bundles are for aarch64 boards (rasp4b, rasp5); {art.target.name} is {art.target.arch}, "
                          "and TVM publishes no runtime wheel for it: use `tvm-lowbit compile` and build the TVM "
                          "runtime on the board")
    out = safe_io.check_output_dir(directory, force, what="--bundle")
    x = art.check_input(example)
    kit = runtime_kit()
    with safe_io.staging_dir(out) as tmp:
        staged = art.export(tmp / "b")  # model.so + meta.json
        (staged / "lib").mkdir()
        (staged / "bin").mkdir()
        for name in RUNTIME_LIBS:
            shutil.copy2(kit / "lib" / name, staged / "lib" / name)
        shutil.copy2(runner_binary(kit), staged / "bin" / "lowbit_runner")
        x.tofile(staged / "input.bin")
        args = ["model.so", "input.bin", "x".join(str(d) for d in x.shape), "output.bin"]
        if expected is not None:
            np.ascontiguousarray(expected, dtype=np.float32).tofile(staged / "expected.bin")
            args += ["--expect", "expected.bin", "--atol", f"{atol:.9g}"]
        run_sh = staged / "run.sh"
        run_sh.write_text("#!/bin/sh\n"
                          "# Run the model on the board without Python: ./run.sh [RUNS]  (TVM_NUM_THREADS sets "
                          "the threads)\n"
                          'cd "$(dirname "$0")" || exit 1\n'
                          f'exec ./bin/lowbit_runner {" ".join(args)} --runs "${{1:-10}}"\n')
        run_sh.chmod(0o755)
        meta = json.loads((staged / "meta.json").read_text())
        meta["bundle"] = {"runner": "bin/lowbit_runner", "runner_args": args, "input_shape": list(x.shape),
                          "atol": atol if expected is not None else None,
                          "tvm_runtime": _versions()[0], "tvm_ffi": _versions()[1]}
        write_meta(staged, meta)  # the hashes now cover the runner, the runtime and the data files too
        staged.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be copied to a board
        safe_io.publish_dir(staged, out, force)
    return out


def run_bundle_emulated(bundle: str | os.PathLike[str], cpu: str, runs: int = 1, plugin: str | None = None,
                        threads: int = 1) -> subprocess.CompletedProcess[str]:
    """Run a bundle's runner on the emulated board (what ``run.sh`` does on a real one; qemu runs ELF files,
    not the shell script)."""
    from tvm_lowbit.deploy.board import board_exec

    b = Path(bundle).resolve()
    meta = json.loads((b / "meta.json").read_text())["bundle"]
    return board_exec([str(b / meta["runner"]), *meta["runner_args"], "--runs", str(runs)], cpu, plugin=plugin,
                      threads=threads, cwd=b)
