"""The chunked engine: the fused engine's algorithm in plain PyTorch ops, flat in memory.

This is the default kernel of the ``magloss::margin_ce`` ops wherever the compiled CUDA
kernels are not in use (the CPU; a GPU without the extension; float64 on a GPU). It
computes exactly what :mod:`magloss.reference` computes (the oracle of the tests), but
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

Extra memory (beyond x, W and their gradients): two B×N tiles, O(B·D) row buffers, and for
float16/bfloat16 inputs an N×D float32 copy of the chunk (plus an N×D float32 buffer for a
half-precision ∂W): independent of C. The products are 1 (forward) + 3 (backward), the
backward recomputing the forward's tile, as the fused engine does.

Precision: margin, softmax and reductions in float32 (float64 for float64 inputs). For
float16/bfloat16 embeddings (with a weight of the same dtype, or float32 under autocast)
the products also run in float32, on the operands rounded to the embeddings' dtype, i.e.
the reference's arithmetic: the CPU has no fast half-precision product path, and the
result carries no error beyond the inputs' rounding.
"""

from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .margins import NORM_EPS, MarginSpec, margin_terms, regularizer
from . import reference
from .reference import check_extras, check_values, compute_dtype, saturating_cast, weight_operand

__all__ = ["DEFAULT_TILE", "chunk_columns", "margin_ce_forward", "margin_ce_backward"]

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
        env = os.environ.get("MAGLOSS_CHUNK", "")
        if env:
            try:
                chunk = int(env)
            except ValueError:
                chunk = 0
            if chunk <= 0:
                raise ValueError(f"MAGLOSS_CHUNK: expected a positive integer, got {env!r}")
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    if chunk is None:
        n = -(-DEFAULT_TILE // max(batch, 1))
        chunk = min(max(-(-n // 256) * 256, MIN_CHUNK), MAX_CHUNK)
    return max(min(chunk, num_classes), 1)


class _Rows(NamedTuple):
    """The row stage's outputs, all in the compute dtype ct (labels int64)."""

    x: Tensor        # [B, D] embeddings in ct
    a: Tensor        # [B] ‖x_i‖
    inv_a: Tensor    # [B] 1/max(a_i, ε)
    x_hat: Tensor    # [B, D]
    scale: Tensor    # [B] s, or a_i (feature-norm SphereFace)
    has: Tensor      # [B] bool: the row has a label column
    lab: Tensor      # [B] int64 label (0 where has is False)
    w_y: Tensor      # [B, D] the label class rows as the math sees them (ct)
    r_y: Tensor      # [B] r of the label class
    wn_y: Tensor     # [B] ‖w_y‖
    c_y: Tensor      # [B] label cosine
    zl: Tensor       # [B] label logit scale_i·ψ_i
    dpsi_dc: Tensor  # [B]
    dpsi_da: Tensor  # [B]


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
    w_y = _operand(weight.index_select(0, lab), embeddings.dtype, ct)
    wn_y = w_y.norm(dim=1)
    r_y = 1.0 / wn_y.clamp_min(NORM_EPS)
    c_y = (x_hat * w_y).sum(1) * r_y
    psi, dpsi_dc, dpsi_da = margin_terms(c_y, a, spec, lam, row_margins)
    scale = a if spec.scale_by_norm else torch.full_like(a, spec.scale)
    return _Rows(x, a, inv_a, x_hat, scale, has, lab, w_y, r_y, wn_y, c_y, scale * psi, dpsi_dc, dpsi_da)


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


def _column_stats(w_c: Tensor) -> Tuple[Tensor, Tensor]:
    wn = w_c.norm(dim=1)
    return wn, 1.0 / wn.clamp_min(NORM_EPS)


def _check(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> None:
    """The reference's checks without a pass over W: the dtype pair (weight_operand on zero
    rows: no copy), labels and embeddings (check_values with a finite stand-in of W's C rows).
    W's own values are checked by the products themselves: see :func:`_check_weight`."""
    weight_operand(embeddings, weight[:0])
    check_values(embeddings, weight.new_zeros((1, 1)).expand(weight.shape[0], 1), labels, ignore_index)


def _check_weight(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, lse: Tensor) -> None:
    """A NaN or Inf anywhere in W makes every row's lse non-finite (its column is NaN in every
    row: r_j = 0 or NaN times an infinite or NaN dot; for the autocast pair, also a float32
    value that overflows when rounded). Only then does the reference's full check_values scan
    W as the math uses it, raising its error (and leaving the NaNs to the caller if it doesn't).
    Costs one host read of a flag instead of a pass over C×D with C×D temporaries."""
    if lse.numel() and not bool(torch.isfinite(lse).all()):
        check_values(embeddings, weight_operand(embeddings, weight), labels, ignore_index)


def _low_sum(lse_minus_shift: Tensor, num_classes: int) -> Tensor:
    """Rows whose Σ_j exp(z_ij − shift_i) may have lost accuracy to underflow: each of the C
    terms may be off by up to the smallest normal number (flushed or subnormal), which is
    within the dtype's eps of the sum only when sum ≥ C·tiny/eps (ln: ln C − 71.4 in float32)."""
    fi = torch.finfo(lse_minus_shift.dtype)
    return lse_minus_shift < math.log(max(num_classes, 1) * fi.tiny / fi.eps)


def _lse(xs: Tensor, zl: Tensor, lab: Tensor, has: Tensor, weight: Tensor, x_dtype: torch.dtype, n_max: int,
         shift: Optional[Tensor] = None) -> Tensor:
    """Row log-sum-exp of the logits, chunk by chunk: Z = xs·W_chunkᵀ·r with the label logit
    ``zl`` swapped in. With ``shift`` (an upper bound of every row's logits): one pass,
    Σ exp(z − shift). Without: the online log-sum-exp (running max, rescaled running sum)."""
    B, C = xs.shape[0], weight.shape[0]
    groups = _label_groups(lab, has, C, n_max)
    tile_store = xs.new_empty(B * n_max)
    run_sum = xs.new_zeros(B)
    run_max = xs.new_full((B,), -torch.inf) if shift is None else shift
    neg_shift = None if shift is None else (-shift).unsqueeze(1)
    for k, j0 in enumerate(range(0, C, n_max)):
        n = min(n_max, C - j0)
        w_c = _operand(weight.narrow(0, j0, n), x_dtype, xs.dtype)
        _, r_c = _column_stats(w_c)
        z = tile_store[: B * n].view(B, n)
        torch.mm(xs, w_c.t(), out=z)
        if shift is None:
            z.mul_(r_c)
            if groups[k] is not None:
                z.index_put_(groups[k], zl[groups[k][0]])
            m_new = torch.maximum(run_max, z.amax(1))     # NaN-propagating, unlike a masked max
            z.sub_(m_new.unsqueeze(1))
            run_sum = run_sum * torch.exp(run_max - m_new)
            run_max = m_new
        else:
            torch.addcmul(neg_shift, z, r_c, out=z)
            if groups[k] is not None:
                ri = groups[k][0]
                z.index_put_(groups[k], zl[ri] - shift[ri])
        run_sum += z.exp_().sum(1)
    return run_max + torch.log(run_sum)


def margin_ce_forward(embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec,
                      ignore_index: int = -1, sphere_lambda: Optional[Tensor] = None,
                      row_margins: Optional[Tensor] = None, neg_threshold: Optional[Tensor] = None,
                      neg_t: Optional[Tensor] = None, *,
                      chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checked, gradient-free forward: the default kernel of ``magloss::margin_ce``.

    Same arguments, returns and errors as :func:`magloss.reference.margin_ce_forward`
    (embeddings [B, D], weight [C, D], labels [B]; returns lse, zy, reg, norms, each [B]
    in float32, float64 for float64 inputs), computed class chunk by class chunk with an
    online log-sum-exp. ``chunk``: the chunk width (default :func:`chunk_columns`).

    Raises:
        TypeError: embeddings and weight are not the same dtype (nor the autocast pair).
        ValueError: a label out of range, NaN/Inf in embeddings or weight (as the reference).
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    if spec.subcenters > 1 or neg_threshold is not None:   # TODO(step 2): chunked sub-centers/curricular
        return reference.margin_ce_forward(embeddings, weight, labels, spec, ignore_index, sphere_lambda,
                                           row_margins, neg_threshold, neg_t)
    _check(embeddings, weight, labels, ignore_index)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        rows = _row_stage(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins)
        n_max = chunk_columns(embeddings.shape[0], weight.shape[0], chunk)
        xs = rows.x_hat * rows.scale.unsqueeze(1)
        # Every logit of row i is at most scale_i (|c| <= 1 and psi <= c <= 1 for every family),
        # so scale_i is a safe shift and needs no max pass. Rows whose sum is then too small to
        # be accurate (every logit far below scale_i) are redone with the online max.
        lse = _lse(xs, rows.zl, rows.lab, rows.has, weight, embeddings.dtype, n_max, rows.scale)
        low = _low_sum(lse - rows.scale, weight.shape[0])
        if bool(low.any()):
            sub = low.nonzero().squeeze(1)
            lse[sub] = _lse(xs[sub], rows.zl[sub], rows.lab[sub], rows.has[sub], weight, embeddings.dtype, n_max)
        _check_weight(embeddings, weight, labels, ignore_index, lse)
        zero = torch.zeros_like(rows.a)
        zy = torch.where(rows.has, rows.zl, zero)
        reg = regularizer(rows.a, spec.l_a, spec.u_a)[0] if spec.has_regularizer else zero
    return lse, zy, reg, rows.a


def margin_ce_backward(grad_lse: Tensor, grad_zy: Tensor, grad_reg: Tensor, grad_norms: Tensor,
                       embeddings: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, spec: MarginSpec,
                       ignore_index: int = -1, sphere_lambda: Optional[Tensor] = None,
                       row_margins: Optional[Tensor] = None, neg_threshold: Optional[Tensor] = None,
                       neg_t: Optional[Tensor] = None, *,
                       chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Gradients of Σ_i (gl_i·lse_i + gz_i·zy_i + gr_i·reg_i + gn_i·norms_i) from the saved
    ``lse``, class chunk by class chunk: the default kernel of ``magloss::margin_ce_backward``.

    Same arguments and returns as :func:`magloss.reference.margin_ce_backward` (the formulas
    are given there): (∂/∂embeddings [B, D], ∂/∂weight [C, D]) in the dtypes of embeddings
    and weight; for a float32 weight with half embeddings, the float32 gradient with respect
    to the rounded matrix. ∂W is written chunk by chunk, each row exactly once.
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    if spec.subcenters > 1 or neg_threshold is not None:   # TODO(step 2): chunked sub-centers/curricular
        return reference.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels,
                                            lse, spec, ignore_index, sphere_lambda, row_margins, neg_threshold,
                                            neg_t)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        rows = _row_stage(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins)
        ct = rows.x.dtype
        B, C = embeddings.shape[0], weight.shape[0]
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

        n_max = chunk_columns(B, C, chunk)
        xs = rows.x_hat * rows.scale.unsqueeze(1)
        xg = rows.x_hat * gs.unsqueeze(1)
        neg_lse = (-lse).unsqueeze(1)
        u_store = rows.x.new_empty(B * n_max)
        z_store = rows.x.new_empty(B * n_max)
        acc = torch.zeros_like(rows.x)                                   # Σ_chunks U·W_chunk
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        direct = grad_w.dtype == ct                  # else an fp32 chunk buffer, then one cast
        p_store = None if direct else rows.x.new_empty(n_max * weight.shape[1])
        groups = _label_groups(rows.lab, rows.has, C, n_max)
        for k, j0 in enumerate(range(0, C, n_max)):
            n = min(n_max, C - j0)
            w_c = _operand(weight.narrow(0, j0, n), embeddings.dtype, ct)
            wn_c, r_c = _column_stats(w_c)
            z = z_store[: B * n].view(B, n)
            u = u_store[: B * n].view(B, n)
            torch.mm(xs, w_c.t(), out=z)                      # scale_i·x̂_i·w_j
            torch.addcmul(neg_lse, z, r_c, out=u)             # z_ij − lse_i
            u.exp_().mul_(r_c)                                # U = p·r
            label = groups[k]
            if label is not None:
                u.index_put_(label, u.new_zeros(()))         # the label column enters via delta
            acc.addmm_(u, w_c)
            # coef_j = r_j²·Σ_i T_ij·(x̂_i·w_j) = r_j²·Σ_i gl_i·U_ij·z_ij (zeroed for ‖w_j‖ < ε)
            coef = torch.mv(z.mul_(u).t(), gl)
            coef = torch.where(wn_c < NORM_EPS, torch.zeros_like(coef), coef * r_c * r_c)  # a NaN norm keeps it
            gw_c = grad_w.narrow(0, j0, n) if direct else p_store[: n * weight.shape[1]].view(n, -1)
            torch.mul(w_c, coef.neg().unsqueeze(1), out=gw_c)
            gw_c.addmm_(u.t(), xg)
            if label is not None:
                gw_c.index_put_((label[1],), corr_w[label[0]], accumulate=True)   # (index_add_ is slow on CPU)
            if not direct:
                grad_w.narrow(0, j0, n).copy_(saturating_cast(gw_c, grad_w.dtype))

        g_xhat = acc * gs.unsqueeze(1) + delta.unsqueeze(1) * rows.w_y
        gc_row = (g_xhat * rows.x_hat).sum(1)                # Σ_j G_ij c_ij
        if spec.scale_by_norm:                               # + Σ_j ∂L/∂z_ij·z_ij / a_i
            label_term = torch.where(rows.has, g_y * rows.c_y - dz_y * rows.zl, zero)   # G_iy·c_iy ≠ ∂L/∂z_iy·z_iy
            grad_a = grad_a + (gc_row - label_term) * rows.inv_a
        unit = rows.x / rows.a.clamp_min(torch.finfo(ct).tiny).unsqueeze(1)
        proj = torch.where((rows.a < NORM_EPS).unsqueeze(1), torch.zeros_like(rows.x),
                           rows.x_hat * gc_row.unsqueeze(1))         # a NaN norm keeps the term
        grad_x = (g_xhat - proj) * rows.inv_a.unsqueeze(1) + grad_a.unsqueeze(1) * unit
    return saturating_cast(grad_x, embeddings.dtype), grad_w
