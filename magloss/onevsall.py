"""One-vs-all losses (SFace, UniFace, SphereFace2, P2SGrad): a sum over the classes, chunked.

The margin softmax reduces each row by a log-sum-exp over the classes. A one-vs-all loss
instead treats every class as its own binary problem and sums:

    L_i = Σ_j ℓ(c_ij, [j = y_i]; b)        c_ij = x̂_i·w_j / max(‖w_j‖, ε)

with an elementwise ℓ, its (upstream-defined) derivative ∂ℓ/∂c and, for the losses with a
learnable bias b (UniFace, SphereFace2), ∂ℓ/∂b. See docs/one_vs_all.md for each ℓ and every
place where magloss follows the paper or the upstream code.

Engine (:func:`one_vs_all_forward`, :func:`one_vs_all_backward`), memory flat in C: the
classes are visited in chunks of N columns (:func:`magloss.chunked.chunk_columns`, the
``MAGLOSS_CHUNK`` switch included); per chunk the normalized rows of W, the B×N cosine tile
(one product), the elementwise ℓ and a row sum. The forward keeps nothing but the inputs;
the backward recomputes each tile (as the margin engine does), forms
G_ij = g_i·∂ℓ/∂c_ij (g = the rows' incoming gradient) and accumulates

    ∂L/∂x̂_i += Σ_j G_ij r_j w_j,     ∂L/∂w_j = r_j Σ_i G_ij x̂_i − r_j² (Σ_i G_ij c_ij) w_j,
    ∂L/∂b   += Σ_ij g_i ∂ℓ/∂b,

then ∂L/∂x_i = (∂L/∂x̂_i − x̂_i (∂L/∂x̂_i·x̂_i))/a_i. Products, ℓ and sums run in float32
(float64 for float64 inputs); float16/bfloat16 operands are rounded to the embeddings'
dtype first (the autocast pair: a float32 W rounded chunk by chunk), as in the margin engine.

With ``return_parts=True`` the forward also tracks the side outputs of the margin losses (label
cosine, nearest negative cosine and class, then the predicted class; docs/one_vs_all.md, "Side
outputs") on the cosine tiles it forms anyway: the op's ``side`` flag, off by default.

The ``magloss::one_vs_all`` op (and its backward op) is registered with ``torch.library``
with fake kernels and an autograd formula, so ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` work. With the compiled extension, CUDA tensors of float32/float16/bfloat16
run the fused CUDA engine's one-vs-all kernels instead (csrc/onevsall.cu, registered by
:func:`magloss._ext.register_one_vs_all_kernels`; float64 stays on this engine): docs/cuda.md.
"""

from __future__ import annotations

import math
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ext
from .checks import check_inputs, check_values
from .chunked import _Nearest, _side_outputs, chunk_columns
from .margins import NORM_EPS
from .ops import _side_like, with_side
from .rows import compute_dtype, label_subcenters, saturating_cast, weight_operand
from .validation import (check_angle, check_ignore_index, check_int, check_non_negative, check_positive,
                         check_reduction)

__all__ = [
    "SFACE", "UNIFACE", "SPHEREFACE2", "P2SGRAD", "KINDS", "SPHEREFACE2_MARGINS",
    "sface_params", "uniface_params", "sphereface2_params", "elements", "one_vs_all_forward",
    "one_vs_all_backward", "one_vs_all", "one_vs_all_loss",
    "sface_loss", "uniface_loss", "sphereface2_loss", "p2sgrad_loss", "uniface_bias_init",
    "sphereface2_bias_init",
]

