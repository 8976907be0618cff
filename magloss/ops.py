"""``torch.library`` custom ops: the one boundary every loss goes through.

Two ops, with one schema each:

``magloss::margin_ce(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t,
kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters,
side=False) -> (lse, zy, reg, norms, label_cosine, nearest_negative_cosine, nearest_negative_class)``

``magloss::margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight,
labels, lse, norms, sphere_lambda, row_margins, neg_threshold, neg_t, kind, ..., ignore_index,
subcenters) -> (grad_embeddings, grad_weight)``

The scalars after the tensors are ``spec.op_args(ignore_index)`` of a
:class:`magloss.margins.MarginSpec`: ``ops.margin_ce(x, w, y, lam, row_margins, neg_threshold,
neg_t, *spec.op_args(ignore_index))``.

Shapes: embeddings [B, D], weight [K·C, D] (K = subcenters, 1 by default; same float dtype and device; or a float32
weight with float16/bfloat16 embeddings, as autocast passes them: the math then uses W
rounded to the embeddings' dtype, converted chunk by chunk by the fused engine, and
∂/∂weight is returned in float32), labels [B]
int64/int32 in [0, C) or equal to ignore_index (no label column: the row is ignored, or
its class lives on another shard), sphere_lambda a 0-d float tensor or None; the optional
row_margins [B, 2] (per-row m2_i, m3_i of the COMBINED family: AdaFace, ElasticFace),
neg_threshold [B] and neg_t 0-d (CurricularFace's τ_i and t) are in the compute dtype
(float32; float64 for float64 inputs) and carry no gradient. Outputs
are [B] in float32 (float64 for float64 inputs): lse_i = logsumexp_j z_ij, zy_i = z_iy,
reg_i = g(ã_i), norms_i = ‖x_i‖; the cross-entropy is lse − zy. With ``side=True`` the side
outputs follow, each [B] (docs/math.md, "Side outputs"): label_cosine c_iy (0 on rows without a
label column), nearest_negative_cosine max_{j≠y_i} c_ij (compute dtype; −inf when there is no
other column) and nearest_negative_class its local column (int64; ties: the lowest; −1 when
none), without gradient; with ``side=False`` (the default) they are empty and not computed.
``margin_ce_kept`` takes the same ``side`` and returns them after ``kept_norms``. The hyperparameters are
those of :class:`magloss.margins.MarginSpec` (``spec.op_args(ignore_index)``); see
:func:`magloss.reference.margin_ce_rows` and :func:`magloss.reference.margin_ce_backward`
(the oracle) for the exact math every kernel implements.

Keeping the op's outputs as row statistics (not a reduced loss) is what lets one
engine serve the single-GPU losses, ignored rows and class-sharded heads: the Python
layer forms CE = lse − zy, masks and reduces, and a sharded head combines lse across
ranks by log-sum-exp and zy by a sum before doing the same.

The chunked engine (:mod:`magloss.chunked`: the fused engine's algorithm in plain
PyTorch, memory flat in C) is the default kernel, on every device. When the compiled
extension is present its fused kernels are registered for "cuda" (see
:mod:`magloss._ext`). The oracle (:mod:`magloss.reference`) is never a kernel
and no library module imports it: the tests call it by name (``reference.margin_ce_forward``,
``reference.margin_ce_backward``, same arguments as the engine's). Fake (meta) kernels
and the autograd formula are registered here, so ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` work.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext, chunked
from .checks import check_values
from .margins import MarginSpec
from .rows import compute_dtype

__all__ = ["margin_ce", "margin_ce_backward", "margin_ce_kept", "margin_ce_backward_kept", "margin_ce_rows",
           "normal_draws", "checked_labels", "with_side"]

_Rows = Tuple[Tensor, Tensor, Tensor, Tensor]
_Out = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
#: The op's scalar arguments after the tensors (``spec.op_args(ignore_index)``), ``side`` excluded.
_PARAMS = ("kind", "scale", "m1", "m2", "m3", "l_a", "u_a", "l_m", "u_m", "boundary", "straight_through",
           "ignore_index", "subcenters")


@torch.library.custom_op("magloss::margin_ce", mutates_args=())
def margin_ce(
    embeddings: Tensor, weight: Tensor, labels: Tensor, sphere_lambda: Optional[Tensor],
    row_margins: Optional[Tensor], neg_threshold: Optional[Tensor], neg_t: Optional[Tensor],
    kind: int, scale: float, m1: float, m2: float, m3: float,
    l_a: float, u_a: float, l_m: float, u_m: float,
    boundary: int, straight_through: bool, ignore_index: int, subcenters: int, side: bool = False,
) -> _Out:
    """Per-row statistics (lse, zy, reg, norms) of the margin softmax, then the side outputs
    (label_cosine, nearest_negative_cosine, nearest_negative_class), [B] with ``side=True``,
    empty otherwise; see the module docstring."""
    spec, ignore_index = MarginSpec.from_op_args((kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary,
                                                  straight_through, ignore_index, subcenters))
    outs = chunked.margin_ce_forward(embeddings, weight, labels, spec, ignore_index, sphere_lambda,
                                     row_margins, neg_threshold, neg_t, side=side)
    return with_side(outs, embeddings, side)


def with_side(outs: Tuple[Tensor, ...], embeddings: Tensor, side: bool) -> Tuple[Tensor, ...]:
    """An engine's outputs as the forward ops return them: contiguous, with the three side
    outputs appended as empty tensors when ``side`` is off (the engine then computed none)."""
    if not side:
        outs = tuple(outs) + _side_like(embeddings, 0)
    return tuple(o.contiguous() for o in outs)


def _side_like(embeddings: Tensor, b: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tensors of the side outputs' dtypes: [b] label and nearest-negative cosines in the compute
    dtype, [b] int64 class indices."""
    ct = compute_dtype(embeddings.dtype)
    return (embeddings.new_empty((b,), dtype=ct), embeddings.new_empty((b,), dtype=ct),
            embeddings.new_empty((b,), dtype=torch.int64))


