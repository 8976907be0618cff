"""The chunked engine: the fused engine's algorithm in plain PyTorch ops, flat in memory.

This is the default kernel of the ``magloss::margin_ce`` ops wherever the compiled CUDA
kernels are not in use (the CPU; a GPU without the extension; float64 on a GPU). It
computes exactly what :mod:`magloss.reference` computes (the oracle of the tests; the
row helpers both use are :mod:`magloss.rows`, the input checks :mod:`magloss.checks`), but
never forms a B×C matrix: the classes are visited in chunks of at most ``N`` columns
(:func:`chunk_columns`) and only B×N tiles exist at any time.

Notation (as docs/cpu_engine.md): x [B, D], W [C, D], a_i = ‖x_i‖, x̂_i = x_i/max(a_i, ε),
r_j = 1/max(‖w_j‖, ε), c_ij = (x̂_i·w_j)·r_j, scale_i = s (a_i for feature-norm SphereFace),
z_ij = scale_i·c_ij off the label, z_iy = scale_i·ψ_i.

Forward:

1. Row stage, O(B·D): a_i, x̂_i, the label cosine by a gather-dot with w_y, ψ_i, ∂ψ/∂c,
   ∂ψ/∂a (:func:`magloss.margins.margin_terms`), zy_i, reg_i.
2. Per chunk of classes: r_j of the chunk, the tile Z = (scale·x̂)·W_chunkᵀ (one product),
   one pass Z·r − scale_i, the label logit swapped in for rows whose label is in the chunk,
   exp and a row sum. scale_i bounds every logit of row i, so the shifted sum needs no max
   pass; rows whose sum would lose accuracy to underflow are redone with the online
   log-sum-exp (running row max, rescaled running sum).

Backward, from the saved lse (p_ij = exp(z_ij − lse_i)), per chunk:

1. The same tile, then U_ij = p_ij·r_j, with 0 at the label column;
   G_ij = gs_i·p_ij off the label with gs_i = grad_lse_i·scale_i, so T = G·r = gs·U.
2. ∂L/∂x̂ += U·W_chunk (the row factor gs_i is applied once at the end).
3. The column correction, written straight into ∂W's chunk: the coefficient
   r_j²·Σ_i G_ij c_ij = r_j²·Σ_i T_ij (x̂_i·w_j) comes from the tile (a B-long GEMV), then
   ∂W_chunk = −coef·W_chunk + Uᵀ·(gs·x̂) (one product accumulating into the chunk).
4. The label column's exact G_iy = scale_i·∂L/∂z_iy·∂ψ/∂c enters as a rank-one term of
   row i's ∂L/∂x̂ and of class y_i's ∂W row (added to the chunk that holds y_i before the
   loop leaves it).

After the loop, the row chain: Σ_j G_ij c_ij = ∂L/∂x̂_i·x̂_i, and
∂L/∂x_i = (∂L/∂x̂_i − x̂_i·Σ_j G_ij c_ij)/a_i + ∂L/∂a_i·x̂_i.

The general tile (K > 1 sub-centers or CurricularFace's columns; the plain path above is
untouched when neither is in use): a chunk is n whole classes, K·n rows of W, n =
chunk_columns(B, K·C) // K. The tile holds the sub-center cosines, the class cosine is the
max over each class's K (the winner's index kept), and the logits are scale_i·f(c_ij) with
f(c) = c·(t + c) where c > τ_i (else c). The backward's G_ij = gs_i·p_ij·f'_ij (f' = t + 2c
there, else 1) is written at the winning sub-center's column only, and the label class's
correction goes to the row stage's winner among its K (found by a K-wide gather-dot). The
shift is scale_i·(1 + abs(t)) (c·(t + c) ≤ 1 + abs(t) on [−1, 1]). Per-row margins (row_margins) only change the row stage.

Extra memory (beyond x, W and their gradients): two B×N tiles, O(B·D) row buffers, and for
float16/bfloat16 inputs an N×D float32 copy of the chunk (plus an N×D float32 buffer for a
half-precision ∂W): independent of C. The products are 1 (forward) + 3 (backward), the
backward recomputing the forward's tile, as the fused engine does: the flat path.

The speed path (``keep=True`` / ``kept=``): the forward writes each chunk's product into its
column block of a kept B×K·C matrix (and the row norms into a K·C vector), the backward reads
them instead of recomputing: 1 + 2 products, B×K·C extra values from the forward to the
backward. :func:`select_path` picks the path per call (MAGLOSS_PATH, MAGLOSS_SPEED_BUDGET,
:class:`use_path`; docs/cpu_engine.md).

Precision: margin, softmax and reductions in float32 (float64 for float64 inputs). For
float16/bfloat16 embeddings (with a weight of the same dtype, or float32 under autocast)
the products also run in float32, on the operands rounded to the embeddings' dtype, i.e.
the reference's arithmetic: the CPU has no fast half-precision product path, and the
result carries no error beyond the inputs' rounding.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import switches
from .checks import check_extras, check_values, num_classes_of
from .margins import NORM_EPS, MarginSpec, margin_terms, regularizer
from .rows import class_cosines, compute_dtype, curricular, label_subcenters, saturating_cast, weight_operand
from .validation import check_int

__all__ = ["DEFAULT_TILE", "PATHS", "chunk_columns", "kept_bytes", "margin_ce_forward", "margin_ce_backward",
           "select_path", "use_path"]

#: Elements of one B×N float tile the default chunk width aims at (2 MiB in float32):
#: the tiles, and the class chunk the backward's three products share, stay in cache.
DEFAULT_TILE = 1 << 19
#: Bounds of the default chunk width (columns).
MIN_CHUNK, MAX_CHUNK = 256, 4096


def chunk_columns(batch: int, num_classes: int, chunk: Optional[int] = None) -> int:
    """The class-chunk width N for a batch of ``batch`` rows and ``num_classes`` classes.

    ``chunk`` (or, when it is None, the environment variable ``MAGLOSS_CHUNK``, the same
    switch as the fused engine's) forces a width; otherwise N = DEFAULT_TILE / batch,
    rounded up to a multiple of 256 and kept in [256, 4096]. Always in [1, max(C, 1)].

    Raises:
        ValueError: ``chunk`` or MAGLOSS_CHUNK is not a positive integer.
    """
    if chunk is None:
        chunk = switches.positive_int("MAGLOSS_CHUNK")
    else:
        chunk = check_int("chunk", chunk, 1)
    if chunk is None:
        n = -(-DEFAULT_TILE // max(batch, 1))
        chunk = min(max(-(-n // 256) * 256, MIN_CHUNK), MAX_CHUNK)
    return max(min(chunk, num_classes), 1)


#: The engine's paths: "speed" keeps the forward's products (three products per step, B×K·C
#: extra memory), "flat" recomputes them in the backward (four products, memory flat in C),
#: "auto" picks "speed" when its extra memory fits the budget (:func:`select_path`).
PATHS = ("auto", "speed", "flat")
_override: Optional[Tuple[str, Optional[int]]] = None


def _env_path() -> Tuple[str, Optional[int]]:
    """MAGLOSS_PATH (auto|speed|flat, default auto) and MAGLOSS_SPEED_BUDGET (bytes, default
    None: the weight's size), checked."""
    return (switches.choice("MAGLOSS_PATH", PATHS),
            switches.positive_int("MAGLOSS_SPEED_BUDGET", 0, " (bytes)"))


def _checked_choice(path, budget) -> Tuple[str, Optional[int]]:
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return path, None if budget is None else check_int("budget", budget, 0, " (bytes) or None")


class use_path:
    """Context manager forcing the engine's path inside its block, over MAGLOSS_PATH and
    MAGLOSS_SPEED_BUDGET: ``with magloss.chunked.use_path("flat"): loss = ...``.

    path: "auto" (default), "speed" or "flat". budget: bytes of extra memory the speed path
    may take under "auto" (None: the weight's size). The choice is made when the loss's
    forward runs (under torch.compile, when it is traced). Not thread-local.

    Raises:
        ValueError: path not in PATHS, or budget not an integer >= 0 (nor None).
    """

    def __init__(self, path: str = "auto", budget: Optional[int] = None):
        self.choice = _checked_choice(path, budget)

    def __enter__(self):
        global _override
        self._saved, _override = _override, self.choice
        return self

    def __exit__(self, *exc):
        global _override
        _override = self._saved
        return False


def kept_bytes(batch: int, weight_rows: int, dtype: torch.dtype) -> int:
    """Extra memory of the speed path: the kept products, batch × weight_rows (K·C, the rows
    of the weight or shard), in ``dtype``, the compute dtype (float32; float64 for float64
    inputs). (The kept row norms, weight_rows more values, are not counted.)"""
    return batch * weight_rows * torch.empty((), dtype=dtype).element_size()


def select_path(embeddings: Tensor, weight: Tensor) -> str:
    """"speed" or "flat" for these inputs (embeddings [B, D], weight [K·C, D]).

    The path comes from :class:`use_path` if one is active, else MAGLOSS_PATH (default "auto").
    "auto" takes "speed" when :func:`kept_bytes` (B·K·C·4 bytes in float32) is at most the
    budget: :class:`use_path`'s, else MAGLOSS_SPEED_BUDGET (bytes), else the weight's own size
    (K·C·D times its element size). With a float32 weight that is B ≤ D whatever C: a
    class-sharded head compares its global batch with D, so its memory stays flat when
    the gathered batch exceeds D.

    Raises:
        ValueError: MAGLOSS_PATH or MAGLOSS_SPEED_BUDGET malformed.
    """
    path, budget = _env_path() if _override is None else _override
    if path != "auto":
        return path
    if budget is None:
        budget = weight.numel() * weight.element_size()
    need = kept_bytes(embeddings.shape[0], weight.shape[0], compute_dtype(embeddings.dtype))
    return "speed" if need <= budget else "flat"


class _Rows(NamedTuple):
    """The row stage's outputs, all in the compute dtype ct (labels int64)."""

    x: Tensor        # [B, D] embeddings in ct
    a: Tensor        # [B] ‖x_i‖
    inv_a: Tensor    # [B] 1/max(a_i, ε)
    x_hat: Tensor    # [B, D]
    scale: Tensor    # [B] s, or a_i (feature-norm SphereFace)
    has: Tensor      # [B] bool: the row has a label column
    lab: Tensor      # [B] int64 label (0 where has is False)
    w_y: Tensor      # [B, D] the label class rows as the math sees them (ct); with K sub-centers, the winner's
    r_y: Tensor      # [B] r of the label class
    wn_y: Tensor     # [B] ‖w_y‖
    c_y: Tensor      # [B] label cosine
    zl: Tensor       # [B] label logit scale_i·ψ_i
    dpsi_dc: Tensor  # [B]
    dpsi_da: Tensor  # [B]
    k_y: Optional[Tensor]  # [B] int64 winning sub-center of the label class (None for K = 1)


class _Features(NamedTuple):
    """What the general tile path needs beyond the plain one: K sub-centers per class and
    CurricularFace's per-row threshold τ and t (None without the modulation)."""

    subcenters: int
    scale: Tensor                    # [B]
    scale_by_norm: bool              # scale_i = a_i (feature-norm SphereFace)
    neg_threshold: Optional[Tensor]  # [B]
    neg_t: Optional[Tensor]          # 0-d

    def rows(self, sub: Tensor) -> "_Features":
        nt = None if self.neg_threshold is None else self.neg_threshold[sub]
        return self._replace(scale=self.scale[sub], neg_threshold=nt)


def _operand(w: Tensor, x_dtype: torch.dtype, ct: torch.dtype) -> Tensor:
    """Rows of W as the math uses them: rounded to the embeddings' dtype, in ct. A view
    when no conversion is needed (fp32/fp64), else a copy of just these rows."""
    if w.dtype == x_dtype == ct:
        return w
    return w.to(x_dtype).to(ct)


def _row_stage(embeddings, weight, labels, spec: MarginSpec, ignore_index: int, lam, row_margins=None) -> _Rows:
    ct = compute_dtype(embeddings.dtype)
    x = embeddings.to(ct)
    a = x.norm(dim=1)
    inv_a = 1.0 / a.clamp_min(NORM_EPS)
    x_hat = x * inv_a.unsqueeze(1)
    has = labels != ignore_index
    lab = torch.where(has, labels, torch.zeros_like(labels)).long()
    K = spec.subcenters
    k_y = None
    if K == 1:
        w_y = _operand(weight.index_select(0, lab), embeddings.dtype, ct)
        wn_y = w_y.norm(dim=1)
        r_y = 1.0 / wn_y.clamp_min(NORM_EPS)
        c_y = (x_hat * w_y).sum(1) * r_y
    else:   # the label class's K sub-centers; the one of largest cosine (ties: lowest k) is the label's
        w_all, wn_all, r_all, c_all = label_subcenters(x_hat, weight, lab, K, embeddings.dtype)
        c_y, k_y = c_all.max(dim=1)
        pick = k_y.unsqueeze(1)
        w_y = w_all.gather(1, pick.unsqueeze(2).expand(-1, 1, w_all.shape[2])).squeeze(1)
        wn_y, r_y = wn_all.gather(1, pick).squeeze(1), r_all.gather(1, pick).squeeze(1)
    psi, dpsi_dc, dpsi_da = margin_terms(c_y, a, spec, lam, row_margins)
    scale = a if spec.scale_by_norm else torch.full_like(a, spec.scale)
    return _Rows(x, a, inv_a, x_hat, scale, has, lab, w_y, r_y, wn_y, c_y, scale * psi, dpsi_dc, dpsi_da, k_y)


def _label_groups(lab: Tensor, has: Tensor, num_classes: int, n: int) -> List[Optional[Tuple[Tensor, Tensor]]]:
    """For each chunk [j0, j0 + n): (row indices, local columns) of the rows whose label
    (``lab`` where ``has``) is in it, or None. One host read-back of a few integers (the
    forward has already synchronized in its value check)."""
    groups: List[Optional[Tuple[Tensor, Tensor]]] = [None] * (-(-num_classes // n))
    idx = has.nonzero().squeeze(1)
    if idx.numel() == 0:
        return groups
    lab = lab[idx]
    order = lab.argsort()
    idx, lab = idx[order], lab[order]
    ids, counts = torch.unique_consecutive(lab // n, return_counts=True)
    start = 0
    for k, cnt in zip(ids.tolist(), counts.tolist()):
        sel = slice(start, start + cnt)
        groups[k] = (idx[sel], lab[sel] - k * n)
        start += cnt
    return groups


def _inv_norm(wn: Tensor) -> Tensor:
    """r = 1/max(‖w‖, ε)."""
    return 1.0 / wn.clamp_min(NORM_EPS)


def _column_stats(w_c: Tensor) -> Tuple[Tensor, Tensor]:
    wn = w_c.norm(dim=1)
    return wn, _inv_norm(wn)


def _check(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, num_classes: int) -> None:
    """The input checks of :mod:`magloss.checks` without a pass over W: the dtype pair (weight_operand on zero
    rows: no copy), labels and embeddings (check_values with a finite stand-in of W's C rows).
    W's own values are checked by the products themselves: see :func:`_check_weight`."""
    weight_operand(embeddings, weight[:0])
    check_values(embeddings, weight.new_zeros((1, 1)).expand(weight.shape[0], 1), labels, ignore_index, num_classes)


def _check_weight(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, lse: Tensor,
                  num_classes: int) -> None:
    """A NaN or Inf anywhere in W makes every row's lse non-finite (its column is NaN in every
    row: r_j = 0 or NaN times an infinite or NaN dot; for the autocast pair, also a float32
    value that overflows when rounded). Only then does the full check_values scan
    W as the math uses it, raising its error (and leaving the NaNs to the caller if it doesn't).
    Costs one host read of a flag instead of a pass over C×D with C×D temporaries."""
    if lse.numel() and not bool(torch.isfinite(lse).all()):
        check_values(embeddings, weight_operand(embeddings, weight), labels, ignore_index, num_classes)


def _low_sum(lse_minus_shift: Tensor, num_classes: int) -> Tensor:
    """Rows whose Σ_j exp(z_ij − shift_i) may have lost accuracy to underflow: each of the C
    terms may be off by up to the smallest normal number (flushed or subnormal), which is
    within the dtype's eps of the sum only when sum ≥ C·tiny/eps (ln: ln C − 71.4 in float32)."""
    fi = torch.finfo(lse_minus_shift.dtype)
    return lse_minus_shift < math.log(max(num_classes, 1) * fi.tiny / fi.eps)


def _subcenter_cosines(x_hat: Tensor, w_c: Tensor, r_c: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """(x̂_i·w_j)·r_j [B, K·n] for the K·n rows w_c, written into ``out`` (e.g. a column block of
    the speed path's kept matrix) when given."""
    return torch.mm(x_hat, w_c.t(), out=out).mul_(r_c)


def _class_tile(x_hat: Tensor, w_c: Tensor, r_c: Tensor, features: _Features,
                out: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The general path's tile: class cosines c_ij = max_k (x̂_i·w_{jK+k})·r_{jK+k} [B, n] of a
    chunk of n whole classes (w_c: its K·n rows) and the winning k (None for K = 1). The
    sub-center cosines go to ``out`` [B, K·n] when given (the speed path keeps them)."""
    return class_cosines(_subcenter_cosines(x_hat, w_c, r_c, out), features.subcenters, x_hat, w_c, r_c)


class _Nearest:
    """The side outputs' running state over the class chunks: for each row the largest value
    of a non-label column and its class index (−inf and −1 while none was seen). The values
    are whatever increases with the class cosine c_ij in every row (scale_i·c_ij − shift_i
    on the plain tile, c_ij on the general one); the cosine itself is recomputed from the
    winning class at the end (:func:`_side_outputs`). Ties go to the lowest class index:
    the first maximum inside a chunk, and a later chunk wins only when strictly larger. A NaN
    value wins and stays (NaN in, NaN out)."""

    def __init__(self, batch: int, like: Tensor):
        self.value = like.new_full((batch,), -torch.inf)
        self.index = torch.full((batch,), -1, dtype=torch.int64, device=like.device)

    def update(self, tile: Tensor, label: Optional[Tuple[Tensor, Tensor]], j0: int, in_place: bool = True) -> None:
        """tile [B, n]: the chunk of classes j0 .. j0 + n − 1. ``label`` (rows, local columns)
        of the label columns, excluded: set to −inf in ``tile`` itself when ``in_place`` (the
        caller then writes the label logits there), else on a copy."""
        if label is not None:
            fill = tile.new_full((), -torch.inf)
            tile = tile.index_put_(label, fill) if in_place else tile.index_put(label, fill)
        v, i = tile.max(dim=1)
        better = (v > self.value) | (torch.isnan(v) & ~torch.isnan(self.value))
        self.value = torch.where(better, v, self.value)
        self.index = torch.where(better, i + j0, self.index)


def _side_outputs(rows: _Rows, weight: Tensor, subcenters: int, x_dtype: torch.dtype,
                  nearest: _Nearest) -> Tuple[Tensor, Tensor, Tensor]:
    """(label_cosine, nearest_negative_cosine, nearest_negative_class), each [B], from the row
    stage and the finished tracker. The nearest negative's cosine is recomputed by a gather-dot
    with its class rows (the max over its K sub-centers), as the label cosine is: both are the
    same arithmetic, so comparing them decides the prediction consistently. label_cosine is 0
    on rows without a label column (a sharded head sums it over the shards); a row without any
    non-label column (C = 1) gets −inf and class −1."""
    idx = nearest.index
    cos = label_subcenters(rows.x_hat, weight, idx.clamp_min(0), subcenters, x_dtype)[3].amax(dim=1)
    cos = torch.where(idx < 0, torch.full_like(cos, -torch.inf), cos)
    return torch.where(rows.has, rows.c_y, torch.zeros_like(rows.c_y)), cos, idx


def _lse(xs: Tensor, zl: Tensor, lab: Tensor, has: Tensor, weight: Tensor, x_dtype: torch.dtype, n_max: int,
         shift: Optional[Tensor] = None, features: Optional[_Features] = None,
         kept: Optional[Tensor] = None, kept_norms: Optional[Tensor] = None,
         nearest: Optional[_Nearest] = None) -> Tensor:
    """Row log-sum-exp of the logits, chunk by chunk: Z = xs·W_chunkᵀ·r with the label logit
    ``zl`` swapped in. With ``shift`` (an upper bound of every row's logits): one pass,
    Σ exp(z − shift). Without: the online log-sum-exp (running max, rescaled running sum).

    ``features`` (sub-centers, CurricularFace's columns) selects the general tile: ``xs`` is
    then x̂ (unscaled), a chunk is n_max whole classes, and Z = scale_i·f(c_ij) with c the
    class cosines of :func:`_class_tile` and f CurricularFace's function (or the identity).

    ``kept`` [B, K·C] (the speed path, with ``shift`` only): each chunk's product is written
    into its column block (xs·W_chunkᵀ on the plain path, the sub-center cosines on the
    general one) for the backward to reuse, and ``kept_norms`` [K·C] gets the rows' ‖w_j‖.

    ``nearest`` (the side outputs, :class:`_Nearest`) is updated on each chunk's tile as it
    stands before the label logit is swapped in: scale_i·c_ij (− shift_i) on the plain path,
    the class cosines on the general one; no extra product."""
    B = xs.shape[0]
    K = 1 if features is None else features.subcenters
    C = weight.shape[0] // K
    groups = _label_groups(lab, has, C, n_max)
    tile_store = xs.new_empty(B * n_max)
    run_sum = xs.new_zeros(B)
    run_max = xs.new_full((B,), -torch.inf) if shift is None else shift
    neg_shift = None if shift is None else (-shift).unsqueeze(1)
    for k, j0 in enumerate(range(0, C, n_max)):
        n = min(n_max, C - j0)
        w_c = _operand(weight.narrow(0, j0 * K, n * K), x_dtype, xs.dtype)
        wn_c, r_c = _column_stats(w_c)
        block = None if kept is None else kept.narrow(1, j0 * K, n * K)
        if kept_norms is not None:
            kept_norms.narrow(0, j0 * K, n * K).copy_(wn_c)
        if features is None:
            z = tile_store[: B * n].view(B, n)
            raw = torch.mm(xs, w_c.t(), out=z if block is None else block)
        else:
            cos = _class_tile(xs, w_c, r_c, features, block)[0]
            if nearest is not None:       # (cos may be the kept block, or become z below: masked on a copy)
                nearest.update(cos, groups[k], j0, in_place=False)
            z = curricular(cos, features.neg_threshold, features.neg_t)[0].mul_(features.scale.unsqueeze(1))
            if shift is not None:
                z.sub_(shift.unsqueeze(1))
        if shift is None:
            if features is None:
                z.mul_(r_c)
                if nearest is not None:
                    nearest.update(z, groups[k], j0)
            if groups[k] is not None:
                z.index_put_(groups[k], zl[groups[k][0]])
            m_new = torch.maximum(run_max, z.amax(1))     # NaN-propagating, unlike a masked max
            z.sub_(m_new.unsqueeze(1))
            run_sum = run_sum * torch.exp(run_max - m_new)
            run_max = m_new
        else:
            if features is None:
                torch.addcmul(neg_shift, raw, r_c, out=z)
                if nearest is not None:
                    nearest.update(z, groups[k], j0)
            if groups[k] is not None:
                ri = groups[k][0]
                z.index_put_(groups[k], zl[ri] - shift[ri])
        run_sum += z.exp_().sum(1)
    return run_max + torch.log(run_sum)


def _general_tile(rows: _Rows, features: _Features, w_c: Tensor, r_c: Tensor, lse: Tensor, gs: Tensor,
                  label: Optional[Tuple[Tensor, Tensor]], curved: Tensor,
                  cos_rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The backward's tile on the general path, for a chunk of n whole classes (w_c: K·n rows).
    ``cos_rows``: the chunk's sub-center cosines kept by the forward (speed path), else
    recomputed (one product).

    Returns U [B, K·n] with T = G·r = gs_i·U (each class's entry at its winning sub-center,
    0 at the others and at the label column) and coef_j = r_j²·Σ_i T_ij·(x̂_i·w_j) [K·n].
    G_ij = gs_i·p_ij·f'_ij off the label (f' = t + 2c on CurricularFace's columns). With a
    feature-norm scale, adds Σ_{j≠y} p_ij·(f_ij − f'_ij·c_ij) to ``curved`` (in place)."""
    if cos_rows is None:
        cos_rows = _subcenter_cosines(rows.x_hat, w_c, r_c)          # sub-center cosines [B, K·n]
    cos, win = class_cosines(cos_rows, features.subcenters, rows.x_hat, w_c, r_c)
    f, slope = curricular(cos, features.neg_threshold, features.neg_t)
    p = torch.addcmul(lse.neg().unsqueeze(1), f, features.scale.unsqueeze(1)).exp_()
    u = p if slope is None else p * slope
    if label is not None:
        u.index_put_(label, u.new_zeros(()))
    if slope is not None and features.scale_by_norm:
        bend = p * (f - slope * cos)
        if label is not None:
            bend.index_put_(label, bend.new_zeros(()))
        curved += bend.sum(1)
    if win is not None:
        u = torch.zeros_like(cos_rows).unflatten(1, (-1, features.subcenters)).scatter_(
            2, win.unsqueeze(2), u.unsqueeze(2)).flatten(1)
    u.mul_(r_c)
    return u, torch.mv((u * cos_rows).t(), gs) * r_c


def _features(spec: MarginSpec, scale: Tensor, neg_threshold: Optional[Tensor],
              neg_t: Optional[Tensor]) -> Optional[_Features]:
    """The general path's features, or None for the plain path (K = 1, no curricular columns)."""
    if spec.subcenters == 1 and neg_threshold is None:
        return None
    return _Features(spec.subcenters, scale, spec.scale_by_norm, neg_threshold, neg_t)


def _chunk_classes(batch: int, num_classes: int, subcenters: int, chunk: Optional[int]) -> int:
    """Classes per chunk: the width of :func:`chunk_columns` over the K·C class-matrix rows,
    rounded down to whole classes (at least one)."""
    return max(chunk_columns(batch, num_classes * subcenters, chunk) // subcenters, 1)


def margin_ce_forward(embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec,
                      ignore_index: int = -1, sphere_lambda: Optional[Tensor] = None,
                      row_margins: Optional[Tensor] = None, neg_threshold: Optional[Tensor] = None,
                      neg_t: Optional[Tensor] = None, *,
                      chunk: Optional[int] = None, keep: bool = False, side: bool = False) -> Tuple[Tensor, ...]:
    """Checked, gradient-free forward: the default kernel of ``magloss::margin_ce``.

    Same arguments, returns and errors as :func:`magloss.reference.margin_ce_forward`
    (embeddings [B, D], weight [C, D], labels [B]; returns lse, zy, reg, norms, each [B]
    in float32, float64 for float64 inputs), computed class chunk by class chunk with an
    online log-sum-exp. ``chunk``: the chunk width (default :func:`chunk_columns`).

    ``keep=True`` (the speed path, kernel of ``magloss::margin_ce_kept``) also returns what
    the backward would recompute: ``kept`` [B, K·C] in the compute dtype, on the plain path
    z_ij = scale_i·x̂_i·w_j (before the 1/‖w_j‖ factor), on the general path (sub-centers,
    CurricularFace) the sub-center cosines; and ``kept_norms`` [K·C], ‖w_j‖ (as the math sees
    W). Pass both to :func:`margin_ce_backward`, which then does two products per chunk
    instead of three and no pass over W for its norms.

    ``side=True`` appends the side outputs (docs/math.md, "Side outputs"), each [B]:
    ``label_cosine`` c_iy (0 on rows without a label column), ``nearest_negative_cosine``
    max_{j≠y_i} c_ij and ``nearest_negative_class`` its index (int64; ties: the lowest; −inf
    and −1 when the row has no non-label class), tracked on the tiles the forward computes
    anyway (no extra product) plus one gather-dot.

    Raises:
        TypeError: embeddings and weight are not the same dtype (nor the autocast pair).
        ValueError: a label out of range, NaN/Inf in embeddings or weight (:func:`magloss.checks.check_values`).
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    num_classes = num_classes_of(weight, spec.subcenters)
    _check(embeddings, weight, labels, ignore_index, num_classes)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        rows = _row_stage(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins)
        n_max = _chunk_classes(embeddings.shape[0], num_classes, spec.subcenters, chunk)
        features = _features(spec, rows.scale, neg_threshold, neg_t)
        # Every logit of row i is at most scale_i (|c| <= 1 and psi <= c <= 1 for every family),
        # so scale_i is a safe shift and needs no max pass (scale_i·(1 + |t|) with
        # CurricularFace's columns: c·(t + c) reaches 1 − t at c = −1 when t < 0). Rows whose sum is then too small to be accurate (every
        # logit far below the shift) are redone with the online max.
        if features is None:
            xs, shift = rows.x_hat * rows.scale.unsqueeze(1), rows.scale
        else:
            xs, shift = rows.x_hat, rows.scale
            if neg_t is not None:
                shift = rows.scale * (1.0 + neg_t.to(rows.scale.dtype).abs())
        kept = xs.new_empty((xs.shape[0], weight.shape[0])) if keep else None
        kept_norms = xs.new_empty((weight.shape[0],)) if keep else None
        nearest = _Nearest(xs.shape[0], xs) if side else None
        lse = _lse(xs, rows.zl, rows.lab, rows.has, weight, embeddings.dtype, n_max, shift, features, kept,
                   kept_norms, nearest)
        low = _low_sum(lse - shift, num_classes)
        if bool(low.any()):
            sub = low.nonzero().squeeze(1)
            lse[sub] = _lse(xs[sub], rows.zl[sub], rows.lab[sub], rows.has[sub], weight, embeddings.dtype, n_max,
                            None, None if features is None else features.rows(sub))
        _check_weight(embeddings, weight, labels, ignore_index, lse, num_classes)
        zero = torch.zeros_like(rows.a)
        zy = torch.where(rows.has, rows.zl, zero)
        reg = regularizer(rows.a, spec.l_a, spec.u_a)[0] if spec.has_regularizer else zero
        out = (lse, zy, reg, rows.a, kept, kept_norms) if keep else (lse, zy, reg, rows.a)
        if side:
            out += _side_outputs(rows, weight, spec.subcenters, embeddings.dtype, nearest)
    return out


def margin_ce_backward(grad_lse: Tensor, grad_zy: Tensor, grad_reg: Tensor, grad_norms: Tensor,
                       embeddings: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, spec: MarginSpec,
                       ignore_index: int = -1, sphere_lambda: Optional[Tensor] = None,
                       row_margins: Optional[Tensor] = None, neg_threshold: Optional[Tensor] = None,
                       neg_t: Optional[Tensor] = None, *,
                       chunk: Optional[int] = None, kept: Optional[Tensor] = None,
                       kept_norms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Gradients of Σ_i (gl_i·lse_i + gz_i·zy_i + gr_i·reg_i + gn_i·norms_i) from the saved
    ``lse``, class chunk by class chunk: the default kernel of ``magloss::margin_ce_backward``.

    Same arguments and returns as :func:`magloss.reference.margin_ce_backward` (the formulas
    are given there): (∂/∂embeddings [B, D], ∂/∂weight [C, D]) in the dtypes of embeddings
    and weight; for a float32 weight with half embeddings, the float32 gradient with respect
    to the rounded matrix. ∂W is written chunk by chunk, each row exactly once.

    ``kept``, ``kept_norms``: the forward's products and class-row norms
    (:func:`margin_ce_forward` with ``keep=True``, any chunk width; both or neither): the
    speed path, two products per chunk instead of three.

    Raises:
        ValueError: ``kept`` is not [B, K·C] or ``kept_norms`` not [K·C] in the compute dtype.
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    K = spec.subcenters
    C = num_classes_of(weight, spec.subcenters)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        rows = _row_stage(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins)
        features = _features(spec, rows.scale, neg_threshold, neg_t)
        ct = rows.x.dtype
        B = embeddings.shape[0]
        for name, t, shape in (("kept", kept, (B, weight.shape[0])), ("kept_norms", kept_norms, (weight.shape[0],))):
            if (kept is None) != (t is None) or (t is not None and (t.shape != shape or t.dtype != ct)):
                got = "None" if t is None else f"shape {tuple(t.shape)} and dtype {t.dtype}"
                raise ValueError(f"{name}: expected the forward's kept {name} (with keep=True), shape {shape} and "
                                 f"dtype {ct}, got {got}")
        zero = torch.zeros_like(rows.a)
        gl, gz = grad_lse.to(ct), grad_zy.to(ct)
        lse = lse.to(ct)

        # Row stage of the backward: the label column's ∂L/∂z and G, ∂L/∂a's own terms.
        dz_y = torch.where(rows.has, gl * torch.exp(rows.zl - lse) + gz, zero)
        g_y = rows.scale * dz_y * rows.dpsi_dc
        grad_a = torch.where(rows.has, rows.scale * dz_y * rows.dpsi_da, zero) + grad_norms.to(ct)
        if spec.has_regularizer:
            grad_a = grad_a + grad_reg.to(ct) * regularizer(rows.a, spec.l_a, spec.u_a)[1]
        gs = gl * rows.scale                       # T_ij = gs_i·U_ij off the label
        # The label column: U_iy is zeroed in the tile, and T_iy = g_y·r_y enters as a rank-one
        # term of row i's ∂L/∂x̂ and of class y_i's ∂W row. (Correcting the unmargined tile value
        # instead would cancel: exp(s·c_iy − lse_i) can exceed 1 by e^(s·m).)
        delta = torch.where(rows.has, g_y * rows.r_y, zero)
        col_y = torch.where(rows.wn_y < NORM_EPS, zero, rows.r_y * rows.c_y)
        corr_w = delta.unsqueeze(1) * (rows.x_hat - col_y.unsqueeze(1) * rows.w_y)   # [B, D]

        n_max = _chunk_classes(B, C, K, chunk)
        xs = rows.x_hat * rows.scale.unsqueeze(1)
        xg = rows.x_hat * gs.unsqueeze(1)
        neg_lse = (-lse).unsqueeze(1)
        u_store = rows.x.new_empty(B * n_max)
        z_store = rows.x.new_empty(B * n_max)
        acc = torch.zeros_like(rows.x)                                   # Σ_chunks U·W_chunk
        curved = zero.clone()    # Σ_{j≠y} p_ij·(f_ij − f'_ij·c_ij): CurricularFace's share of Σ_j ∂L/∂z·z
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        direct = grad_w.dtype == ct                  # else an fp32 chunk buffer, then one cast
        p_store = None if direct else rows.x.new_empty(n_max * K * weight.shape[1])
        groups = _label_groups(rows.lab, rows.has, C, n_max)
        for k, j0 in enumerate(range(0, C, n_max)):
            n = min(n_max, C - j0)
            w_c = _operand(weight.narrow(0, j0 * K, n * K), embeddings.dtype, ct)
            if kept is None:
                wn_c, r_c = _column_stats(w_c)
            else:
                wn_c = kept_norms.narrow(0, j0 * K, n * K)
                r_c = _inv_norm(wn_c)
            label = groups[k]
            block = None if kept is None else kept.narrow(1, j0 * K, n * K)
            if features is None:
                zu = z_store[: B * n].view(B, n)
                u = u_store[: B * n].view(B, n)
                z = torch.mm(xs, w_c.t(), out=zu) if block is None else block   # scale_i·x̂_i·w_j
                torch.addcmul(neg_lse, z, r_c, out=u)             # z_ij − lse_i
                u.exp_().mul_(r_c)                                # U = p·r
                if label is not None:
                    u.index_put_(label, u.new_zeros(()))         # the label column enters via delta
                # coef_j = r_j²·Σ_i T_ij·(x̂_i·w_j) = r_j²·Σ_i gl_i·U_ij·z_ij (zeroed for ‖w_j‖ < ε);
                # the kept block is read, never written (a retained graph's second backward reuses it)
                coef = torch.mv(torch.mul(z, u, out=zu).t(), gl) * r_c * r_c
                label_rows = None if label is None else label[1]
            else:
                u, coef = _general_tile(rows, features, w_c, r_c, lse, gs, label, curved, block)
                label_rows = None if label is None else label[1] * K + (0 if K == 1 else rows.k_y[label[0]])
            acc.addmm_(u, w_c)
            coef = torch.where(wn_c < NORM_EPS, torch.zeros_like(coef), coef)  # a NaN norm keeps it
            gw_c = grad_w.narrow(0, j0 * K, n * K) if direct else p_store[: n * K * weight.shape[1]].view(n * K, -1)
            torch.mm(u.t(), xg, out=gw_c)      # the product first: the column term then reads a chunk in cache
            gw_c.addcmul_(w_c, coef.neg().unsqueeze(1))
            if label is not None:
                gw_c.index_put_((label_rows,), corr_w[label[0]], accumulate=True)   # (index_add_ is slow on CPU)
            if not direct:
                grad_w.narrow(0, j0 * K, n * K).copy_(saturating_cast(gw_c, grad_w.dtype))

        g_xhat = acc * gs.unsqueeze(1) + delta.unsqueeze(1) * rows.w_y
        gc_row = (g_xhat * rows.x_hat).sum(1)                # Σ_j G_ij c_ij
        if spec.scale_by_norm:                               # + Σ_j ∂L/∂z_ij·z_ij / a_i
            label_term = torch.where(rows.has, g_y * rows.c_y - dz_y * rows.zl, zero)   # G_iy·c_iy ≠ ∂L/∂z_iy·z_iy
            grad_a = grad_a + (gc_row - label_term + gs * curved) * rows.inv_a
        unit = rows.x / rows.a.clamp_min(torch.finfo(ct).tiny).unsqueeze(1)
        proj = torch.where((rows.a < NORM_EPS).unsqueeze(1), torch.zeros_like(rows.x),
                           rows.x_hat * gc_row.unsqueeze(1))         # a NaN norm keeps the term
        grad_x = (g_xhat - proj) * rows.inv_a.unsqueeze(1) + grad_a.unsqueeze(1) * unit
    return saturating_cast(grad_x, embeddings.dtype), grad_w