#: Loss kinds of the op (its ``kind`` argument) and their parameter lists (``params``):
SFACE = 0        # [s, k, a, b]
UNIFACE = 1      # [s, m, λ]
SPHEREFACE2 = 2  # [r, m, t, α, lw, margin type (0 'C', 1 'A', 2 'M')]
P2SGRAD = 3      # [1/C] (the mean over the classes)
KINDS = {SFACE: ("SFace", 4), UNIFACE: ("UniFace", 3), SPHEREFACE2: ("SphereFace2", 6), P2SGRAD: ("P2SGrad", 1)}
#: SphereFace2's margin types, as opensphere names them: additive on the cosine (C), on the
#: angle (A), multiplicative on the angle (M).
SPHEREFACE2_MARGINS = ("C", "A", "M")
#: opensphere's clamps of the angle in SphereFace2-A/M.
_ACOS_EPS, _PI_CLAMP = 1e-5, 3.14159


def _scale(value) -> float:
    """A scale s > 0 that the float32 logits can hold; ValueError naming ``scale`` otherwise."""
    return check_positive("scale", value, torch.finfo(torch.float32).max, inclusive=True)


def sface_params(scale, k, a, b) -> Tuple[float, float, float, float]:
    """SFace's (s, k, a, b), validated: s, k > 0; a, b angles in [0, π) radians. ValueError naming the argument."""
    return (_scale(scale), check_positive("k", k), check_angle("a", a, math.pi, upper_text="pi"),
            check_angle("b", b, math.pi, upper_text="pi"))


def uniface_params(scale, margin, neg_weight) -> Tuple[float, float, float]:
    """UniFace's (s, m, λ), validated: s > 0; m, λ ≥ 0. ValueError naming the argument."""
    return _scale(scale), check_non_negative("margin", margin), check_non_negative("neg_weight", neg_weight, "weight")


def sphereface2_params(scale, margin, t, alpha, loss_weight, margin_type) -> Tuple[float, ...]:
    """SphereFace2's (r, m, t, α, lw, margin type index), validated: r, t, lw > 0; m ≥ 0; α in (0, 1);
    ``margin_type`` one of 'C', 'A', 'M'. ValueError naming the argument."""
    if margin_type not in SPHEREFACE2_MARGINS:
        raise ValueError(f"margin_type: expected one of 'C', 'A', 'M', got {margin_type!r}")
    return (_scale(scale), check_non_negative("margin", margin), check_positive("t", t),
            check_positive("alpha", alpha, 1.0), check_positive("loss_weight", loss_weight),
            float(SPHEREFACE2_MARGINS.index(margin_type)))


