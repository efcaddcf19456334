"""Autotuning with MetaSchedule: every task of a compiled model, an XGBoost cost model, and a standard
MetaSchedule JSON database per target under ``tvm_lowbit/schedules/<target>/`` that ``compile`` applies.

* Tasks: the Relax module is lowered (``passes.lower_integer_layers``), the low-bit kernels are kept whole (opaque), and
  Relax's "zero" pipeline fuses the float ops; ``extract_tasks`` then gives one task per distinct PrimFunc.
  The low-bit kernels get a kernel-specific design space (their default schedule with the register tile
  sampled); the float ops get MetaSchedule's generic CPU space.
* Database: the two standard files (``database_workload.json``, ``database_tuning_record.json``). Every
  measured record is appended as it arrives, under an exclusive file lock, so an interrupted run loses
  nothing, a rerun only tunes the trials still missing, and two runs on one database keep each other's
  records. A corrupted or truncated line is detected on load and dropped with a warning. Readers
  (``compile``'s ``apply_database``) write nothing; a tune (a writer) repairs the files first: new files
  swapped in under the writers' lock (originals saved beside them), and every writer re-reads the
  workload numbering under that lock before it appends.
* Measuring: on this host for a host target; on real boards through an RPC tracker (``RPCBoards``); for a board
  target with an emulated board (rasp4b, rasp5) and no boards, with the cycle estimate (``tvm_lowbit.cost``: each
  candidate runs on the emulated board and llvm-mca times the blocks it executed); such a database carries the
  ``MEASURED_BY_ESTIMATE`` file and applies by default.
* Earning their place: for a board target every kernel task's default schedule is measured with the same builder and
  runner before the trials (``DEFAULTS_FILE``); ``compile`` applies a workload's records only when the best one beats
  that default (``load_database(winners_only=True)``), so a database never slows a kernel down by its own measure.
  With the cycle estimate each candidate's executed instructions are recorded too (``INSNS_FILE``; the default's in
  ``DEFAULTS_FILE``), and a record then counts only when it needs fewer estimated cycles *and* no more instructions
  than the default: compile applies the fastest record that satisfies both, or keeps the default schedule.
* Judged in the model: a kernel measured alone is not the kernel inside the model (its data, its neighbours' code);
  ``tvm_lowbit.judge`` builds each model with the default schedules and with the records, attributes the board's
  estimate to each kernel's functions, and writes ``IN_MODEL_FILE``; where it exists, compile applies only records
  judged there to need fewer estimated cycles and no more instructions in the model.
* Workers: MetaSchedule's default builder imports every tensor intrinsic (the GPU ones take 1-2 minutes
  to parse, in each worker), so the GPU intrinsic modules are stubbed and the build skips that import.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvm_lowbit.cost.mca import CORES, CostError, core, llvm_tool, llvm_version

# the shipped databases travel with the package (tvm_lowbit/schedules/<target>/); TVM_LOWBIT_SCHEDULES names another
SCHEDULES_DIR = Path(os.environ.get("TVM_LOWBIT_SCHEDULES", Path(__file__).resolve().parent / "schedules"))
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# a database folder holding this file was measured on an emulated board: `compile` applies it only when asked
# by path (qemu's timings rank schedules unlike the real core; see tvm_lowbit/schedules/README.md)
EMULATED_MARK = "MEASURED_UNDER_EMULATION"
# a database folder holding this file was tuned with the cycle estimate (tvm_lowbit.cost: llvm-mca over the blocks the
# emulated board ran); the file names the core model and the LLVM version. It is applied by default like a board's.
ESTIMATE_MARK = "MEASURED_BY_ESTIMATE"
# {workload structural hash: {"task", "kind", "seconds"}}: each tuned kernel's default schedule, measured by the same
# builder and runner as the candidates at tune time. ``compile`` applies a workload's records only when the best one
# beats its default schedule here (a workload without an entry: its best record, as before).
DEFAULTS_FILE = "default_schedules.json"
# one JSON line per measured candidate, [record key, executed instructions per call] (``record_key``: the workload's
# structural hash and the record's trace), appended beside the record by a tune on the cycle estimate. A workload whose
# default schedule has an instruction count ("insns" in DEFAULTS_FILE) applies only records with no more instructions.
INSNS_FILE = "record_instructions.json"
# {record key: {"workload", "task", "apply", "why", "models": {model: judgement}}}: records judged inside whole models
# (``tvm_lowbit.judge``: the model built with the default schedules and with the records, run on the emulated board, the
# estimate attributed to each kernel's functions). Where this file exists, ``compile`` applies only records judged
# there with "apply" true: a record that wins on its kernel alone but loses inside a model is refused.
IN_MODEL_FILE = "in_model.json"


def emulated_default(target_name: str) -> str | None:
    """Why ``compile`` skips ``tvm_lowbit/schedules/<target>/`` by default (it was tuned under emulation), or None."""
    d = SCHEDULES_DIR / target_name
    if not (d / EMULATED_MARK).is_file():
        return None
    return (f"{d} was tuned on an emulated board and is not applied by default (default schedules used); apply it "
            f"with schedules={str(d)!r} (tvm-lowbit compile --schedules {d}) or re-tune on a real board "
            "(tvm_lowbit/schedules/README.md)")


class TuneError(RuntimeError):
    pass


def stub_gpu_intrinsics() -> None:
    """Replace the GPU tensor-intrinsic modules by empty ones before anything imports them (CPU tuning
    never uses them, and parsing them takes 1-2 minutes on a loaded 2-core machine)."""
    for name in ("cuda", "rocm", "hexagon", "metal"):
        full = f"tvm.s_tir.tensor_intrin.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)


def fast_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without its import of every tensor intrinsic (runs in the workers)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _cross_export(cc: str) -> Any:
    def export(rt_mod: Any) -> str:
        import tvm

        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        rt_mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(cc))
        return path

    return export


def _build_export(f_build: Any, f_export: Any, mod: Any, target: Any) -> str:
    return f_export(f_build(mod, target, None))


def warm_builder(f_export: Any, timeout_sec: float, uses: int = 200) -> Any:
    """MetaSchedule's LocalBuilder build (``fast_build`` + ``f_export``) in one worker process kept between batches:
    LocalBuilder starts a fresh worker per batch (a guard against leaks), and importing TVM there takes 5-20 s on
    a loaded 2-core host, which a small batch of cross-compiled candidates pays each time. The worker is
    restarted after ``uses`` builds instead; ``close`` stops it."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class WarmBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=1, timeout=timeout_sec, maximum_process_uses=uses)

        def build(self, build_inputs: list[Any]) -> list[Any]:
            out = []
            jobs = [(fast_build, f_export, b.mod, b.target) for b in build_inputs]
            for r in self.pool.map_with_error_catching(lambda job: _build_export(*job), jobs):
                if r.status == StatusKind.COMPLETE:
                    out.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    out.append(BuilderResult(None, f"WarmBuilder: timeout, killed after {timeout_sec} seconds"))
                else:
                    out.append(BuilderResult(None, f"WarmBuilder: an exception occurred\n{r.value}"))
            return out

        def close(self) -> None:
            self.pool.shutdown()

    return WarmBuilder()


