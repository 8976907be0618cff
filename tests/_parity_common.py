"""What the fused engine's parity suites share: the margin families, the float64 oracle, the
same-precision eager baseline and the tolerances (docs/cuda.md).

Used by tests/test_cuda_parity.py (the compiled extension on a GPU) and by
tests/test_engine_emulated.py (the same kernels under the CPU emulator, tests/emu). No device
is assumed here: tensors are created on ``device`` (CPU by default).

"rel" error = max |fused − oracle| / max |oracle| over the whole tensor.
* fp32, TF32 off: per-row loss and row statistics rel ≤ 1e-5, gradients rel ≤ 1e-4;
* TF32, fp16, bf16: error vs float64 ≤ 2 × the error of an eager same-precision baseline
  (+ a tiny floor), the baseline being the reference math with the cosine matrix computed
  by a matmul in that precision and the margin/softmax in fp32, differentiated by autograd;
* the plain-fp32 (SIMT) products on fp16/bf16 inputs: fp32 math on the rounded inputs, so the
  loss as fp32 and the gradients within 2 eps of the dtype (one rounding on output).
"""

from __future__ import annotations

import contextlib
import math

import torch

from magloss import reference
from magloss.margins import MarginSpec

# name -> (spec, sphere lambda or None)
FAMILIES = {
    "normface": (MarginSpec.combined(64.0, 1.0, 0.0, 0.0), None),
    "cosface": (MarginSpec.combined(64.0, 1.0, 0.0, 0.35), None),
    "arcface": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0), None),
    "arcface_easy": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0, easy_margin=True), None),
    "arcface_st": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0, straight_through=True), None),
    "combined": (MarginSpec.combined(64.0, 0.9, 0.4, 0.15), None),
    "combined_m1_gt1": (MarginSpec.combined(32.0, 1.35, 0.0, 0.0), None),
    "sphereface": (MarginSpec.sphere(4), 5.0),             # logits scaled by ||x_i||
    "sphereface_s": (MarginSpec.sphere(3, scale=30.0), 0.0),
    "magface": (MarginSpec.magface(), None),
    "magface_threshold": (MarginSpec.magface(easy_margin=False), None),
    "magcos": (MarginSpec.magcos(), None),
}
ALL = list(FAMILIES)
PRECISION_DTYPES = {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def abs_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


def make_case(B, C, D, *, seed=0, ignored=(), ignore_index=-1, norm_range=(5.0, 120.0), label_dtype=torch.int64,
              device="cpu"):
    """float64 inputs: magnitudes in norm_range (both sides of MagFace's [10, 110]),
    weight rows of varied norm, half the rows pulled towards their class centre (so the label
    cosine covers the margin branch, not only c ≈ 0), some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    pull = (torch.rand(B, generator=g) < 0.5).double() * (0.3 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64))
    x = x + pull.unsqueeze(1) * w[y] / w[y].norm(dim=1, keepdim=True)
    lo, hi = norm_range
    mags = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * mags.unsqueeze(1)
    for i in ignored:
        if i < B:
            y[i] = ignore_index
    grads = [torch.randn(B, generator=g, dtype=torch.float64) for _ in range(4)]
    return x.to(device), w.to(device), y.to(label_dtype).to(device), [t.to(device) for t in grads]


def lam_tensor(lam, device="cpu"):
    return None if lam is None else torch.tensor(float(lam), device=device)


def oracle(x, w, y, spec, ii, lam, grads):
    """float64 reference statistics and gradients."""
    lam64 = None if lam is None else lam.double()
    x64, w64 = x.double(), w.double()
    lse, zy, reg, norms = reference.margin_ce_rows(x64, w64, y, spec, ii, lam64)
    gx, gw = reference.margin_ce_backward(*grads, x64, w64, y, lse, spec, ii, lam64)
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
    lse, zy, reg, norms = rows
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
        assert e <= 1e-5, f"{what} {k}: rel error {e:.3g} > 1e-5 ({errs})"
    for name, g, r in (("grad_embeddings", grads[0], ref_grads[0]), ("grad_weight", grads[1], ref_grads[1])):
        e = rel(g, r)
        assert e <= 1e-4, f"{what} {name}: rel error {e:.3g} > 1e-4"


def eager_lowp(x, w, y, spec, ii, lam, grads, precision):
    """Eager baseline in `precision` ('tf32', 'fp16', 'bf16'): the reference math with the cosine
    matrix from a matmul in that precision, margin/softmax in fp32; gradients by autograd."""
    dt = PRECISION_DTYPES[precision]
    xd = x.to(dt).detach().requires_grad_()
    wd = w.to(dt).detach().requires_grad_()
    with tf32(precision == "tf32"):
        rows = reference.margin_ce_rows(xd, wd, y, spec, ii, lam, product_dtype=dt)
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
        floor = max(1e-5, out_eps) * ref.abs().max().item()
        assert e_fused <= 2 * e_eager + floor, (
            f"{what} {name}: fused error {e_fused:.3g} > 2 x eager {e_eager:.3g} (+{floor:.2g})")


def assert_rounded_fp32_parity(rows, grads, ref_rows, ref_grads, dtype):
    """fp32 math on fp16/bf16-rounded inputs (the SIMT products): the loss as fp32, the
    gradients only rounded on output."""
    assert rel(rows[0] - rows[1], ref_rows[0] - ref_rows[1]) <= 1e-5
    eps = torch.finfo(dtype).eps
    assert rel(grads[0], ref_grads[0]) <= 2 * eps
    assert rel(grads[1], ref_grads[1]) <= 2 * eps