def _fake_side(embeddings: Tensor, args) -> Tuple[Tensor, Tensor, Tensor]:
    """The fake side outputs: ``args`` are the op's arguments after sphere_lambda; ``side`` is the
    last one when given (else its default, off)."""
    side = len(args) == len(_PARAMS) + 4 and bool(args[-1])
    return _side_like(embeddings, embeddings.shape[0] if side else 0)


@margin_ce.register_fake
def _(embeddings, weight, labels, sphere_lambda, *args):
    ct = compute_dtype(embeddings.dtype)
    b = embeddings.shape[0]
    return tuple(embeddings.new_empty((b,), dtype=ct) for _ in range(4)) + _fake_side(embeddings, args)


@torch.library.custom_op("magloss::margin_ce_backward", mutates_args=())
def margin_ce_backward(
    grad_lse: Tensor, grad_zy: Tensor, grad_reg: Tensor, grad_norms: Tensor,
    embeddings: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, norms: Tensor,
    sphere_lambda: Optional[Tensor], row_margins: Optional[Tensor], neg_threshold: Optional[Tensor],
    neg_t: Optional[Tensor],
    kind: int, scale: float, m1: float, m2: float, m3: float,
    l_a: float, u_a: float, l_m: float, u_m: float,
    boundary: int, straight_through: bool, ignore_index: int, subcenters: int,
) -> Tuple[Tensor, Tensor]:
    """(∂/∂embeddings, ∂/∂weight) of Σ_i grad_lse_i·lse_i + grad_zy_i·zy_i + grad_reg_i·reg_i
    + grad_norms_i·norms_i, given the forward's saved ``lse`` and ``norms``."""
    spec, ignore_index = MarginSpec.from_op_args((kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary,
                                                  straight_through, ignore_index, subcenters))
    return chunked.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels,
                                      lse, spec, ignore_index, sphere_lambda, row_margins, neg_threshold, neg_t)


@margin_ce_backward.register_fake
def _(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, *args):
    return torch.empty_like(embeddings), torch.empty_like(weight)