# --------------------------------------------------------------------------------------------
# The database: standard JSON files, appended under a lock, checked on load
# --------------------------------------------------------------------------------------------

@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The writers' lock (tunes appending, a repair swapping the files); readers never take it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class LoadReport:
    directory: Path
    workloads: int = 0
    records: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "file:line: why"
    backups: list[Path] = field(default_factory=list)
    default_wins: list[str] = field(default_factory=list)  # tasks whose default schedule beat every record
    # tasks whose fastest record beat the default's run time but executed more instructions than the default (not
    # applied: the fastest record with no more instructions is, when it beats the default, else the default stays)
    insns_vetoes: list[str] = field(default_factory=list)
    # "task (why)": workloads with a record that wins on the kernel alone but none judged to win inside a model
    # (``IN_MODEL_FILE``), which keep the default schedule
    in_model_refusals: list[str] = field(default_factory=list)

    def text(self) -> str:
        s = f"{self.directory}: {self.records} tuning records over {self.workloads} workloads"
        if self.default_wins:
            s += (f"; {len(self.default_wins)} workload(s) keep the default schedule (no record beat it in run time "
                  "with no more instructions where those were counted)")
        if self.insns_vetoes:
            s += (f"; {len(self.insns_vetoes)} workload(s)' fastest record executes more instructions than the default "
                  f"and is not applied ({', '.join(self.insns_vetoes)})")
        if self.in_model_refusals:
            s += (f"; {len(self.in_model_refusals)} workload(s)' records win on the kernel alone but not in the model "
                  f"({IN_MODEL_FILE}) and are not applied: {'; '.join(self.in_model_refusals)}")
        if self.bad_lines:
            shown = "; ".join(self.bad_lines[:5]) + (" ..." if len(self.bad_lines) > 5 else "")
            s += f"; {len(self.bad_lines)} corrupted line(s) dropped ({shown})"
            s += (f"; the valid records were kept and the originals saved as {', '.join(p.name for p in self.backups)}"
                  if self.backups else f"; the files were left as they are (repair them with "
                  f"tvm_lowbit.tune.repair_database({str(self.directory)!r}), or tune into the folder)")
        return s


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _lines(data: bytes, complete_only: bool) -> list[str]:
    """The lines of a database file; with ``complete_only`` a last line without its newline (a writer is
    appending it right now) is left out, else it is kept (and found damaged if it is cut off)."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" after a final newline; else a line cut off without its newline
    if tail and not complete_only:
        lines.append(tail)
    return lines


def _snapshot(directory: Path, under_lock: bool) -> tuple[list[str], list[str]]:
    """(workload lines, record lines) that belong together. Appends never break this: records are read
    before workloads, and a tune appends a record's workload before the record. A repair swaps both files
    (new inodes): a reader that saw a swap under its feet reads again."""
    wl, rec = directory / WORKLOAD_FILE, directory / RECORD_FILE
    for _ in range(20):
        before = (_file_id(wl), _file_id(rec))
        rec_data = rec.read_bytes() if rec.is_file() else b""
        wl_data = wl.read_bytes() if wl.is_file() else b""
        if under_lock or (_file_id(wl), _file_id(rec)) == before:
            return _lines(wl_data, not under_lock), _lines(rec_data, not under_lock)
        time.sleep(0.05)
    raise TuneError(f"{directory}: the tuning database kept being replaced while it was read; try again")


def _parse_files(directory: Path, report: LoadReport, under_lock: bool = False, keys: list[str] | None = None
                 ) -> tuple[list[Any], list[tuple[int, Any]]]:
    """Valid workloads and (workload index, record) pairs; bad lines go into ``report.bad_lines``. ``keys``, when
    given, receives each returned record's ``record_key`` (from its line as stored)."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_lowbit import kernels

    # a record's trace names the tensor intrinsics it tensorized with: ours must be registered before
    # the records are parsed, or every tensorized record would read as damaged
    kernels.register_intrinsics()

    wl_lines, rec_lines = _snapshot(directory, under_lock)
    workloads: list[Any] = []
    valid: dict[int, int] = {}  # record files index workloads by their non-empty line number
    n = -1
    for i, line in enumerate(wl_lines):
        if not line.strip():
            continue
        n += 1
        try:
            workloads.append(ms.database.Workload.from_json(json.loads(line)))
            valid[n] = len(workloads) - 1
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged line
            report.bad_lines.append(f"{WORKLOAD_FILE}:{i + 1}: {type(e).__name__}")
    records: list[tuple[int, Any]] = []
    wl_keys: dict[int, str] = {}
    for i, line in enumerate(rec_lines):
        if not line.strip():
            continue
        try:
            idx, rec_json = json.loads(line)
            if int(idx) not in valid:
                raise ValueError(f"workload {idx} is missing or damaged")
            k = valid[int(idx)]
            records.append((k, ms.database.TuningRecord.from_json(rec_json, workloads[k])))
        except Exception as e:  # noqa: BLE001
            report.bad_lines.append(f"{RECORD_FILE}:{i + 1}: {type(e).__name__}")
            continue
        if keys is not None:
            if k not in wl_keys:
                wl_keys[k] = workload_key(workloads[k].mod)
            keys.append(record_key(wl_keys[k], rec_json[0]))
    return workloads, records


def _swap_in(directory: Path, name: str, text: str) -> None:
    """Write ``text`` to a fresh file beside ``name`` and rename it over ``name`` (a new inode)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_clean(directory: Path, workloads: list[Any], records: list[tuple[int, Any]], report: LoadReport) -> None:
    """Under the writers' lock: keep the originals as ``*.corrupt-<time>``, swap in files without the bad lines."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (WORKLOAD_FILE, RECORD_FILE):
        src = directory / name
        if src.is_file():
            bak = directory / f"{name}.corrupt-{stamp}"
            bak.write_bytes(src.read_bytes())
            report.backups.append(bak)
    _swap_in(directory, WORKLOAD_FILE, "".join(json.dumps(w.as_json()) + "\n" for w in workloads))
    _swap_in(directory, RECORD_FILE, "".join(json.dumps([i, _record_json(r)]) + "\n" for i, r in records))


