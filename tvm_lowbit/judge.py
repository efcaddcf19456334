"""Judge tuned records inside the model: a record that needs fewer estimated cycles than the default schedule on its
kernel alone can still lose inside the model (other data, other code around it), so a database tuned on the cycle
estimate is checked where it will run.

The model is built twice for the board target: with the default schedules, and with one candidate record per
workload (``tune.ranked_candidates``: the fastest record that beats the default on its kernel alone, with no more
instructions); each build runs once on the emulated board under the TCG plugin, and the estimate of ``model.so`` is
attributed to its functions (``tvm_lowbit.cost.attribute``: a PrimFunc's entry, body and parallel-loop bodies). Per
workload, the record is kept only when its PrimFuncs (every function of the model that is that workload) need fewer
estimated cycles *and* no more executed instructions than the same PrimFuncs built with the default schedule. A
refused workload's next candidate is tried in a further round (``rounds``). Both builds must give the same output
bits (only integer kernels are re-scheduled); a round whose output differs refuses its new records.

The verdicts go to the database folder (``tune.IN_MODEL_FILE``, by record key, per model); where that file exists,
``compile`` applies only records judged there to win (``tune.load_database``). The estimate is per-block and ignores
caches, so one function's cost does not depend on the other functions' schedules: one build with every candidate
judges them all at once.

    from tvm_lowbit.judge import judge_model
    rep = judge_model(qmodel, x, "rasp4b", "tvm_lowbit/schedules/rasp4b", label="resnet20 tvm-fgq-n4")
    print(rep.text())
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvm_lowbit import tune
from tvm_lowbit.compiler import compile as compile_model
from tvm_lowbit.cost.attribute import Attribution, Share, attribute_file
from tvm_lowbit.cost.mca import core
from tvm_lowbit.deploy.board import BoardError, icount_plugin, qemu_cpu
from tvm_lowbit.deploy.bundle import export_bundle, run_bundle_emulated


class JudgeError(RuntimeError):
    pass


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.2f}%" if old else "n/a"


@dataclass
class Judgement:
    """One record of one workload, inside one model: the workload's PrimFuncs with the default schedule and with it."""

    workload: str
    record: str
    functions: list[str]
    default: Share
    tuned: Share
    alone: float  # the record's estimated seconds on its kernel alone (what tuning measured)
    output_changed: bool = False

    @property
    def apply(self) -> bool:
        return (not self.output_changed and self.tuned.cycles < self.default.cycles
                and self.tuned.insns <= self.default.insns)

    @property
    def why(self) -> str:
        if self.output_changed:
            return "the model's output changed with this round's records"
        verdict = "wins" if self.apply else "loses"
        return (f"{verdict} in the model: est. cycles {self.tuned.cycles:,.0f} vs {self.default.cycles:,.0f} default "
                f"({_pct(self.tuned.cycles, self.default.cycles)}), instructions {self.tuned.insns:,d} vs "
                f"{self.default.insns:,d} ({_pct(self.tuned.insns, self.default.insns)})")


@dataclass
class JudgeReport:
    label: str
    target: str
    directory: Path
    default: Attribution  # the model with the default schedules
    judgements: list[Judgement] = field(default_factory=list)
    builds: int = 0  # tuned builds run (rounds)
    seconds: float = 0.0
    not_judged: list[str] = field(default_factory=list)  # workloads of the model whose candidates ran out of rounds

    def accepted(self) -> list[Judgement]:
        return [j for j in self.judgements if j.apply]

    def with_accepted(self) -> Share:
        """The model's estimate with the accepted records (the attribution is additive per function)."""
        acc = self.accepted()
        return Share(self.default.total.cycles + sum(j.tuned.cycles - j.default.cycles for j in acc),
                     self.default.total.insns + sum(j.tuned.insns - j.default.insns for j in acc))

    def text(self) -> str:
        d, w = self.default.total, self.with_accepted()
        refused = [j for j in self.judgements if not j.apply]
        s = (f"{self.label} on {self.target}: judged {len(self.judgements)} record(s) in the model over {self.builds} "
             f"tuned build(s): {len(self.accepted())} kept, {len(refused)} refused"
             + (f", {len(self.not_judged)} workload(s) left unjudged (rounds ran out)" if self.not_judged else "")
             + f"; model.so with the kept records: {w.cycles:,.0f} est. cycles ({_pct(w.cycles, d.cycles)}), "
             f"{w.insns:,d} instructions ({_pct(w.insns, d.insns)}) vs the default schedules' {d.cycles:,.0f} / "
             f"{d.insns:,d}; unattributed {self.default.share_unattributed() * 100:.2f}% of the default's cycles "
             f"({', '.join(sorted(self.default.unattributed)) or 'none'}) ({self.seconds:.0f} s)")
        return s

    def table(self) -> str:
        rows = ["| model | functions | kernel alone est. us | in model: default cycles | record cycles | default "
                "insns | record insns | verdict |", "|---|---|---|---|---|---|---|---|"]
        for j in self.judgements:
            rows.append(f"| {self.label} | {', '.join(j.functions)} | {j.alone * 1e6:.2f} | {j.default.cycles:,.0f} | "
                        f"{j.tuned.cycles:,.0f} ({_pct(j.tuned.cycles, j.default.cycles)}) | {j.default.insns:,d} | "
                        f"{j.tuned.insns:,d} ({_pct(j.tuned.insns, j.default.insns)}) | "
                        f"{'kept' if j.apply else 'refused'} |")
        return "\n".join(rows)