@torch.library.custom_op("magloss::margin_ce_kept", mutates_args=())
def margin_ce_kept(
    embeddings: Tensor, weight: Tensor, labels: Tensor, sphere_lambda: Optional[Tensor],
    row_margins: Optional[Tensor], neg_threshold: Optional[Tensor], neg_t: Optional[Tensor],
    kind: int, scale: float, m1: float, m2: float, m3: float,
    l_a: float, u_a: float, l_m: float, u_m: float,
    boundary: int, straight_through: bool, ignore_index: int, subcenters: int, side: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The speed path's forward: :func:`margin_ce`'s (lse, zy, reg, norms), then ``kept``
    [B, K·C] and ``kept_norms`` [K·C] in the compute dtype, what its backward reuses
    (:func:`magloss.chunked.margin_ce_forward` with ``keep=True``), then the three side
    outputs as :func:`margin_ce`'s. No gradient flows into the last five."""
    spec, ignore_index = MarginSpec.from_op_args((kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary,
                                                  straight_through, ignore_index, subcenters))
    outs = chunked.margin_ce_forward(embeddings, weight, labels, spec, ignore_index, sphere_lambda,
                                     row_margins, neg_threshold, neg_t, keep=True, side=side)
    return with_side(outs, embeddings, side)


@margin_ce_kept.register_fake
def _(embeddings, weight, labels, sphere_lambda, *args):
    ct = compute_dtype(embeddings.dtype)
    b = embeddings.shape[0]
    return tuple(embeddings.new_empty((b,), dtype=ct) for _ in range(4)) + (
        embeddings.new_empty((b, weight.shape[0]), dtype=ct), embeddings.new_empty((weight.shape[0],), dtype=ct)
    ) + _fake_side(embeddings, args)


@torch.library.custom_op("magloss::margin_ce_backward_kept", mutates_args=())
def margin_ce_backward_kept(
    grad_lse: Tensor, grad_zy: Tensor, grad_reg: Tensor, grad_norms: Tensor,
    embeddings: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, norms: Tensor, kept: Tensor,
    kept_norms: Tensor, sphere_lambda: Optional[Tensor], row_margins: Optional[Tensor], neg_threshold: Optional[Tensor],
    neg_t: Optional[Tensor],
    kind: int, scale: float, m1: float, m2: float, m3: float,
    l_a: float, u_a: float, l_m: float, u_m: float,
    boundary: int, straight_through: bool, ignore_index: int, subcenters: int,
) -> Tuple[Tensor, Tensor]:
    """:func:`margin_ce_backward` from the forward's ``kept`` products and ``kept_norms`` (two
    products per chunk)."""
    spec, ignore_index = MarginSpec.from_op_args((kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary,
                                                  straight_through, ignore_index, subcenters))
    return chunked.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels,
                                      lse, spec, ignore_index, sphere_lambda, row_margins, neg_threshold, neg_t,
                                      kept=kept, kept_norms=kept_norms)


@margin_ce_backward_kept.register_fake
def _(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, *args):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def margin_ce_rows(embeddings: Tensor, weight: Tensor, labels: Tensor, sphere_lambda: Optional[Tensor],
                   row_margins: Optional[Tensor], neg_threshold: Optional[Tensor], neg_t: Optional[Tensor],
                   *params, side: bool = False) -> Tuple[Tensor, ...]:
    """(lse, zy, reg, norms) of :func:`margin_ce` (same arguments) through the engine path that
    :func:`magloss.chunked.select_path` picks: ``margin_ce_kept`` (speed: three products, B×K·C
    kept) or ``margin_ce`` (flat: four products), on every engine: the fused CUDA engine
    implements both pairs (docs/cuda.md). What the losses call. ``side=True`` appends the three
    side outputs (label_cosine, nearest_negative_cosine, nearest_negative_class) of the same forward."""
    if chunked.select_path(embeddings, weight) == "speed":
        outs = margin_ce_kept(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t,
                              *params, side)
        outs = outs[:4] + outs[6:]
    else:
        outs = margin_ce(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t, *params, side)
    return outs if side else outs[:4]


_TENSORS = 7   # embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, *optional = inputs[:_TENSORS]
    lse, _, _, norms = output[:4]
    ctx.mark_non_differentiable(*output[4:])        # the side outputs
    ctx.save_for_backward(embeddings, weight, labels, lse, norms, *optional)
    ctx.params, ctx.n_inputs = _backward_params(inputs), len(inputs)


def _backward_params(inputs) -> tuple:
    """The backward ops' scalar arguments: the forward's, without ``side``."""
    return tuple(inputs[_TENSORS:_TENSORS + len(_PARAMS)])


def _backward(ctx, grad_lse, grad_zy, grad_reg, grad_norms, *_grad_side):
    embeddings, weight, labels, lse, norms, *optional = ctx.saved_tensors
    grads = (g.contiguous() for g in (grad_lse, grad_zy, grad_reg, grad_norms))
    gx, gw = margin_ce_backward(*grads, embeddings, weight, labels, lse, norms, *optional, *ctx.params)
    return (gx, gw) + (None,) * (ctx.n_inputs - 2)


margin_ce.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_kept(ctx, inputs, output):
    embeddings, weight, labels, *optional = inputs[:_TENSORS]
    lse, _, _, norms, kept, kept_norms = output[:6]
    ctx.mark_non_differentiable(*output[4:])         # kept, kept_norms and the side outputs
    ctx.set_materialize_grads(False)     # else autograd fills a B×K·C zero gradient for ``kept`` each step
    ctx.save_for_backward(embeddings, weight, labels, lse, norms, kept, kept_norms, *optional)
    ctx.params, ctx.n_inputs = _backward_params(inputs), len(inputs)