def repair_database(directory: str | os.PathLike[str]) -> LoadReport:
    """Rewrite a damaged database without its bad lines, under the lock tunes append under: the clean files
    are written beside the old ones and renamed over them, so readers see the old or the new files, and a
    tune re-reads the workload numbering before its next append. The originals are kept as
    ``*.corrupt-<time>``. Nothing is written when no line is damaged."""
    d = Path(directory)
    report = LoadReport(d)
    if not (d / WORKLOAD_FILE).is_file():
        return report
    with _locked(d):
        workloads, records = _parse_files(d, report, under_lock=True)
        if report.bad_lines:
            _write_clean(d, workloads, records, report)
    report.workloads, report.records = len(workloads), len(records)
    return report


def workload_key(mod: Any) -> str:
    """A workload's key in ``DEFAULTS_FILE``: its structural hash (as the database matches workloads)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def record_key(workload: str, trace_json: Any) -> str:
    """A record's key in ``INSNS_FILE``: its workload's ``workload_key`` and its trace as the record file stores it."""
    import hashlib

    return hashlib.sha1(f"{workload}:{json.dumps(trace_json)}".encode()).hexdigest()


def trace_json(trace: Any) -> Any:
    """A schedule trace as a tuning record stores it (plain JSON)."""
    return _plain_json(trace.as_json(remove_postproc=False))


def read_instructions(directory: str | os.PathLike[str]) -> dict[str, float]:
    """{record key: executed instructions per call} from ``INSNS_FILE``; a damaged or cut-off line is skipped (its
    record then has no count and is not applied where the default's instructions were counted)."""
    f = Path(directory) / INSNS_FILE
    out: dict[str, float] = {}
    if not f.is_file():
        return out
    for line in f.read_text(errors="replace").splitlines():
        try:
            key, n = json.loads(line)
            out[str(key)] = float(n)
        except (ValueError, TypeError):
            continue
    return out


def append_instructions(directory: Path, entries: list[tuple[str, float]]) -> None:
    """Append [record key, instructions per call] lines to ``INSNS_FILE`` under the writers' lock."""
    if not entries:
        return
    with _locked(directory):
        fd = os.open(directory / INSNS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(json.dumps([k, round(n, 1)]) + "\n" for k, n in entries).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def read_defaults(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The default-schedule measurements of a database folder (``DEFAULTS_FILE``); {} when there are none."""
    f = Path(directory) / DEFAULTS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        print(f"warning: {f}: unreadable ({e}); every workload's best record is applied", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _best_seconds(record: Any) -> float | None:
    secs = [float(s) for s in (record.run_secs or [])]
    return sum(secs) / len(secs) if secs and all(np.isfinite(s) and s < 1e9 for s in secs) else None


@dataclass
class VersusDefault:
    """One tuned workload against its default schedule: run times (seconds) and executed instructions per call
    (None: not measured). ``best`` is the fastest record with no more instructions than the default (any record
    when the default's instructions were not counted: RPC boards, older databases); ``fastest`` the fastest of all."""

    task: str
    default: float | None
    best: float | None
    default_insns: float | None = None
    best_insns: float | None = None
    fastest: float | None = None
    fastest_insns: float | None = None

    @property
    def wins(self) -> bool:
        """The best record is applied: it beats the default schedule (or the default was not measured)."""
        return self.best is not None and (self.default is None or self.best < self.default)

    @property
    def insns_veto(self) -> bool:
        """The fastest record beats the default's run time but executes more instructions: it is not applied."""
        return (self.fastest is not None and self.default is not None and self.fastest < self.default
                and (self.best is None or self.fastest < self.best))


def allowed(insns: float | None, default_insns: float | None) -> bool:
    """May a record with ``insns`` executed instructions replace a default schedule with ``default_insns``? Yes when
    the default's were not counted; else only with a count and no more instructions."""
    return default_insns is None or (insns is not None and insns <= default_insns)


def versus_default(workloads: list[Any], records: list[tuple[int, Any]], defaults: dict[str, dict[str, Any]],
                   insns: dict[str, float] | None = None, keys: list[str] | None = None) -> list[VersusDefault]:
    """Per workload (in ``workloads`` order), the default schedule against the best record (``insns``: the records'
    instruction counts by ``keys[j]``, the key of ``records[j]``)."""
    insns, keys = insns or {}, keys or []
    default_insns = {i: defaults.get(workload_key(w.mod), {}).get("insns") for i, w in enumerate(workloads)}
    best: dict[int, tuple[float, float | None]] = {}
    fastest: dict[int, tuple[float, float | None]] = {}
    for j, (i, r) in enumerate(records):
        s = _best_seconds(r)
        if s is None:
            continue
        n = insns.get(keys[j]) if j < len(keys) else None
        if s < fastest.get(i, (float("inf"), None))[0]:
            fastest[i] = (s, n)
        if allowed(n, default_insns[i]) and s < best.get(i, (float("inf"), None))[0]:
            best[i] = (s, n)
    out = []
    for i, w in enumerate(workloads):
        entry = defaults.get(workload_key(w.mod), {})
        b, f = best.get(i, (None, None)), fastest.get(i, (None, None))
        out.append(VersusDefault(str(entry.get("task", f"workload {i}")), entry.get("seconds"), b[0],
                                 default_insns[i], b[1], f[0], f[1]))
    return out


def kernel_winners(workloads: list[Any], records: list[tuple[int, Any]], defaults: dict[str, dict[str, Any]],
                   insns: dict[str, float], keys: list[str], report: LoadReport | None = None) -> list[bool]:
    """Which records may be applied by their kernel measured alone: of a workload whose default schedule was measured
    (``DEFAULTS_FILE``), the records faster than that default and, where the default's instructions were counted, with
    no more instructions (``INSNS_FILE``); every record of a workload without a default measurement. ``report``
    receives the workloads that keep their default and those whose fastest record was vetoed for its instructions."""
    keep = [True] * len(records)
    if not defaults:
        return keep
    versus = versus_default(workloads, records, defaults, insns, keys)
    if report is not None:
        for v in versus:
            if not v.wins and v.fastest is not None:
                report.default_wins.append(v.task)
            if v.insns_veto:
                report.insns_vetoes.append(v.task)
    measured = [workload_key(w.mod) in defaults for w in workloads]
    for j, (i, r) in enumerate(records):
        if not measured[i]:
            continue  # no default measured: every record, as before
        v, s = versus[i], _best_seconds(r)
        keep[j] = (s is not None and (v.default is None or s < v.default)
                   and allowed(insns.get(keys[j]), v.default_insns))
    return keep


def read_in_model(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]] | None:
    """The in-model verdicts of a database folder (``IN_MODEL_FILE``), or None when it has none. An unreadable file
    reads as no record judged (so none is applied: the safe side) with a warning."""
    f = Path(directory) / IN_MODEL_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        print(f"warning: {f}: unreadable ({e}); no tuned record is applied (re-judge: scripts/tune_pi.py --judge-only)",
              file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def judged_winners(workloads: list[Any], records: list[tuple[int, Any]], keys: list[str], keep: list[bool],
                   verdicts: dict[str, dict[str, Any]], defaults: dict[str, dict[str, Any]]) -> tuple[list[bool], list[str]]:
    """``keep`` narrowed to the records judged in a model to win there (``verdicts``, from ``IN_MODEL_FILE``), and
    "task (why)" for each workload that had a kernel-alone winner but keeps no record."""
    fastest: dict[int, tuple[float, int]] = {}  # workload -> (seconds, record) of its kernel-alone winner
    for j, (i, r) in enumerate(records):
        s = _best_seconds(r)
        if keep[j] and s is not None and s < fastest.get(i, (float("inf"), -1))[0]:
            fastest[i] = (s, j)
    judged = [keep[j] and bool(verdicts.get(keys[j], {}).get("apply", False)) for j in range(len(records))]
    kept = {i for j, (i, _) in enumerate(records) if judged[j]}
    refusals = []
    for i, (_, j) in sorted(fastest.items()):
        if i in kept:
            continue
        v = verdicts.get(keys[j])
        task = ((v or {}).get("task") or defaults.get(workload_key(workloads[i].mod), {}).get("task")
                or kernel_kind(workloads[i].mod) or f"workload {i}")
        refusals.append(f"{task} ({v['why'] if v else 'not judged in a model'})")
    return judged, refusals


def load_database(directory: str | os.PathLike[str], *, repair: bool = False,
                  winners_only: bool = False, judged: bool = True) -> tuple[Any, LoadReport]:
    """Read a MetaSchedule JSON database into a MemoryDatabase, checking every line; damaged lines are
    dropped and listed in the report. A read writes nothing (no lock file, no repair), so it is safe on a
    read-only folder and beside a running tune. ``repair=True`` first runs :func:`repair_database`.
    ``winners_only=True`` (what ``compile`` reads) keeps, of a workload whose default schedule was measured at tune
    time (``DEFAULTS_FILE``), only the records faster than that default and, where the default's instructions were
    counted, executing no more instructions than it (``INSNS_FILE``): the database's best for the workload is then
    the fastest record that satisfies both, and a workload with none keeps its default schedule. Where the folder
    holds in-model verdicts (``IN_MODEL_FILE``) and ``judged`` is true, only the records judged to win inside a model
    are kept of those (``tvm_lowbit.judge``)."""
    from tvm.s_tir import meta_schedule as ms

    d = Path(directory)
    mem = ms.database.MemoryDatabase()
    keys: list[str] = []
    if repair:
        fixed = repair_database(d)
        report = LoadReport(d, backups=fixed.backups, bad_lines=fixed.bad_lines)
        if not (d / WORKLOAD_FILE).is_file():
            return mem, report
        workloads, records = _parse_files(d, LoadReport(d), keys=keys)
    else:
        report = LoadReport(d)
        if not (d / WORKLOAD_FILE).is_file():
            return mem, report
        workloads, records = _parse_files(d, report, keys=keys)
    keep = [True] * len(records)
    if winners_only:
        defaults = read_defaults(d)
        keep = kernel_winners(workloads, records, defaults, read_instructions(d), keys, report)
        if judged and (verdicts := read_in_model(d)) is not None:
            keep, report.in_model_refusals = judged_winners(workloads, records, keys, keep, verdicts, defaults)
    for w in workloads:
        mem.commit_workload(w.mod)
    for j, (i, r) in enumerate(records):
        if keep[j]:
            mem.commit_tuning_record(r)
    report.workloads, report.records = len(workloads), len(records)
    return mem, report


def ranked_candidates(directory: str | os.PathLike[str]) -> dict[str, list[tuple[str, float]]]:
    """Per workload key, the records ``compile`` could apply by their kernel measured alone (``kernel_winners``;
    in-model verdicts not consulted), fastest first, as (record key, seconds): what ``tvm_lowbit.judge`` tries."""
    d = Path(directory)
    keys: list[str] = []
    workloads, records = _parse_files(d, LoadReport(d), keys=keys)
    keep = kernel_winners(workloads, records, read_defaults(d), read_instructions(d), keys)
    out: dict[str, list[tuple[str, float]]] = {}
    wkeys = [workload_key(w.mod) for w in workloads]
    for j, (i, r) in enumerate(records):
        if keep[j] and (s := _best_seconds(r)) is not None:
            out.setdefault(wkeys[i], []).append((keys[j], s))
    return {k: sorted(set(v), key=lambda e: (e[1], e[0])) for k, v in out.items()}


def write_subset(directory: str | os.PathLike[str], record_keys: set[str], out: str | os.PathLike[str]) -> int:
    """Write into the new folder ``out`` a database of ``directory``'s workloads and only the records whose
    ``record_key`` is in ``record_keys`` (no default measurements: ``compile`` applies each workload's best of them);
    returns how many records it holds."""
    src, dst = Path(directory), Path(out)
    keys: list[str] = []
    workloads, records = _parse_files(src, LoadReport(src), keys=keys)
    dst.mkdir(parents=True)
    chosen = [(i, r) for (i, r), k in zip(records, keys) if k in record_keys]
    (dst / WORKLOAD_FILE).write_text("".join(json.dumps(w.as_json()) + "\n" for w in workloads))
    (dst / RECORD_FILE).write_text("".join(json.dumps([i, _record_json(r)]) + "\n" for i, r in chosen))
    return len(chosen)


def write_in_model(directory: str | os.PathLike[str], verdicts: dict[str, dict[str, Any]]) -> None:
    """Merge ``verdicts`` (record key -> entry with "models": {model: judgement}) into ``IN_MODEL_FILE`` under the
    writers' lock; a record's "apply" is true only when every model it was judged in says so."""
    d = Path(directory)
    with _locked(d):
        merged = read_in_model(d) or {}
        for key, entry in verdicts.items():
            old = merged.get(key, {})
            models = {**old.get("models", {}), **entry["models"]}
            refused = [m for m, j in models.items() if not j["apply"]]
            merged[key] = {**old, **{k: v for k, v in entry.items() if k != "models"}, "models": models,
                           "apply": not refused,
                           "why": "; ".join(f"in {m}: {models[m]['why']}" for m in (refused or list(models)))}
        _swap_in(d, IN_MODEL_FILE, json.dumps(merged, indent=1, sort_keys=True) + "\n")
        os.chmod(d / IN_MODEL_FILE, 0o644)


def _plain_json(obj: Any) -> Any:
    """A TVM JSON object as plain Python, as MetaSchedule's own JSONDatabase writes it: its Python helper
    (``TuningRecord.as_json``) rejects the IndexMap of a ``transform_layout`` step, which the C++ writer
    stores as ``save_json`` text."""
    import tvm
    from tvm.ir import Array, Map
    from tvm.tirx import FloatImm, IntImm
    from tvm.tirx.function import IndexMap

    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, (IntImm, FloatImm)):
        return obj.value
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, IndexMap):
        return tvm.ir.save_json(obj)
    if isinstance(obj, (Array, list, tuple)):
        return [_plain_json(i) for i in obj]
    if isinstance(obj, (Map, dict)):
        return {_plain_json(k): _plain_json(v) for k, v in obj.items()}
    raise TypeError(f"cannot write {type(obj).__name__} into a tuning record")


def _record_json(record: Any) -> Any:
    from tvm.s_tir.meta_schedule import _ffi_api

    return _plain_json(_ffi_api.TuningRecordAsJSON(record))


def shared_database(directory: Path) -> Any:
    """A Database that keeps records in memory and appends each one to the JSON files under the lock (the
    database a tune writes). It repairs a damaged database first, and re-reads the workload numbering under
    the lock before each append, so a repair by another process (new files, new numbering) is followed."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class SharedJSONDatabase(ms.database.PyDatabase):
        def __init__(self) -> None:
            super().__init__()
            self.mem, self.load_report = load_database(directory, repair=True)
            self._file: tuple[int, int] | None = None  # the workload file indexed (device, inode)
            self._offset = 0  # bytes of the workload file already indexed
            self._count = 0  # non-empty lines seen so far
            self._index: dict[str, int] = {}

        def _sync_index(self) -> None:
            path = directory / WORKLOAD_FILE
            if not path.is_file():
                self._file, self._offset, self._count, self._index = None, 0, 0, {}
                return
            if _file_id(path) != self._file or path.stat().st_size < self._offset:  # replaced by a repair
                self._file, self._offset, self._count, self._index = _file_id(path), 0, 0, {}
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # index whole lines only
            for line in data[:end].decode().split("\n"):
                if line.strip():
                    self._index.setdefault(line.strip(), self._count)
                    self._count += 1
            self._offset += end

        def _append(self, name: str, line: str) -> None:
            fd = os.open(directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)

        def has_workload(self, mod: Any) -> bool:
            return self.mem.has_workload(mod)

        def commit_workload(self, mod: Any) -> Any:
            return self.mem.commit_workload(mod)

        def commit_tuning_record(self, record: Any) -> None:
            self.mem.commit_tuning_record(record)
            wl_line = json.dumps(record.workload.as_json())
            with _locked(directory):
                self._sync_index()
                if wl_line not in self._index:
                    self._append(WORKLOAD_FILE, wl_line)
                    self._sync_index()
                self._append(RECORD_FILE, json.dumps([self._index[wl_line], _record_json(record)]))

        def get_top_k(self, workload: Any, top_k: int) -> list[Any]:
            return self.mem.get_top_k(workload, top_k)

        def get_all_tuning_records(self) -> list[Any]:
            return self.mem.get_all_tuning_records()

        def query_tuning_record(self, mod: Any, target: Any, workload_name: str) -> Any:
            return self.mem.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod: Any, target: Any, workload_name: str) -> Any:
            return self.mem.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod: Any, target: Any, workload_name: str) -> Any:
            return self.mem.query_ir_module(mod, target, workload_name)

        def __len__(self) -> int:
            return len(self.mem)

    return SharedJSONDatabase()


# --------------------------------------------------------------------------------------------
# Tasks and design spaces
# --------------------------------------------------------------------------------------------

def prepare_module(mod: Any, target: Any) -> Any:
    """The module tuning and tuned compilation share: low-bit kernels opaque and unscheduled, float ops
    legalized and fused by Relax's "zero" pipeline (run once: it is not idempotent)."""
    from tvm import relax, tirx

    from tvm_lowbit.kernels import KERNEL_ATTR

    for gv, f in list(mod.functions_items()):
        if isinstance(f, tirx.PrimFunc) and KERNEL_ATTR in (f.attrs or {}):
            mod[gv] = f.with_attr("op_pattern", 8)  # kOpaque: FuseOps leaves the kernel whole
    with target:
        return relax.get_pipeline("zero")(mod)


def kernel_kind(mod: Any) -> str | None:
    from tvm import tirx

    from tvm_lowbit.kernels import KERNEL_ATTR

    for _, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs:
            return str(f.attrs[KERNEL_ATTR])
    return None


def kernel_space(kind: str, target: Any) -> Any:
    """The kernel's default schedule with its register-tile factors sampled, plus an unroll knob."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_lowbit.kernels import schedule_kernel

    def space(sch: Any) -> None:
        def pick(cands: list[int]) -> Any:  # the default (first) candidate gets half the probability
            rest = [0.5 / (len(cands) - 1)] * (len(cands) - 1) if len(cands) > 1 else []
            return sch.sample_categorical(cands, [1.0 - sum(rest), *rest])

        sch.work_on("main")
        schedule_kernel(sch, kind, target, pick)
        # how far to unroll the tile loops: a measured choice (the RewriteParallelVectorizeUnroll postproc
        # turns this root annotation into unroll pragmas)
        sch.annotate(sch.get_sblock("root"), "meta_schedule.unroll_explicit", pick([0, 16, 64, 512]))

    return ms.space_generator.ScheduleFn(space, sch_rules=[], postprocs="from-target", mutator_probs={})


@dataclass
class Task:
    name: str
    mod: Any
    weight: int
    kind: str | None  # the tvm_lowbit kernel, or None for a float op


def extract_tasks(prepared: Any, target: Any) -> list[Task]:
    from tvm.s_tir import meta_schedule as ms

    out = []
    for t in ms.relax_integration.extract_tasks(prepared, target):
        mod = t.dispatched[0]
        out.append(Task(t.task_name, mod, int(t.weight), kernel_kind(mod)))
    return out


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------

@dataclass
class RPCBoards:
    """Boards registered with a TVM RPC tracker under one key (``python -m tvm.exec.rpc_tracker``; each
    board runs ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``); ``n_parallel`` boards measure
    at once."""

    tracker_host: str
    tracker_port: int
    key: str
    n_parallel: int = 1
    timeout_sec: float = 120.0


def _host_fill(session: Any, device: Any, args_info: Any, alloc_repeat: int) -> Any:
    """Random inputs made on the host (the boards' runtime-only TVM lacks ``random_fill_for_measure``)."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(arg: Any) -> None:
        shape = [int(x) for x in arg.shape]
        arg.copyfrom(rng.integers(-8, 8, size=shape).astype(str(arg.dtype)))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


@dataclass
class TuneReport:
    directory: Path
    tasks: list[Task]
    trials_run: int
    trials_skipped: int  # already in the database (resumed)
    failed: int  # candidates that did not build or run
    seconds: float
    load: LoadReport
    errors: list[str] = field(default_factory=list)  # the failed candidates' build/run errors
    versus: list[VersusDefault] = field(default_factory=list)  # this model's kernel tasks against their defaults

    def text(self) -> str:
        s = (f"tuned {len(self.tasks)} tasks: {self.trials_run} trials run ({self.failed} failed to build or run), "
             f"{self.trials_skipped} already in the database, {self.seconds:.0f} s -> {self.directory}")
        if self.versus:
            counted = any(v.default_insns is not None for v in self.versus)
            rule = " with no more instructions" if counted else ""
            s += (f"; {sum(v.wins for v in self.versus)} of {len(self.versus)} kernel tasks have a record that beats "
                  f"their default schedule{rule} (compile applies the best such record; the others keep the default)")
            if vetoed := [v.task for v in self.versus if v.insns_veto]:
                s += (f"; {len(vetoed)} task(s)' fastest record executes more instructions than the default and is "
                      f"not applied ({', '.join(vetoed)})")
        return s


def _progress_callback(bar: Any, errors: list[str], measured: list[int]) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
                  runner_results: Any) -> None:
            for b, r in zip(builder_results, runner_results):
                if b.error_msg is not None or r.error_msg is not None:
                    errors.append(str(b.error_msg if b.error_msg is not None else r.error_msg))
            measured[0] += len(measure_candidates)
            bar.update(len(measure_candidates))
            bar.set_postfix(failed=len(errors), refresh=False)

    return Progress()


def _instruction_callback(directory: Path, counts: dict[str, float], keys: list[str]) -> Any:
    """A measure callback appending each measured candidate's instruction count (``counts``, by artifact path: the
    ``EstimateRunner``'s) to ``INSNS_FILE`` under its ``record_key`` (``keys[task_id]``: the task's workload key)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class InstructionLog(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
                  runner_results: Any) -> None:
            entries = []
            for c, b, r in zip(measure_candidates, builder_results, runner_results):
                if b.artifact_path is None or r.error_msg is not None:
                    continue
                n = counts.pop(str(b.artifact_path), None)
                if n is not None:
                    entries.append((record_key(keys[task_id], trace_json(c.sch.trace)), n))
            append_instructions(directory, entries)

    return InstructionLog()


def measurement(spec: Any, boards: RPCBoards | None) -> str:
    """How ``tune_module`` measures candidates for target ``spec``: "local" (this host), "rpc" (``boards``, over a
    tracker) or "estimate" (a board target whose emulated core has a cycle model, and no ``boards``)."""
    if spec.is_host:
        return "local"
    if boards is not None:
        return "rpc"
    if spec.arch == "aarch64" and spec.qemu_cpu in CORES:
        return "estimate"
    raise TuneError(f"target {spec.name} runs on a board and has no cycle model to estimate with: pass boards="
                    "RPCBoards(tracker_host, tracker_port, key) (`tvm-lowbit tune --tracker HOST:PORT --key KEY`)")


def check_database_kind(directory: Path, how: str) -> None:
    """Refuse to mix estimated run times with measured ones in one database (their units rank differently)."""
    if how == "estimate" and (directory / EMULATED_MARK).is_file():
        raise TuneError(f"{directory} holds run times measured under emulation ({EMULATED_MARK}): tune with the cycle "
                        "estimate into another folder (--out / work_dir), or remove that database first")
    if how != "estimate" and (directory / ESTIMATE_MARK).is_file():
        raise TuneError(f"{directory} holds estimated run times ({ESTIMATE_MARK}): tune with measurements into "
                        "another folder (--out / work_dir), or remove that database first")


def write_estimate_mark(directory: Path, cpu: str) -> None:
    """Mark ``directory`` as tuned with the cycle estimate for qemu core ``cpu``, naming the model and LLVM version
    (raises ``TuneError`` when llvm-mca or the core's model is missing, before any trial)."""
    try:
        c = core(cpu)
        mca, version = llvm_tool("llvm-mca"), llvm_version()
    except CostError as e:
        raise TuneError(f"cannot tune with the cycle estimate: {e}") from e
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ESTIMATE_MARK).write_text(
        f"Run times in this database are estimated cycles / clock, not measurements: each candidate ran on the "
        f"emulated board (qemu-aarch64 -cpu {c.qemu_cpu}) and llvm-mca timed the blocks it executed.\n"
        f"board: {c.board}\ncore model: llvm-mca -mcpu={c.mcpu} ({c.model})\nclock_hz: {c.clock_hz:.0f}\n"
        f"llvm: {version} ({mca})\n")


@contextmanager
def _closing(*workers: Any) -> Iterator[None]:
    """Stop warm workers (``EstimateRunner``'s boards, ``warm_builder``'s process) however the tune ends."""
    try:
        yield
    finally:
        for w in workers:
            if hasattr(w, "close"):
                w.close()


def measure_defaults(tasks: list[Task], target: Any, builder: Any, runner: Any) -> dict[str, dict[str, Any]]:
    """Each kernel task's default schedule (``kernels.schedule_default``, what ``compile`` builds without a record),
    built and measured by the tune's own builder and runner: {workload_key: {"task", "kind", "seconds", "insns"}}
    ("seconds" None when it did not build or run; "insns", executed instructions per call, only with a runner that
    counts them: ``EstimateRunner``)."""
    import shutil

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvm_lowbit.kernels import schedule_default

    kernel_tasks = [t for t in tasks if t.kind is not None]
    funcs = [schedule_default(t.mod, target) for t in kernel_tasks]
    built = builder.build([ms.builder.BuilderInput(tvm.IRModule({"main": f}), target) for f in funcs])
    pending = [runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(f))])[0]
               if b.error_msg is None else None for b, f in zip(built, funcs)]
    out: dict[str, dict[str, Any]] = {}
    counts: dict[str, float] = getattr(runner, "instructions", {})
    for t, b, fut in zip(kernel_tasks, built, pending):
        seconds, insns = None, None
        if fut is not None:
            res = fut.result()
            seconds = _best_seconds(res) if res.error_msg is None else None
            if res.error_msg is None and b.artifact_path is not None:
                insns = counts.pop(str(b.artifact_path), None)
            if res.error_msg is not None:
                print(f"warning: the default schedule of {t.name} did not run: {str(res.error_msg)[:300]}",
                      file=sys.stderr)
        else:
            print(f"warning: the default schedule of {t.name} did not build: {str(b.error_msg)[:300]}", file=sys.stderr)
        if b.artifact_path is not None:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
        entry: dict[str, Any] = {"task": t.name, "kind": t.kind, "seconds": seconds}
        if insns is not None:
            entry["insns"] = round(insns, 1)
        out[workload_key(t.mod)] = entry
    return out


