"""Rounding refinement against each layer's FP32 output: GPTQ-style error feedback (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", after Optimal Brain
Quantization; an AdaRound-like alternative to rounding to nearest that needs no training loop).

For a layer with input patches X (calibration images through the FP32 network), rounding weight
column j to its grid leaves an error that the not-yet-rounded columns absorb, weighted by the inverse
of H = X^T X: the codes then minimise ||X W^T - X W_q^T|| far better than rounding each weight to its
nearest level.  The grid (the scales) is kept: int4/int8 steps and ternary alphas come from the
nearest-rounding quantizer, only the integer codes move, so the compiled form is unchanged.
Power-of-two weights keep their projection (their grid is not uniform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm
from torch import nn

from tvm_lowbit.formats import WeightObject, format_for_recorded
from tvm_lowbit.quantizers import inputs
from tvm_lowbit.quantizers.layers import WeightUse, observe_module, unobserve_module
from tvm_lowbit.quantizers.surgery import analyze

DAMP = 0.01  # H += DAMP * mean(diag H) * I, as GPTQ does, so the Cholesky factor exists


GPTQ_BLOCK = 128  # columns rounded before their error is passed on to the later columns in one product
ROWS_PER_BATCH = 4096  # input rows (conv patches) per layer and batch kept for H: a random subset beyond


def _numeric_padding(use: WeightUse, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(input, numeric padding) equivalent to ``use``'s padding (``"same"``/``"valid"`` resolved)."""
    if not isinstance(use.padding, str):
        return x, tuple(use.padding)  # type: ignore[return-value]
    if use.padding == "valid":
        return x, (0, 0)
    kh, kw = use.weight.shape[-2:]
    th, tw = use.dilation[0] * (kh - 1), use.dilation[1] * (kw - 1)
    return F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2]), (0, 0)