def run_on_board(art: Any, x: np.ndarray, folder: Path, cpu: str) -> tuple[Attribution, np.ndarray]:
    """Bundle ``art`` into ``folder``, run one inference on the emulated board under the plugin, and return the
    attribution of model.so's estimate and the output. The blocks must account for every instruction the plugin
    counted in model.so."""
    bundle = export_bundle(art, folder / "bundle", x)
    counts, blocks = folder / "counts.json", folder / "blocks.txt"
    r = run_bundle_emulated(bundle, cpu, runs=1, plugin=f"{icount_plugin()},out={counts},match=/model.so,"
                            f"blocks={blocks}")
    if r.returncode != 0:
        raise BoardError(f"the runner failed on -cpu {cpu} (rc {r.returncode}): {(r.stdout + r.stderr)[-500:]}")
    att = attribute_file(blocks, bundle / "model.so", core(cpu))
    counted = int(json.loads(counts.read_text())["matched_insns"])
    if att.total.insns != counted:
        raise JudgeError(f"{bundle / 'model.so'}: the recorded blocks hold {att.total.insns:,d} instructions, the "
                         f"plugin counted {counted:,d}: the blocks file is incomplete")
    return att, np.fromfile(bundle / "output.bin", dtype=np.float32)


def judge_model(qmodel: Any, example_input: Any, target: str, directory: str | os.PathLike[str], *, label: str,
                rounds: int = 2, write: bool = True) -> JudgeReport:
    """Judge ``directory``'s candidate records inside ``qmodel`` (a ``tvm_lowbit.quantize`` model) on ``target``'s
    emulated board (see the module's docstring); with ``write`` the verdicts are merged into the folder's
    ``IN_MODEL_FILE`` under ``label``."""
    t0 = time.time()
    d = Path(directory)
    cpu = qemu_cpu(target)
    x = np.asarray(example_input, dtype=np.float32)
    ranked = tune.ranked_candidates(d)
    with tempfile.TemporaryDirectory(prefix="judge-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "default").mkdir()
        base, out0 = run_on_board(compile_model(qmodel, x, target, schedules=False), x, tmp / "default", cpu)
        rep = JudgeReport(label, target, d, base)
        accepted: dict[str, str] = {}
        refused: set[str] = set()
        alone = {k: s for cands in ranked.values() for k, s in cands}
        for r in range(rounds):
            chosen = {w: accepted.get(w) or next((k for k, _ in c if k not in refused), None) for w, c in ranked.items()}
            new = {w: k for w, k in chosen.items() if k is not None and accepted.get(w) != k}
            if not new:
                break
            sub = tmp / f"round{r}"
            tune.write_subset(d, {k for k in chosen.values() if k is not None}, sub / "db")
            art = compile_model(qmodel, x, target, schedules=sub / "db")
            assert art.tuning is not None
            funcs: dict[str, list[str]] = {}
            for name in art.tuning.applied:
                funcs.setdefault(art.tuning.workloads[name], []).append(name)
            ranked = {w: c for w, c in ranked.items() if w in funcs}  # later rounds: this model's workloads only
            new = {w: k for w, k in new.items() if w in funcs}
            if not new:
                break
            att, out = run_on_board(art, x, sub, cpu)
            rep.builds += 1
            changed = out.tobytes() != out0.tobytes()
            for w, k in sorted(new.items()):
                names = sorted(funcs[w])
                j = Judgement(w, k, names, base.of(names), att.of(names), alone[k], changed)
                rep.judgements.append(j)
                if j.apply:
                    accepted[w] = k
                else:
                    refused.add(k)
        rep.not_judged = sorted(w for w, c in ranked.items() if w not in accepted and
                                any(k not in refused for k, _ in c))
    if write and rep.judgements:
        tune.write_in_model(d, {j.record: {"workload": j.workload, "task": ", ".join(j.functions),
                                           "models": {label: {"apply": j.apply, "why": j.why,
                                                              "default_cycles": round(j.default.cycles, 1),
                                                              "record_cycles": round(j.tuned.cycles, 1),
                                                              "default_insns": j.default.insns,
                                                              "record_insns": j.tuned.insns,
                                                              "target": target}}}
                                for j in rep.judgements})
    rep.seconds = time.time() - t0
    return rep