def _sphereface2_g(c: Tensor, lab: Tensor, m: float, t: float, mtype: int) -> Tensor:
    """g(c) with its margin, the value SphereFace2's binary logit takes (under no_grad upstream):
    C: 2((c+1)/2)^t − 1 ∓ m; A: 2((cos(θ + m·δ)+1)/2)^t − 1; M: the same with θ·m at the label."""
    if mtype == 0:
        base = ((c.clamp(-1.0, 1.0) + 1.0) / 2.0).pow(t)
        return 2.0 * base - 1.0 - m * torch.where(lab, 1.0, -1.0).to(c.dtype)
    theta = torch.acos(c.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    theta = torch.where(lab, theta + m if mtype == 1 else theta * m, theta).clamp(_ACOS_EPS, _PI_CLAMP)
    return 2.0 * ((torch.cos(theta) + 1.0) / 2.0).pow(t) - 1.0


def _softplus(u: Tensor) -> Tensor:
    """log(1 + e^u) to full precision (F.softplus returns u itself past u = 20, a relative
    error up to 2e-9 that a sum over many classes keeps)."""
    return u.clamp_min(0.0) + torch.log1p(torch.exp(-u.abs()))


def elements(kind: int, params: Sequence[float], c: Tensor, lab: Tensor, bias: Optional[Tensor],
             grad: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The elementwise one-vs-all loss on a tile: (ℓ, None, None), or with ``grad`` (None,
    ∂ℓ/∂c, ∂ℓ/∂b or None), all [B, N]: the forward needs only ℓ, the backward only the derivatives.

    c: cosines [B, N] (compute dtype); lab: [B, N] bool, True at each row's label column;
    bias: 0-d tensor (compute dtype) for UniFace and SphereFace2, else None. ∂ℓ/∂c is the
    upstream gradient: SFace's sigmoid weights and SphereFace2's g(c) − c carry none.
    """
    if kind == SFACE:
        s, k, a, b = params
        theta = torch.acos(c.clamp(-1.0, 1.0))
        coef = torch.where(lab, -s * torch.sigmoid(k * (theta - a)), s * torch.sigmoid(-k * (theta - b)))
        return (None, coef, None) if grad else (coef * c, None, None)
    if kind == UNIFACE:
        s, m, lam = params
        z = torch.where(lab, s * (c - m), s * c) - bias
        zc = z.clamp(-s, s)
        if not grad:
            return torch.where(lab, _softplus(-zc), lam * _softplus(zc)), None, None
        inside = ((z >= -s) & (z <= s)).to(c.dtype)          # the clamp passes no gradient outside
        dz = torch.where(lab, -torch.sigmoid(-zc), lam * torch.sigmoid(zc)) * inside
        return None, s * dz, -dz
    if kind == SPHEREFACE2:
        r, m, t, alpha, lw, mtype = params
        z = r * _sphereface2_g(c, lab, m, t, int(mtype)) + bias
        w = torch.where(lab, c.new_full((), alpha), c.new_full((), 1.0 - alpha)) * (lw / r)   # not float32 scalars
        if not grad:
            return w * _softplus(torch.where(lab, -z, z)), None, None
        dz = w * (torch.sigmoid(z) - lab.to(c.dtype))
        return None, r * dz, dz
    if kind == P2SGRAD:
        (inv_c,) = params
        d = c.clamp(-1.0, 1.0) - lab.to(c.dtype)
        if not grad:
            return inv_c * d * d, None, None
        return None, 2.0 * inv_c * d * ((c >= -1.0) & (c <= 1.0)).to(c.dtype), None
    raise ValueError(f"kind: expected one of {sorted(KINDS)} (SFace, UniFace, SphereFace2, P2SGrad), got {kind}")


def _check_op_args(kind: int, params: Sequence[float], bias: Optional[Tensor], embeddings: Tensor) -> None:
    """The op's scalar and bias arguments (they come unvalidated from torch.library callers)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)} (SFace, UniFace, SphereFace2, P2SGrad), got {kind}")
    name, count = KINDS[kind]
    if len(params) != count:
        raise ValueError(f"params: {name} expects {count} parameters, got {len(params)}")
    needs_bias = kind in (UNIFACE, SPHEREFACE2)
    if needs_bias != (bias is not None):
        raise ValueError(f"bias: {name} {'needs a learnable bias' if needs_bias else 'takes no bias'}, "
                         f"got {'None' if bias is None else 'a tensor'}")
    if bias is not None and (bias.numel() != 1 or not bias.is_floating_point() or bias.device != embeddings.device):
        raise ValueError(f"bias: expected a one-element float tensor on {embeddings.device}, "
                         f"got {list(bias.shape)} {bias.dtype} on {bias.device}")


class _Rows:
    """What each chunk of the forward and the backward needs from the rows."""

    def __init__(self, embeddings: Tensor, labels: Tensor, ignore_index: int) -> None:
        self.ct = compute_dtype(embeddings.dtype)
        x = embeddings.to(self.ct)
        self.a = x.norm(dim=1)
        self.inv_a = 1.0 / self.a.clamp_min(NORM_EPS)
        self.x_hat = x * self.inv_a.unsqueeze(1)
        # an ignored row matches no column (its loss is masked by the caller)
        self.lab = torch.where(labels != ignore_index, labels.long(), -1).unsqueeze(1)

    def tile(self, embeddings: Tensor, weight: Tensor, j0: int, j1: int):
        """(w [N, D], ‖w‖ [N], r [N], cosines [B, N], label mask [B, N]) of classes [j0, j1)."""
        w = weight_operand(embeddings, weight[j0:j1]).to(self.ct)
        wn = w.norm(dim=1)
        r = 1.0 / wn.clamp_min(NORM_EPS)
        cos = (self.x_hat @ w.t()) * r
        lab = self.lab == torch.arange(j0, j1, device=cos.device).unsqueeze(0)
        return w, wn, r, cos, lab


def one_vs_all_forward(embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], kind: int,
                       params: Sequence[float], ignore_index: int, side: bool = False) -> Tuple[Tensor, ...]:
    """(rows,): the row losses L_i = Σ_j ℓ(c_ij, [j = y_i]) [B] in the compute dtype (a row
    labelled ``ignore_index`` has no label column: every class is a negative). ``side=True``
    appends the side outputs of the margin engine (:func:`magloss.chunked.margin_ce_forward`,
    docs/math.md "Side outputs"): label_cosine c_iy (0 without a label column),
    nearest_negative_cosine max_{j≠y_i} c_ij and nearest_negative_class its index (int64, ties:
    the lowest; −inf and −1 when the row has no non-label class), tracked on the cosine tiles
    the sum computes anyway plus one gather-dot. Checks the values (label range, NaN/Inf;
    ValueError naming the argument) first."""
    _check_op_args(kind, params, bias, embeddings)
    check_values(embeddings, weight, labels, ignore_index)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):   # the dtypes are ours to set
        return _forward(embeddings, weight, labels, bias, kind, params, ignore_index, side)


