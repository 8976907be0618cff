"""Small fused forward+backward cases for compute-sanitizer (memcheck, racecheck).

Run by tests/gpu_check.sh as
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/sanitizer_cases.py
(without the caching allocator every buffer is its own cudaMalloc, so an out-of-bounds access
is caught instead of landing in a neighbouring block of the pool).

The cases cover every kernel and launcher branch: irregular B, C, D (not multiples of the warp
or block size), several class chunks with a partial last one (MAGLOSS_CHUNK), C = 1, ignored rows,
int32 labels, every margin family, fp32/fp16/bf16, the forced SIMT path, sub-centers with per-row
margins and the curricular modulation, both engine paths (path="flat": margin_ce/margin_ce_backward;
path="speed": margin_ce_kept/margin_ce_backward_kept, the kept-products kernels), the side outputs
(side=True: the arg-max kernels), the one-vs-all kernels (path="ova": one_vs_all/one_vs_all_backward,
each loss kind, with and without the bias, with and without the side outputs), an out-of-range label
with the input check off (must stay in bounds), asynchronous (must be reported by
magloss.flush_input_checks) and synchronous (must raise in the call). Each case prints one
line, "sanitizer case i/N passed: ..." or "... FAILED: ..."; the exit status is non-zero if a
case fails its own sanity check, and 2 if none could run (no GPU or no extension). The caller
parses the sanitizer's error summary and compares the passed lines with ``len(CASES)``.

The cases take the device from a backend object (tests/_backend.py): the GPU here, the CPU
emulator in tests/test_engine_emulated.py, which runs every case there so that this file's code
and each case's own sanity check are proven without a GPU.
"""

from __future__ import annotations

import os
import sys

import torch

import magloss  # registers the ops
from magloss import _ext
from magloss import onevsall as OVA

import _backend
from cases import family

OP = torch.ops.magloss.margin_ce
OP_BWD = torch.ops.magloss.margin_ce_backward


# The one-vs-all kinds (path="ova"): name -> (kind, params for C classes). Upstream defaults; SphereFace2
# with the angular margin type (its acos/clamp branch).
OVA_KINDS = {
    "sface": lambda C: (OVA.SFACE, OVA.sface_params(64.0, 80.0, 0.8, 1.23)),
    "uniface": lambda C: (OVA.UNIFACE, OVA.uniface_params(64.0, 0.4, 1.0)),
    "sphereface2": lambda C: (OVA.SPHEREFACE2, OVA.sphereface2_params(40.0, 0.4, 3.0, 0.7, 50.0, "A")),
    "p2sgrad": lambda C: (OVA.P2SGRAD, (1.0 / C,)),
}