def _backward_kept(ctx, grad_lse, grad_zy, grad_reg, grad_norms, *_grad_kept_and_side):
    embeddings, weight, labels, lse, norms, kept, kept_norms, *optional = ctx.saved_tensors
    grads = (torch.zeros_like(lse) if g is None else g.contiguous() for g in (grad_lse, grad_zy, grad_reg, grad_norms))
    gx, gw = margin_ce_backward_kept(*grads, embeddings, weight, labels, lse, norms, kept, kept_norms, *optional,
                                     *ctx.params)
    return (gx, gw) + (None,) * (ctx.n_inputs - 2)


margin_ce_kept.register_autograd(_backward_kept, setup_context=_setup_context_kept)


def _no_double_backward(ctx, *grads):
    spec, _ = MarginSpec.from_op_args(ctx.params)
    raise RuntimeError(
        f"magloss margin loss ({spec}): second-order gradients are not supported (a backward "
        "through the gradient, e.g. torch.autograd.grad(..., create_graph=True) then .backward() on it). "
        "Supported: first-order gradients (loss.backward(), torch.autograd.grad), under torch.compile too")


def _setup_double(ctx, inputs, output):
    ctx.params = inputs[13:]


margin_ce_backward.register_autograd(_no_double_backward, setup_context=_setup_double)


def _setup_double_kept(ctx, inputs, output):
    ctx.params = inputs[15:]


margin_ce_backward_kept.register_autograd(_no_double_backward, setup_context=_setup_double_kept)


def functorch_unsupported(name: str, *tensors) -> None:
    """Raise a RuntimeError naming the loss ``name`` when called under a ``torch.func``
    transform (grad, vmap, jacrev, ...): the custom ops' autograd formulas are registered
    with ``torch.library`` and do not compose with those transforms. A no-op under
    torch.compile (dynamo never wraps tensors in functorch levels there)."""
    if torch.compiler.is_compiling():
        return
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is None:
        return
    if any(isinstance(t, Tensor) and wrapped(t) for t in tensors):
        raise RuntimeError(
            f"{name}: torch.func transforms (torch.func.grad, vmap, jacrev, functional_call under grad ...) "
            "are not supported by magloss's losses. Supported: loss.backward() and torch.autograd.grad "
            "(first order), torch.compile(fullgraph=True)")


@torch.library.custom_op("magloss::normal_draws", mutates_args=())
def normal_draws(rng_state: Tensor, count: int, mean: float, std: float) -> Tuple[Tensor, Tensor]:
    """``count`` draws of N(mean, std²), float64 on the CPU, from a CPU ``torch.Generator`` whose
    state is ``rng_state`` (uint8, ``Generator.get_state()``); returns (draws [count], the
    generator's state after the draws). The draws equal ``torch.randn(count, generator=g,
    dtype=torch.float64) * std + mean`` for a generator g in that state. An op (not a
    Generator call in the forward) so that ``torch.compile(fullgraph=True)`` traces ElasticFace."""
    g = torch.Generator()
    g.set_state(rng_state.detach().cpu())
    draws = torch.randn(count, generator=g, dtype=torch.float64) * std + mean
    return draws, g.get_state()


@normal_draws.register_fake
def _(rng_state, count, mean, std):
    return rng_state.new_empty((count,), dtype=torch.float64, device="cpu"), \
        torch.empty_like(rng_state, device="cpu")


@torch.library.custom_op("magloss::checked_labels", mutates_args=())
def checked_labels(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                   num_classes: int) -> Tensor:
    """:func:`magloss.checks.check_values` (label range, NaN/Inf; ValueError naming the
    argument) as an op, returning the labels as a new int64 tensor: the check then runs
    inside a ``torch.compile(fullgraph=True)`` graph (an op, not a data-dependent branch),
    and the result's use keeps it from being dropped."""
    check_values(embeddings, weight, labels, ignore_index, num_classes)
    return labels.to(torch.int64, copy=True)


@checked_labels.register_fake
def _(embeddings, weight, labels, ignore_index, num_classes):
    return torch.empty_like(labels, dtype=torch.int64)

_ext.register_kernels(margin_ce, margin_ce_backward, kept_ops=(margin_ce_kept, margin_ce_backward_kept))