def _patches(use: WeightUse, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[groups, rows, d] input rows whose dot product with a weight row [d] gives one output value
    (at most ``ROWS_PER_BATCH`` rows: random output positions, unfolded image by image so a large
    feature map is never unfolded whole)."""
    x = x.detach().float()
    if use.kind != "conv2d":
        p = x.reshape(1, -1, x.shape[-1])
        if p.shape[1] > ROWS_PER_BATCH:
            p = p[:, torch.randperm(p.shape[1], generator=gen)[:ROWS_PER_BATCH]]
        return p
    x, pad = _numeric_padding(use, x)
    kh, kw = use.weight.shape[-2:]
    (dh, dw), (sh, sw) = use.dilation, use.stride
    x = F.pad(x, [pad[1], pad[1], pad[0], pad[0]])
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    per_image = max(ROWS_PER_BATCH // x.shape[0], 1)
    parts = []
    for img in x:
        # F.unfold's columns [C*R*S, positions] at the chosen output positions only, gathered offset by offset
        pos = torch.randperm(oh * ow, generator=gen)[:per_image] if oh * ow > per_image else torch.arange(oh * ow)
        oy, ox = (pos // ow) * sh, (pos % ow) * sw
        cols = torch.stack([img[:, oy + r * dh, ox + t * dw] for r in range(kh) for t in range(kw)], 1)
        cols = cols.reshape(-1, cols.shape[-1])
        parts.append(cols.reshape(use.groups, -1, cols.shape[1]).transpose(1, 2))  # [g, l, d]
    return torch.cat(parts, 1)


def input_hessians(model: nn.Module, layers: list[str], images: object, batch_size: int = 32,
                   uses: dict[str, WeightUse] | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """H = X^T X / rows per layer (and conv group) on the FP32 network: ``[groups, d, d]`` float64.
    ``images``: calibration inputs (``quantizers.inputs``); ``uses``: each layer's weight use (read
    off the model when None)."""
    acc: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    gen = torch.Generator().manual_seed(0)
    whole = inputs.gather(images, batch_size, n_inputs=inputs.positional_inputs(model))
    known = uses if uses is not None else analyze(model, inputs.take(whole, 0, 1)).uses

    def seen(name: str, func: object, args: tuple, kwargs: dict) -> None:
        p = _patches(known[name], args[0] if args else kwargs["input"], gen)
        acc[name] = acc.get(name, 0) + (p.transpose(1, 2) @ p).double()  # float32 products, summed in float64
        rows[name] = rows.get(name, 0) + p.shape[1]

    mods = {n: model.get_submodule(n) for n in layers if n in known}
    for n, m in mods.items():
        observe_module(m, lambda f, a, k, _o, n=n: seen(n, f, a, k))
    try:
        with torch.no_grad():
            for b in tqdm(inputs.split(whole, batch_size), desc="GPTQ input statistics", disable=not progress,
                          leave=False):
                inputs.call(model, b)
    finally:
        for m in mods.values():
            unobserve_module(m)
    return {n: acc[n] / rows[n] for n in layers if n in acc}


def gptq_codes(w: torch.Tensor, step: torch.Tensor, lo: int, hi: int, hessian: torch.Tensor,
               act_order: bool = False) -> torch.Tensor:
    """Integer codes c in [lo, hi] (float64, w's shape) so that ``step * c`` approximates ``w`` in the
    output norm of ``hessian`` ([groups, d, d]; the weight's rows are split evenly over the groups).
    ``act_order``: round the columns in descending order of diag(H) (GPTQ's "act-order": the inputs with
    the most energy first, while the most columns are left to absorb their error); the grid (``step``
    per element) is unchanged, so it holds for grouped scales too."""
    k = w.shape[0]
    g, d, _ = hessian.shape
    W = w.detach().double().reshape(g, k // g, d).clone()
    S = step.double().reshape(g, k // g, d)
    H = hessian.double().clone()
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True, stable=True)  # [g, d]
        rows = perm[:, None, :].expand(-1, W.shape[1], -1)
        codes = gptq_codes(torch.gather(W, 2, rows).reshape(k, d), torch.gather(S, 2, rows).reshape(k, d),
                           lo, hi, torch.gather(torch.gather(H, 1, perm[:, :, None].expand(-1, -1, d)), 2,
                                                perm[:, None, :].expand(-1, d, -1)))
        out = torch.empty_like(W)
        out.scatter_(2, rows, codes.reshape(g, k // g, d))
        return out.reshape(w.shape)
    eye = torch.eye(d, dtype=H.dtype)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0  # an input that is always zero: its weight does not matter
    H = H + torch.diag_embed(dead.double())
    H = H + DAMP * torch.diagonal(H, dim1=1, dim2=2).mean(1)[:, None, None] * eye
    # all groups at once (a depthwise conv has hundreds of tiny ones); a group whose factorization
    # fails (not positive definite even after damping) keeps nearest rounding
    L, info = torch.linalg.cholesky_ex(H)
    ok = info == 0
    U = torch.zeros_like(H)
    if bool(ok.any()):
        Hinv = torch.cholesky_inverse(L[ok])
        Uo, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
        idx = torch.nonzero(ok).flatten()
        good = info2 == 0
        U[idx[good]] = Uo[good]
        ok[idx[~good]] = False
    U[~ok] = eye  # identity: no error feedback (nearest rounding) for these groups
    # GPTQ's lazy batch updates: the error of a block of columns reaches the columns after the block
    # in one matrix product (the same arithmetic, column by column it is memory-bound: 13 s for a
    # 1000 x 1280 Linear, under 1 s blocked)
    Wt, St = W.transpose(1, 2).contiguous(), S.transpose(1, 2).contiguous()  # [g, d, rows]: a column is contiguous
    ct = torch.zeros_like(Wt)
    for b0 in range(0, d, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, d)
        Wb = Wt[:, b0:b1]  # contiguous: the block's columns
        Eb = torch.empty_like(Wb)
        for j in range(b0, b1):
            s = St[:, j]
            c = torch.where(s > 0, torch.round(Wb[:, j - b0] / s.clamp_min(1e-300)), torch.zeros_like(s)).clamp(lo, hi)
            ct[:, j] = c
            err = (Wb[:, j - b0] - c * s) / U[:, j, j][:, None]
            Wb[:, j - b0 + 1:] -= U[:, j, j + 1:b1][:, :, None] * err[:, None, :]
            Eb[:, j - b0] = err
        if b1 < d:
            Wt[:, b1:] -= U[:, b0:b1, b1:].transpose(1, 2) @ Eb
    codes = ct.transpose(1, 2)
    return codes.reshape(w.shape)


def refine(tw: WeightObject, w: torch.Tensor, hessian: torch.Tensor) -> WeightObject:
    """``tw`` (the nearest-rounding weight of ``w``) with GPTQ codes on the same grid (its format's
    ``rounding_grid``); weights whose format has no uniform grid (power of two) are returned unchanged."""
    spec = format_for_recorded(str(tw.format))
    grid = spec.rounding_grid(tw) if spec is not None else None
    if spec is None or grid is None:
        return tw
    step, lo, hi = grid
    return spec.with_codes(tw, gptq_codes(w, step, lo, hi, hessian))
