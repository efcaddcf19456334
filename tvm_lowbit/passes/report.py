"""LoweringReport: which layers the pipeline lowered to which integer kernel and why, and which stayed float."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoweringReport:
    lowered: list[str] = field(default_factory=list)
    requant_fused: list[str] = field(default_factory=list)
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (layer, why it stayed in float)
    kernels: dict[str, str] = field(default_factory=dict)  # lowered layer -> its weight format ("ternary", "pow2", ...)
    requant_folded: int = 0  # redundant re-quantizers removed by FoldRequantize
    # lowered layer -> the ISA of its kernel where it is not the generic one: "avx2" | "sdot" | "lut" | ...
    fast_kernels: dict[str, str] = field(default_factory=dict)
    kernel_names: dict[str, str] = field(default_factory=dict)  # lowered layer -> registered kernel name
    kernel_reasons: dict[str, str] = field(default_factory=dict)  # lowered layer -> why that kernel (registry)
    # layers on a kernel with the cheaper exact epilogues (kernels.requant): layer -> "integer" (requantization
    # in int64), "fma" (float32 fused multiply-add), "fma+recip" (and the requantization's division as a
    # multiply and a fused correction) or "float64: <why neither is proven exact>"
    epilogue_forms: dict[str, str] = field(default_factory=dict)
    # embedding tables stored as integers (passes.embedding): table -> storage ("int8 per row", "int4-g32", ...)
    embeddings: dict[str, str] = field(default_factory=dict)

    def kernel_of(self, name: str) -> str:
        """The weight format of the kernel layer ``name`` was lowered to ("ternary" if not recorded)."""
        return self.kernels.get(name, "ternary")

    def text(self) -> str:
        counts: dict[str, int] = {}
        for name in self.lowered:
            counts[self.kernel_of(name)] = counts.get(self.kernel_of(name), 0) + 1
        what = {"ternary": "grouped-ternary", "pow2": "power-of-two"}
        kinds = ", ".join(f"{n} {what.get(k, k)}" for k, n in counts.items()) or "none"
        lines = [f"{len(self.lowered)} layer(s) lowered to integer kernels ({kinds}; "
                 f"{len(self.requant_fused)} with fused requantization)"]
        described = {"avx2": "AVX2 int8 dot-product kernels (vpmaddubsw/vpmaddwd)",
                     "sdot": "aarch64 int8 dot-product kernels (sdot)",
                     "dotprod": "aarch64 folded-alpha int8 dot-product kernels (sdot)",
                     "a76": "aarch64 folded-alpha int8 dot-product kernels for the Cortex-A76 (sdot)",
                     "neon": "aarch64 folded-alpha int8 kernels (smull/smlal/sadalp)",
                     "lut": "lookup-table ternary kernel (few rows, large weight)"}
        for isa in dict.fromkeys([*described, *self.fast_kernels.values()]):
            n = sum(v == isa for v in self.fast_kernels.values())
            if n:
                lines.append(f"  {n} of them on the {described.get(isa, f'{isa} kernels')}")
        if self.requant_folded:
            lines.append(f"  {self.requant_folded} redundant re-quantizer(s) folded (same scale, codes unchanged)")
        if self.epilogue_forms:
            forms = list(self.epilogue_forms.values())
            n_fma = sum(f.startswith("fma") for f in forms)
            lines.append(f"  epilogues: {forms.count('integer')} integer, {n_fma} float32 fma "
                         f"({forms.count('fma+recip')} of them division-free), "
                         f"{len(forms) - forms.count('integer') - n_fma} float64 (of {len(forms)})")
        lines += [f"  float64 epilogue kept: {name}: {why}" for name, why in self.epilogue_forms.items()
                  if why.startswith("float64")]
        if self.embeddings:
            lines.append(f"  {len(self.embeddings)} embedding table(s) gathered from integers: "
                         + ", ".join(f"{n} ({s})" for n, s in self.embeddings.items()))
        lines += [f"  fallback to float: {name}: {why}" for name, why in self.fallback]
        return "\n".join(lines)