def run_case(name, B, C, D, dtype=torch.float32, chunk=None, ignored=(), label_dtype=torch.int64, simt=False,
             bad_label=False, check="async", w_dtype=None, K=1, features=False, path="flat", side=False,
             backend=None):
    """One fused forward+backward on ``backend`` (tests/_backend.py; default: the GPU) with its own
    sanity checks; returns "ok" or "raised as expected". features: the curricular modulation, plus
    per-row margins for the COMBINED family; K sub-centers. path: "flat" (the margin_ce ops), "speed"
    (the engine's margin_ce_kept / margin_ce_backward_kept) or "ova" (the engine's one_vs_all /
    one_vs_all_backward; name is then a key of OVA_KINDS, and K, features do not apply). side:
    the forward also returns the side outputs (checked: [B], classes in [0, C) off the bad rows)."""
    backend = backend or _backend.Gpu(_ext._C)
    env = {"MAGLOSS_CHUNK": str(chunk) if chunk else None, "MAGLOSS_FORCE_SIMT": "1" if simt else None,
           "MAGLOSS_CHECK_INPUTS": check}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        if path == "ova":
            return _run_ova(name, B, C, D, dtype, ignored, bad_label, w_dtype, backend, side)
        spec, lam = family(name)             # tests/cases.py: a FAMILIES row or a registered loss
        spec = spec.with_subcenters(K) if K > 1 else spec
        dev = backend.device
        g = torch.Generator(device=dev).manual_seed(B * 7919 + C)
        x = (torch.randn(B, D, device=dev, generator=g) * 30).to(dtype)
        w = torch.randn(K * C, D, device=dev, generator=g).to(w_dtype or dtype)   # fp32 W + half x: autocast pair
        y = torch.randint(0, C, (B,), device=dev, generator=g)
        for i in ignored:
            y[i] = -1
        if bad_label:
            y[B // 2] = C + 3
        y = y.to(label_dtype)
        lam_t = None if lam is None else torch.tensor(lam, device=dev)
        extras = (None, None, None)
        if features:
            z = torch.rand(B, device=dev, generator=g) * 2 - 1
            rm = torch.stack([-0.4 * z, 0.4 * z + 0.4], 1) if spec.kind == 0 else None
            extras = (rm, torch.rand(B, device=dev, generator=g) - 0.5, torch.tensor(0.2, device=dev))
        # the speed path calls the engine's functions directly: on the GPU the same kernels the ops
        # dispatch to, on the emulator independent of which ops are routed to it
        fwd = backend.engine.margin_ce_kept if path == "speed" else OP
        try:
            outs = fwd(x, w, y, lam_t, *extras, *spec.op_args(-1), side)
        except ValueError as exc:
            if bad_label and check == "sync" and "labels:" in str(exc):
                return "raised as expected"
            raise
        if bad_label and check == "sync":
            raise AssertionError("an out-of-range label did not raise")
        if bad_label and check == "async":
            backend.synchronize()
            try:
                magloss.flush_input_checks()
            except ValueError as exc:
                if "labels:" not in str(exc) or "reported late" not in str(exc):
                    raise
            else:
                raise AssertionError("an out-of-range label was not reported by flush_input_checks")
        lse, norms = outs[0], outs[3]
        grads = [torch.randn(B, device=dev, generator=g) for _ in range(4)]
        if path == "speed":
            kept = outs[4:6]
            gx, gw = backend.engine.margin_ce_backward_kept(*grads, x, w, y, lse, norms, *kept, lam_t, *extras,
                                                            *spec.op_args(-1))
        else:
            gx, gw = OP_BWD(*grads, x, w, y, lse, norms, lam_t, *extras, *spec.op_args(-1))
        backend.synchronize()
        if side:
            _check_side(outs[-3:], B, C, bad_label)
        finite = torch.isfinite(lse)
        if bad_label:
            assert not bool(finite[B // 2]), "bad-label row should have lse = NaN"
            finite[B // 2] = True
        assert bool(finite.all()), "non-finite lse"
        assert gx.shape == x.shape and gw.shape == w.shape and gx.dtype == dtype and gw.dtype == w.dtype
        return "ok"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


CASES = [
    dict(name="arcface", B=5, C=37, D=33, chunk=16, ignored=(1,)),
    dict(name="arcface", B=1, C=1, D=64),
    dict(name="combined", B=33, C=300, D=100, chunk=128, label_dtype=torch.int32),
    dict(name="sphereface", B=9, C=70, D=65, chunk=32, ignored=(0, 8)),
    dict(name="magface", B=40, C=257, D=31, dtype=torch.bfloat16, chunk=100),
    dict(name="magcosface", B=17, C=129, D=96, dtype=torch.float16, chunk=64),
    dict(name="arcface", B=12, C=90, D=40, dtype=torch.bfloat16, simt=True, chunk=50),
    dict(name="magface", B=12, C=90, D=40, simt=True),
    dict(name="magface", B=40, C=257, D=31, dtype=torch.bfloat16, w_dtype=torch.float32, chunk=100),
    dict(name="sphereface", B=12, C=90, D=40, dtype=torch.float16, w_dtype=torch.float32, simt=True, chunk=50),
    dict(name="arcface", B=10, C=50, D=20, bad_label=True, check="off", chunk=16),
    dict(name="arcface", B=10, C=50, D=20, bad_label=True, check="async", chunk=16),
    dict(name="arcface", B=10, C=50, D=20, bad_label=True, check="sync"),
    # the engine's general features: sub-centers (whole-class chunks, ragged), per-row margins, curricular
    dict(name="adaface", B=9, C=70, D=33, K=3, chunk=32, features=True, ignored=(2,)),
    dict(name="arcface", B=12, C=41, D=40, K=2, dtype=torch.bfloat16, w_dtype=torch.float32, chunk=16, features=True),
    dict(name="sphereface", B=7, C=50, D=65, K=3, dtype=torch.float16, simt=True, chunk=20, features=True),
    dict(name="adaface", B=10, C=50, D=20, K=3, bad_label=True, check="off", chunk=16, features=True),
    # the speed path (kept products), with and without sub-centers, half products, SIMT
    dict(name="arcface", B=5, C=37, D=33, chunk=16, ignored=(1,), path="speed"),
    dict(name="magface", B=40, C=257, D=31, dtype=torch.bfloat16, chunk=100, path="speed"),
    dict(name="adaface", B=9, C=70, D=33, K=3, chunk=32, features=True, path="speed", side=True),
    dict(name="sphereface", B=12, C=90, D=40, dtype=torch.float16, w_dtype=torch.float32, simt=True, chunk=50,
         path="speed"),
    # the side outputs (block arg-max, merged across chunks) on the flat path
    dict(name="cosface", B=33, C=300, D=100, chunk=128, ignored=(4,), side=True),
    dict(name="arcface", B=12, C=41, D=40, K=2, dtype=torch.bfloat16, chunk=16, side=True),
    dict(name="arcface", B=10, C=50, D=20, bad_label=True, check="off", chunk=16, side=True),
    # the one-vs-all kernels: every kind, bias sum (UniFace, SphereFace2), half T, SIMT, a bad label
    dict(name="uniface", B=9, C=70, D=33, chunk=32, ignored=(2,), path="ova", side=True),
    dict(name="sphereface2", B=17, C=129, D=40, dtype=torch.bfloat16, chunk=64, path="ova"),
    dict(name="sface", B=12, C=41, D=20, dtype=torch.float16, w_dtype=torch.float32, simt=True, chunk=16,
         path="ova"),
    dict(name="p2sgrad", B=10, C=50, D=20, bad_label=True, check="off", chunk=16, path="ova", side=True),
]


def _check_side(side, B, C, bad_label):
    """The forward's side outputs (label_cosine, nearest_negative_cosine, nearest_negative_class):
    [B] each, the classes in [0, C) off the bad-label row (row B // 2)."""
    label_cos, nn_cos, nn_cls = side
    assert label_cos.shape == nn_cos.shape == nn_cls.shape == (B,), "side outputs: expected [B] each"
    good = torch.ones(B, dtype=torch.bool, device=nn_cls.device)
    if bad_label:
        good[B // 2] = False
    assert bool(((nn_cls[good] >= 0) & (nn_cls[good] < C)).all()), "nearest negative class out of range"


def _run_ova(name, B, C, D, dtype, ignored, bad_label, w_dtype, backend, side=False):
    """run_case's one-vs-all forward+backward (the environment already set): the row losses finite
    (NaN on the bad-label row), the gradients of their inputs' shapes and dtypes, the side outputs
    as the margin forward's."""
    kind, params = OVA_KINDS[name](C)
    dev = backend.device
    g = torch.Generator(device=dev).manual_seed(B * 7919 + C + 1)
    x = (torch.randn(B, D, device=dev, generator=g) * 30).to(dtype)
    w = torch.randn(C, D, device=dev, generator=g).to(w_dtype or dtype)
    y = torch.randint(0, C, (B,), device=dev, generator=g)
    for i in ignored:
        y[i] = -1
    if bad_label:
        y[B // 2] = C + 3
    bias = torch.full((1,), -2.0, device=dev) if kind in (OVA.UNIFACE, OVA.SPHEREFACE2) else None
    rows, *side_outs = backend.engine.one_vs_all(x, w, y, bias, kind, list(params), -1, side)
    gx, gw, gb = backend.engine.one_vs_all_backward(torch.randn(B, device=dev, generator=g), x, w, y, bias, kind,
                                                    list(params), -1)
    backend.synchronize()
    if side:
        _check_side(side_outs, B, C, bad_label)
    finite = torch.isfinite(rows)
    if bad_label:
        assert not bool(finite[B // 2]), "bad-label row should have a NaN loss"
        finite[B // 2] = True
    assert rows.shape == (B,) and bool(finite.all()), "non-finite row loss"
    assert gx.shape == x.shape and gw.shape == w.shape and gx.dtype == dtype and gw.dtype == w.dtype
    assert gb.shape == (1,) and bool(torch.isfinite(gb).all()), "grad_bias: expected one finite value"
    return "ok"


def main(backend=None) -> int:
    """Run every case on ``backend`` (default: the GPU), one line each; exit 0 only if all of them
    ran and passed.

    The GPU check compares the number of "sanitizer case i/N passed" lines with ``len(CASES)``
    (read before the run), so a run whose cases did not all run is never taken for a clean one.
    Without a GPU or the compiled extension nothing runs and the exit status is 2.
    """
    if backend is None:
        status = _ext.extension_status()
        if not status["fused"]:
            print(f"sanitizer cases: cannot run ({status['reason']})")
            return 2
        backend = _backend.Gpu(_ext._C)
    failures = 0
    for i, case in enumerate(CASES, 1):
        try:
            result = f"passed: {run_case(**case, backend=backend)}"
        except Exception as exc:  # report every case, then fail
            result = f"FAILED: {type(exc).__name__}: {exc}"
            failures += 1
        print(f"sanitizer case {i}/{len(CASES)} {result}: {case}", flush=True)
    print(f"sanitizer cases: {len(CASES) - failures}/{len(CASES)} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