class _SideRows(NamedTuple):
    """What :func:`magloss.chunked._side_outputs` reads of a row stage."""

    x_hat: Tensor   # [B, D]
    has: Tensor     # [B] bool: the row has a label column
    c_y: Tensor     # [B] label cosine (a gather-dot, as the nearest negative's)


def _forward(embeddings, weight, labels, bias, kind, params, ignore_index, side=False) -> Tuple[Tensor, ...]:
    rows = _Rows(embeddings, labels, ignore_index)
    b = None if bias is None else bias.reshape(()).to(rows.ct)
    out = torch.zeros(embeddings.shape[0], dtype=rows.ct, device=embeddings.device)
    nearest = _Nearest(embeddings.shape[0], out) if side else None
    n = chunk_columns(embeddings.shape[0], weight.shape[0])
    for j0 in range(0, weight.shape[0], n):
        *_, cos, lab = rows.tile(embeddings, weight, j0, min(j0 + n, weight.shape[0]))
        out += elements(kind, params, cos, lab, b)[0].sum(1)
        if nearest is not None:
            nearest.update(cos.masked_fill(lab, -torch.inf), None, j0)
    if not side:
        return (out,)
    has = rows.lab.squeeze(1) >= 0
    c_y = label_subcenters(rows.x_hat, weight, rows.lab.squeeze(1).clamp_min(0), 1, embeddings.dtype)[3][:, 0]
    return (out,) + _side_outputs(_SideRows(rows.x_hat, has, c_y), weight, 1, embeddings.dtype, nearest)