def write_defaults(directory: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into ``directory``'s ``DEFAULTS_FILE`` (under the writers' lock)."""
    with _locked(directory):
        merged = {**read_defaults(directory), **entries}
        _swap_in(directory, DEFAULTS_FILE, json.dumps(merged, indent=1, sort_keys=True) + "\n")
        os.chmod(directory / DEFAULTS_FILE, 0o644)  # readable like the database files (mkstemp makes 0600)


def tune_module(mod: Any, target: str | Any, *, infos: dict[str, Any] | None = None, trials_per_task: int = 16,
                work_dir: str | os.PathLike[str] | None = None, boards: RPCBoards | None = None,
                num_trials_per_iter: int | None = None, progress: bool = True, seed: int | None = None,
                only_kernels: bool = False, max_trials_global: int | None = None,
                scheduler: str = "auto", estimate_workers: int | None = None) -> TuneReport:
    """Tune every task of an imported Relax module (``importer.import_torch`` / ``compiler.load_saved``; ``infos`` is
    its layer table) for ``target``. Records go to ``work_dir`` (default ``SCHEDULES_DIR/<target>/``), appended as
    they are measured; a task that already has ``trials_per_task`` records is skipped (resume).
    ``max_trials_global`` caps the trials of this run over all tasks (MetaSchedule shares them out):
    ``scheduler`` "round-robin" gives every task the same share, "gradient" (MetaSchedule's gradient-based
    task scheduler) gives more to the tasks that weigh most in the model's latency after a first round;
    "auto" is "gradient" when ``max_trials_global`` is less than the trials the tasks still lack in all,
    else "round-robin" (each task gets its own trials, so a rerun resumes exactly).
    A board target (rasp4b, rasp5) is measured on ``boards`` when given; without them, a target with an emulated
    board is tuned with the cycle estimate (``tvm_lowbit.cost.runner.EstimateRunner``, ``estimate_workers`` qemu
    processes at once) and its database gets the ``MEASURED_BY_ESTIMATE`` file (see ``measurement``)."""
    if scheduler not in ("auto", "round-robin", "gradient"):
        raise ValueError(f"scheduler={scheduler!r}: choose 'auto', 'round-robin' or 'gradient'")
    stub_gpu_intrinsics()
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    from tvm_lowbit.importer import strip_single_tuple
    from tvm_lowbit.passes import lower_integer_layers
    from tvm_lowbit.targets import load_target

    t0 = time.time()
    spec = load_target(target)
    tgt = spec.tvm_target()
    # the lowering passes, as the CPU backend's build runs them (tvm_lowbit.backends.cpu.build)
    mod = strip_single_tuple(lower_integer_layers(mod, infos, target=tgt)[0])
    directory = Path(work_dir) if work_dir is not None else SCHEDULES_DIR / spec.name
    how = measurement(spec, boards)
    check_database_kind(directory, how)
    prepared = prepare_module(mod, tgt)
    tasks = [t for t in extract_tasks(prepared, tgt) if t.kind is not None or not only_kernels]
    from tvm_lowbit.kernels import get as get_kernel

    fixed = [t.name for t in tasks if t.kind is not None and not get_kernel(t.kind).tunable]
    if fixed:  # fixed-code kernels (te.extern bodies): nothing to tune, and MetaSchedule cannot read them
        print(f"not tuned (fixed-code kernels): {', '.join(fixed)}", file=sys.stderr)
        tasks = [t for t in tasks if t.name not in fixed]
    database = shared_database(directory)
    load = database.load_report
    if load.bad_lines:
        print(f"warning: {load.text()}", file=sys.stderr)

    # resume: a task gets only the trials it still lacks
    ctxs, weights, todo, keys, skipped = [], [], [], [], 0
    for t in tasks:
        have = 0
        if database.has_workload(t.mod):
            have = len(database.get_top_k(database.commit_workload(t.mod), 10 ** 6))
        skipped += min(have, trials_per_task)
        if have >= trials_per_task:
            continue
        space = kernel_space(t.kind, tgt) if t.kind is not None else "post-order-apply"
        ctxs.append(ms.TuneContext(mod=t.mod, target=tgt, space_generator=space,
                                   search_strategy=ms.search_strategy.EvolutionarySearch(
                                       population_size=64, init_min_unmeasured=16, genetic_num_iters=2),
                                   task_name=t.name, rand_state=-1 if seed is None else seed, num_threads=1))
        weights.append(float(t.weight))
        todo.append(trials_per_task - have)
        keys.append(workload_key(t.mod))

    errors: list[str] = []
    if ctxs:
        if how == "local":
            builder = ms.builder.LocalBuilder(f_build=fast_build, max_workers=1, timeout_sec=180)
            runner = ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=10, enable_cpu_cache_flush=False))
        elif how == "estimate":
            # imported here, after stub_gpu_intrinsics (it imports MetaSchedule), like ``ms`` above
            from tvm_lowbit.cost.runner import EstimateRunner

            write_estimate_mark(directory, str(spec.qemu_cpu))
            builder = warm_builder(_cross_export(spec.compiler_path()), timeout_sec=240)
            runner = EstimateRunner(spec.name, max_workers=estimate_workers or 1)
        else:
            assert boards is not None
            builder = ms.builder.LocalBuilder(f_build=fast_build, f_export=_cross_export(spec.compiler_path()),
                                              max_workers=1, timeout_sec=180)
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=boards.tracker_host, tracker_port=boards.tracker_port,
                                               tracker_key=boards.key, session_priority=1,
                                               session_timeout_sec=int(boards.timeout_sec)),
                evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=10),
                f_alloc_argument=_host_fill, max_workers=boards.n_parallel)
        if how != "local":  # a board target: the bar each kernel's records must beat to be applied (compile's rule)
            known = read_defaults(directory)
            if missing := [t for t in tasks if t.kind is not None and workload_key(t.mod) not in known]:
                write_defaults(directory, measure_defaults(missing, tgt, builder, runner))
        total = sum(todo) if max_trials_global is None else min(sum(todo), max_trials_global)
        if scheduler == "auto":  # measured on ResNet-18 (README): gradient helps when the budget is short
            scheduler = "gradient" if total < sum(todo) else "round-robin"
        # small batches spread a small budget over every task (round-robin gives each task one batch a round)
        per_iter = num_trials_per_iter or max(2, min(8, total // len(ctxs)))
        with tqdm(total=total, desc=f"tuning {spec.name}", unit="trial", disable=not progress) as bar:
            measured = [0]
            cb = [_progress_callback(bar, errors, measured)]
            if isinstance(getattr(runner, "instructions", None), dict):  # the estimate counts instructions too
                cb.append(_instruction_callback(directory, runner.instructions, keys))
            with tempfile.TemporaryDirectory(prefix="tvm-lowbit-tune-") as logs, _closing(builder, runner):
                ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=logs, max_trials_global=total,
                              max_trials_per_task=max(todo), num_trials_per_iter=per_iter,
                              builder=builder, runner=runner, database=database,
                              cost_model=ms.cost_model.XGBModel(
                                  extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True,
                                  num_warmup_samples=8),
                              measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), *cb],
                              task_scheduler=scheduler)
            run = measured[0]
    else:
        run = 0
    versus: list[VersusDefault] = []
    if defaults := read_defaults(directory):
        names = {workload_key(t.mod): t.name for t in tasks if t.kind is not None}
        rec_keys: list[str] = []
        workloads, records = _parse_files(directory, LoadReport(directory), keys=rec_keys)
        versus = [dataclasses.replace(v, task=names[workload_key(w.mod)])
                  for w, v in zip(workloads, versus_default(workloads, records, defaults,
                                                            read_instructions(directory), rec_keys))
                  if workload_key(w.mod) in names]
    return TuneReport(directory, tasks, run, skipped, len(errors), time.time() - t0, load, errors, versus)


def tune(qmodel: Any, example_input: Any, target: str | Any = "x86-host", **kw: Any) -> TuneReport:
    """Tune a model from ``tvm_lowbit.quantize`` for ``target`` (see :func:`tune_module` for the options)."""
    import torch

    from tvm_lowbit.importer import import_torch, layer_infos

    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    return tune_module(import_torch(qmodel, x), target, infos=layer_infos(qmodel), **kw)


# --------------------------------------------------------------------------------------------
# Applying a database (the CPU backend's build)
# --------------------------------------------------------------------------------------------

@dataclass
class ApplyReport:
    directory: Path
    applied: list[str]
    missing: list[str]  # PrimFuncs with no record: default kernel schedule / TVM's default
    load: LoadReport
    workloads: dict[str, str] = field(default_factory=dict)  # every PrimFunc's name -> its workload_key

    def text(self) -> str:
        if not self.applied and self.missing:
            why = (", or no record beat the default schedule with no more instructions" if self.load.default_wins
                   else "")
            if self.load.in_model_refusals:
                why += (f", or its record lost inside the model: {len(self.load.in_model_refusals)} refused "
                        f"({'; '.join(self.load.in_model_refusals)})")
            return (f"tuned schedules from {self.directory}: no record matches any of this model's {len(self.missing)} "
                    f"workloads (tuned for another model, quantization or kernel version{why}); default schedules used")
        s = f"tuned schedules from {self.directory}: {len(self.applied)} workloads applied"
        if self.load.default_wins:
            s += (f" ({len(self.load.default_wins)} workloads of the database keep the default schedule: no record "
                  "beat it in run time with no more instructions where those were counted)")
        if self.load.insns_vetoes:
            s += (f" ({len(self.load.insns_vetoes)} workloads' fastest record executes more instructions than the "
                  "default schedule and is not applied)")
        if self.load.in_model_refusals:
            s += (f" ({len(self.load.in_model_refusals)} workloads' records win on the kernel alone but not in the "
                  f"model and are not applied: {'; '.join(self.load.in_model_refusals)})")
        if self.missing:
            s += f", {len(self.missing)} without a record (default schedule): {', '.join(self.missing)}"
        return s


_LOADED: dict[tuple, tuple[Any, LoadReport]] = {}


def _cached_database(directory: Path) -> tuple[Any, LoadReport]:
    """load_database once per process and file version (parsing every workload's IR takes seconds)."""
    stats = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                  for f in (directory / WORKLOAD_FILE, directory / RECORD_FILE, directory / DEFAULTS_FILE,
                            directory / INSNS_FILE, directory / IN_MODEL_FILE))
    key = (str(directory.resolve()), stats)
    if key not in _LOADED:
        db, load = load_database(directory, winners_only=True)  # a read: no lock, no repair
        if load.bad_lines:
            print(f"warning: {load.text()}", file=sys.stderr)
        _LOADED[key] = (db, load)
    return _LOADED[key]


def apply_database(mod: Any, target: Any, directory: str | os.PathLike[str]) -> tuple[Any, ApplyReport]:
    """``prepare_module`` + the database's best schedule for each PrimFunc that has a record; returns the
    module (kernels without a record still unscheduled) and which workloads had no record."""
    from tvm import relax, tirx

    stub_gpu_intrinsics()
    db, load = _cached_database(Path(directory))
    prepared = prepare_module(mod, target)
    import tvm

    with target, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)
    done, missing = [], []
    for gv, f in applied.functions_items():
        if isinstance(f, tirx.PrimFunc):
            (done if f.attrs is not None and f.attrs.get("tirx.is_scheduled", False) else missing).append(gv.name_hint)
    # the key each PrimFunc was looked up under (as ``extract_tasks`` forms a task's module)
    keys = {gv.name_hint: workload_key(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))
            for gv, f in prepared.functions_items() if isinstance(f, tirx.PrimFunc)}
    return applied, ApplyReport(Path(directory), sorted(done), sorted(missing), load, keys)
