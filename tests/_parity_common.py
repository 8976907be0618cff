"""What the fused engine's parity suites share: the float64 oracle, the same-precision eager
baseline and the parity assertions (docs/cuda.md). The families, the inputs and the tolerances
are tests/cases.py's (re-exported here for the suites that import them from this module).

Used by tests/test_cuda_parity.py (the compiled extension on a GPU) and by
tests/test_engine_emulated.py (the same kernels under the CPU emulator, tests/emu). No device
is assumed here: tensors are created on ``device`` (CPU by default).

"rel" error (cases.rel) = max |fused − oracle| / max |oracle| over the whole tensor.
* fp32, TF32 off: per-row loss and row statistics rel ≤ 1e-5, gradients rel ≤ 1e-4;
* TF32, fp16, bf16: error vs float64 ≤ 2 × the error of an eager same-precision baseline
  (+ a tiny floor), the baseline being the reference math with the cosine matrix computed
  by a matmul in that precision and the margin/softmax in fp32, differentiated by autograd;
* the plain-fp32 (SIMT) products on fp16/bf16 inputs: fp32 math on the rounded inputs, so the
  loss as fp32 and the gradients within 2 eps of the dtype (one rounding on output).
"""

from __future__ import annotations

import contextlib

import torch

from cases import (ALL, FAMILIES, FEATURES, FUSED_FP32_GRADS_REL, FUSED_FP32_ROWS_REL, LOWP_FACTOR, LOWP_FLOOR,
                   ROUNDED_GRADS_EPS, abs_err, feature_inputs, lam_tensor, make_case, make_feature_case, rel)
from magloss import reference

__all__ = ["ALL", "FAMILIES", "FEATURES", "PRECISION_DTYPES", "NO_EXTRAS", "abs_err", "as_dtype", "assert_fp32_parity",
           "assert_rounded_fp32_parity", "assert_within_eager", "eager_lowp", "feature_inputs", "lam_tensor",
           "make_case", "make_feature_case", "oracle", "rel", "tf32"]

PRECISION_DTYPES = {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NO_EXTRAS = (None, None, None)


def as_dtype(extras, dtype):
    """The optional op tensors (row_margins, neg_threshold, neg_t) in ``dtype`` (None stays None)."""
    return tuple(None if t is None else t.to(dtype) for t in extras)


def oracle(x, w, y, spec, ii, lam, grads, extras=NO_EXTRAS):
    """float64 reference statistics and gradients. extras: (row_margins, neg_threshold, neg_t),
    given in float32 (what the fused op sees) and passed to the oracle exactly, in float64."""
    lam64 = None if lam is None else lam.double()
    x64, w64 = x.double(), w.double()
    ex64 = as_dtype(extras, torch.float64)
    lse, zy, reg, norms = reference.margin_ce_rows(x64, w64, y, spec, ii, lam64, *ex64)
    gx, gw = reference.margin_ce_backward(*grads, x64, w64, y, lse, spec, ii, lam64, *ex64)
    return (lse, zy, reg, norms), (gx, gw)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuBLAS fp32 matmuls on/off. Uses the legacy flag, whose setter keeps torch's
    legacy and new (fp32_precision) settings consistent."""
    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = enabled
    try:
        yield
    finally:
        m.allow_tf32 = old


def assert_fp32_parity(rows, grads, ref_rows, ref_grads, what=""):
    lse, zy, reg, norms = rows[:4]
    rlse, rzy, rreg, rnorms = ref_rows
    assert rows[0].dtype == torch.float32
    errs = {
        "loss": rel(lse - zy, rlse - rzy),
        "lse": rel(lse, rlse),
        "zy": rel(zy, rzy) if rzy.abs().max() > 0 else abs_err(zy, rzy),
        "reg": rel(reg, rreg) if rreg.abs().max() > 0 else abs_err(reg, rreg),
        "norms": rel(norms, rnorms),
    }
    for k, e in errs.items():
        assert e <= FUSED_FP32_ROWS_REL, f"{what} {k}: rel error {e:.3g} > {FUSED_FP32_ROWS_REL} ({errs})"
    for name, g, r in (("grad_embeddings", grads[0], ref_grads[0]), ("grad_weight", grads[1], ref_grads[1])):
        e = rel(g, r)
        assert e <= FUSED_FP32_GRADS_REL, f"{what} {name}: rel error {e:.3g} > {FUSED_FP32_GRADS_REL}"


def eager_lowp(x, w, y, spec, ii, lam, grads, precision, extras=NO_EXTRAS):
    """Eager baseline in `precision` ('tf32', 'fp16', 'bf16'): the reference math with the cosine
    matrix from a matmul in that precision, margin/softmax in fp32; gradients by autograd."""
    dt = PRECISION_DTYPES[precision]
    xd = x.to(dt).detach().requires_grad_()
    wd = w.to(dt).detach().requires_grad_()
    with tf32(precision == "tf32"):
        rows = reference.margin_ce_rows(xd, wd, y, spec, ii, lam, *as_dtype(extras, torch.float32), product_dtype=dt)
        total = sum((gg.float() * t).sum() for gg, t in zip(grads, rows))
        gx, gw = torch.autograd.grad(total, (xd, wd))
    return tuple(t.detach() for t in rows), (gx, gw)


def assert_within_eager(pairs, what=""):
    """pairs: (name, fused, eager baseline, float64 oracle). Fused error ≤ 2 × eager error + floor."""
    for name, got, base, ref in pairs:
        e_fused, e_eager = abs_err(got, ref), abs_err(base, ref)
        # Floor: fp32 noise, or half an ulp of the output dtype (gradients are returned in fp16/bf16,
        # so one rounding of the result is irreducible even when the eager error happens to be 0).
        out_eps = torch.finfo(got.dtype).eps / 2 if got.dtype in (torch.float16, torch.bfloat16) else 0.0
        floor = max(LOWP_FLOOR, out_eps) * ref.abs().max().item()
        assert e_fused <= LOWP_FACTOR * e_eager + floor, (
            f"{what} {name}: fused error {e_fused:.3g} > 2 x eager {e_eager:.3g} (+{floor:.2g})")


def assert_rounded_fp32_parity(rows, grads, ref_rows, ref_grads, dtype):
    """fp32 math on fp16/bf16-rounded inputs (the SIMT products): the loss as fp32, the
    gradients only rounded on output."""
    assert rel(rows[0] - rows[1], ref_rows[0] - ref_rows[1]) <= FUSED_FP32_ROWS_REL
    eps = torch.finfo(dtype).eps
    assert rel(grads[0], ref_grads[0]) <= ROUNDED_GRADS_EPS * eps
    assert rel(grads[1], ref_grads[1]) <= ROUNDED_GRADS_EPS * eps