def one_vs_all_backward(grad_rows: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor,
                        bias: Optional[Tensor], kind: int, params: Sequence[float],
                        ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂/∂embeddings, ∂/∂weight, ∂/∂bias) of Σ_i grad_rows_i·L_i, recomputing each tile.
    The gradients come in the dtypes of their inputs (a half-precision ∂x saturates instead
    of overflowing); ∂/∂bias is [1] in the compute dtype (zeros without a bias)."""
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        return _backward_chunks(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index)


def _backward_chunks(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index):
    rows = _Rows(embeddings, labels, ignore_index)
    ct = rows.ct
    g = grad_rows.to(ct).unsqueeze(1)
    b = None if bias is None else bias.reshape(()).to(ct)
    gx_hat = torch.zeros_like(rows.x_hat)
    gw = torch.empty(weight.shape, dtype=ct, device=weight.device)
    gb = torch.zeros(1, dtype=ct, device=embeddings.device)
    n = chunk_columns(embeddings.shape[0], weight.shape[0])
    for j0 in range(0, weight.shape[0], n):
        j1 = min(j0 + n, weight.shape[0])
        w, wn, r, cos, lab = rows.tile(embeddings, weight, j0, j1)
        _, dc, db = elements(kind, params, cos, lab, b, grad=True)
        G = g * dc
        if db is not None:
            gb += (g * db).sum()
        gx_hat += G @ (w * r.unsqueeze(1))
        coef = r * r * (G * cos).sum(0) * (wn >= NORM_EPS).to(ct)     # no norm term where ‖w‖ is clamped
        gw[j0:j1] = r.unsqueeze(1) * (G.t() @ rows.x_hat) - coef.unsqueeze(1) * w
    radial = (gx_hat * rows.x_hat).sum(1, keepdim=True) * (rows.a >= NORM_EPS).to(ct).unsqueeze(1)
    gx = (gx_hat - rows.x_hat * radial) * rows.inv_a.unsqueeze(1)
    return saturating_cast(gx, embeddings.dtype), saturating_cast(gw, weight.dtype), gb


@torch.library.custom_op("magloss::one_vs_all", mutates_args=())
def one_vs_all(embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], kind: int,
               params: List[float], ignore_index: int, side: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, label_cosine, nearest_negative_cosine, nearest_negative_class): the row losses [B]
    of a one-vs-all loss (float32; float64 for float64 inputs), then with ``side=True`` the side
    outputs of the same forward ([B] each, no gradient), empty and not computed otherwise (the
    margin op's convention, :mod:`magloss.ops`). See the module docstring and
    :func:`one_vs_all_forward`."""
    return with_side(one_vs_all_forward(embeddings, weight, labels, bias, kind, params, ignore_index, side),
                     embeddings, side)


@one_vs_all.register_fake
def _(embeddings, weight, labels, bias, kind, params, ignore_index, side=False):
    b = embeddings.shape[0]
    return (embeddings.new_empty((b,), dtype=compute_dtype(embeddings.dtype)),) + _side_like(embeddings, b if side else 0)


@torch.library.custom_op("magloss::one_vs_all_backward", mutates_args=())
def _backward_op(grad_rows: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                 kind: int, params: List[float], ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂/∂embeddings, ∂/∂weight, ∂/∂bias [1]) of Σ_i grad_rows_i·L_i: :func:`one_vs_all_backward`."""
    return one_vs_all_backward(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index)


@_backward_op.register_fake
def _(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index):
    return (torch.empty_like(embeddings), torch.empty_like(weight),
            embeddings.new_empty((1,), dtype=compute_dtype(embeddings.dtype)))


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, bias = inputs[:4]
    ctx.mark_non_differentiable(*output[1:])        # the side outputs
    ctx.save_for_backward(embeddings, weight, labels, bias)
    ctx.params, ctx.n_inputs = inputs[4:7], len(inputs)     # the backward op's scalars: the forward's, without side


def _backward(ctx, grad_rows, *_grad_side):
    embeddings, weight, labels, bias = ctx.saved_tensors
    gx, gw, gb = _backward_op(grad_rows.contiguous(), embeddings, weight, labels, bias, *ctx.params)
    gb = None if bias is None else gb.to(bias.dtype).reshape(bias.shape)
    return (gx, gw, None, gb) + (None,) * (ctx.n_inputs - 4)


one_vs_all.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        f"magloss one-vs-all loss ({KINDS[ctx.kind][0]}): second-order gradients are not supported (a backward "
        "through the gradient, e.g. torch.autograd.grad(..., create_graph=True) then .backward() on it). "
        "Supported: first-order gradients (loss.backward(), torch.autograd.grad), under torch.compile too")


def _setup_double(ctx, inputs, output):
    ctx.kind = inputs[5]


_backward_op.register_autograd(_no_double_backward, setup_context=_setup_double)

# The fused CUDA engine's kernels for "cuda", where the compiled extension has them.
_ext.register_one_vs_all_kernels(one_vs_all, _backward_op)


# -- functional forms ----------------------------------------------------------------------------------------
def one_vs_all_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, kind: int, params: Sequence[float],
                    bias: Optional[Tensor] = None, *, ignore_index: int = -1, reduction: str = "mean",
                    return_parts: bool = False, sample_weight: Optional[Tensor] = None):
    """A one-vs-all loss: the rows L_i (:func:`one_vs_all`), rows labelled ``ignore_index``
    masked to zero, reduced ('mean' over the non-ignored rows, 'sum', or 'none': [B]).

    embeddings [B, D] (any magnitude; float16/bfloat16/float32/float64), weight [C, D] (same
    dtype, or float32 under autocast), labels [B] int64/int32 in [0, C) or ``ignore_index``,
    bias a one-element tensor (UniFace, SphereFace2; a Python float is a fixed b) or None. Returns a 0-d (or [B]) float32
    tensor (float64 for float64 inputs); with ``return_parts`` a
    :class:`magloss.functional.LossParts` (ce = loss, reg = 0, norms = ‖x_i‖, and the side outputs
    label_cosine, nearest_negative_cosine, nearest_negative_class, predicted_class of the same
    forward, as the margin losses: :func:`magloss.functional.side_parts`). ``sample_weight``:
    optional [B] row weights, as the margin losses (:func:`magloss.functional.check_sample_weight`:
    L_i is multiplied by w_i, 'mean' divides by the valid rows' Σ w_i).

    Raises TypeError/ValueError naming the argument (:func:`magloss.checks.check_inputs`,
    :func:`magloss.checks.check_values`).
    """
    from . import functional as MF           # functional imports the margin ops; resolve at call time

    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    embeddings, weight, up = MF.autocast_inputs(embeddings, weight)
    check_inputs(embeddings, weight, labels)
    sample_weight = MF.check_sample_weight(sample_weight, embeddings)
    if isinstance(bias, numbers.Real) and not isinstance(bias, bool):     # a fixed b
        bias = torch.tensor([float(bias)], dtype=compute_dtype(embeddings.dtype), device=embeddings.device)
    rows, *side = one_vs_all(embeddings, weight, labels, bias, int(kind), [float(p) for p in params],
                             int(ignore_index), return_parts)
    norms = embeddings.detach().to(rows.dtype).norm(dim=1)
    if up is not None:
        norms = norms * up.to(norms.dtype)
    valid = labels != ignore_index
    return MF.reduce_rows(rows, rows, norms, valid, None, reduction, 0.0, return_parts, sample_weight,
                          side=MF.side_parts(labels, valid, *side) if return_parts else None)


def uniface_bias_init(num_classes: int, r: float = 1.0) -> float:
    """UniFace's initial bias b = log(10·r·C) (CVI-SZU/UniFace's initialisation)."""
    return math.log(10.0 * r * check_int("num_classes", num_classes, 1))


def sphereface2_bias_init(num_classes: int, alpha: float, r: float, m: float, t: float, margin_type: str = "C") -> float:
    """SphereFace2's closed-form initial bias (opensphere): with z = α/((1 − α)(C − 1)) and the
    logits a_y, a_i a label and a non-label column at θ = π/2 would get,
    b = log(2z) − a_i − log(1 − z + sqrt((1 − z)² + 4z·exp(a_y − a_i))). C = 1 (no negative
    class) takes C − 1 = 1."""
    r, m, t, alpha, _, _ = sphereface2_params(r, m, t, alpha, 1.0, margin_type)
    z = alpha / ((1.0 - alpha) * max(check_int("num_classes", num_classes, 1) - 1, 1))
    base = r * (2.0 * 0.5 ** t - 1.0)
    if margin_type == "C":
        ay, ai = base - r * m, base + r * m
    else:
        theta_y = min(math.pi, math.pi / 2.0 + m if margin_type == "A" else m * math.pi / 2.0)
        ay, ai = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0), base
    return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)))


def sface_loss(embeddings, weight, labels, scale: float = 64.0, k: float = 80.0, a: float = 0.8, b: float = 1.23,
               *, ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
               sample_weight: Optional[Tensor] = None):
    """SFace (Zhong et al. 2021): L_i = −s·σ(k(θ_iy − a))·c_iy + Σ_{j≠y} s·σ(−k(θ_ij − b))·c_ij,
    the sigmoid weights without gradient (θ = arccos c, radians). Defaults s 64, k 80, a 0.80, b 1.23."""
    return one_vs_all_loss(embeddings, weight, labels, SFACE, sface_params(scale, k, a, b), ignore_index=ignore_index,
                           reduction=reduction, return_parts=return_parts, sample_weight=sample_weight)


def uniface_loss(embeddings, weight, labels, bias, scale: float = 64.0, margin: float = 0.4,
                 neg_weight: float = 1.0, *, ignore_index: int = -1, reduction: str = "mean",
                 return_parts: bool = False,
                 sample_weight: Optional[Tensor] = None):
    """UniFace's unified cross-entropy (Zhou et al. 2023): L_i = softplus(−[s(c_iy − m) − b]) +
    λ·Σ_{j≠y} softplus(s·c_ij − b), each logit clamped to [−s, s] (no gradient outside), as
    CVI-SZU/UniFace. ``bias``: the learnable b (one-element tensor; a float is a fixed b). Defaults s 64, m 0.4, λ 1."""
    return one_vs_all_loss(embeddings, weight, labels, UNIFACE, uniface_params(scale, margin, neg_weight), bias,
                           ignore_index=ignore_index, reduction=reduction, return_parts=return_parts,
                           sample_weight=sample_weight)


def sphereface2_loss(embeddings, weight, labels, bias, scale: float = 40.0, margin: float = 0.4, t: float = 3.0,
                     alpha: float = 0.7, loss_weight: float = 50.0, margin_type: str = "C", *,
                     ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
                     sample_weight: Optional[Tensor] = None):
    """SphereFace2 (Wen et al. 2022) as opensphere: binary logits z_ij = r·(c_ij + sg[g(c_ij) ∓ m − c_ij]) + b
    (margin type 'C'; 'A' and 'M' put the margin on the angle), g(c) = 2((c + 1)/2)^t − 1,
    L_i = (lw/r)·[α·softplus(−z_iy) + (1 − α)·Σ_{j≠y} softplus(z_ij)]: opensphere's
    BCE mean over B·C times lw·C/r, per row. Defaults r 40, m 0.4, t 3, α 0.7, lw 50, 'C'."""
    params = sphereface2_params(scale, margin, t, alpha, loss_weight, margin_type)
    return one_vs_all_loss(embeddings, weight, labels, SPHEREFACE2, params, bias, ignore_index=ignore_index,
                           reduction=reduction, return_parts=return_parts, sample_weight=sample_weight)


def p2sgrad_loss(embeddings, weight, labels, num_classes: Optional[int] = None, *, ignore_index: int = -1,
                 reduction: str = "mean", return_parts: bool = False,
                 sample_weight: Optional[Tensor] = None):
    """P2SGrad (Zhang et al. 2019) as pytorch-metric-learning: L_i = (1/C)·Σ_j (clamp(c_ij, −1, 1) − [j = y_i])²,
    so the 'mean' reduction is the MSE over B·C. ``num_classes``: the C of the 1/C (default
    weight.shape[0]; a sharded head passes the global count)."""
    c = weight.shape[0] if num_classes is None else check_int("num_classes", num_classes, 1)
    return one_vs_all_loss(embeddings, weight, labels, P2SGRAD, (1.0 / c,), ignore_index=ignore_index,
                           reduction=reduction, return_parts=return_parts, sample_weight=sample_weight)
