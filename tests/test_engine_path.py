"""The chunked engine's two paths and the policy that picks one (docs/cpu_engine.md, "Two paths").

* the policy: MAGLOSS_PATH / MAGLOSS_SPEED_BUDGET / ``chunked.use_path``, the default budget
  (the weight's own size: B ≤ D for a float32 weight), malformed values named;
* the losses go through the op the policy picks (``margin_ce_kept`` or ``margin_ce``), every
  named loss gives the flat path's loss and gradients on the speed path;
* the speed path does what it promises: 1 product per chunk in the forward and 2 in the
  backward (the flat path 1 + 3), and its only B×C-sized intermediate is the kept matrix;
* the kept products are read, never written: a retained graph's second backward is the same;
  a backward at another chunk width than the forward's; a bad ``kept`` named;
* the ops: torch.library.opcheck of margin_ce_kept / margin_ce_backward_kept (features too),
  torch.compile(fullgraph=True) on each path: tests/test_chunked.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import magloss
import magloss.functional as MF
from cases import FAMILIES, feature_case, lam_tensor, make_case
from magloss import chunked, ops, reference
from magloss.margins import MarginSpec

TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _no_path_env(monkeypatch):
    monkeypatch.delenv("MAGLOSS_PATH", raising=False)
    monkeypatch.delenv("MAGLOSS_SPEED_BUDGET", raising=False)
    monkeypatch.delenv("MAGLOSS_CHUNK", raising=False)


# ---- the policy ------------------------------------------------------------------------------------------
# (B, C, D, x dtype, w dtype, budget env, expected): the default budget is W's bytes, so B·C·4 <= C·D·4
# is B <= D for float32; a float32 weight with bf16 embeddings (autocast) keeps float32 products
# (B·C·4 <= C·D·4); a bf16 pair keeps float32 too, against a weight of half the bytes (B <= D/2).
POLICY = [
    (64, 1000, 64, torch.float32, torch.float32, None, "speed"),      # B = D: equal sizes fit
    (65, 1000, 64, torch.float32, torch.float32, None, "flat"),
    (64, 1000, 64, torch.float64, torch.float64, None, "speed"),
    (64, 1000, 64, torch.bfloat16, torch.float32, None, "speed"),
    (33, 1000, 64, torch.bfloat16, torch.bfloat16, None, "flat"),      # 33·4 > 64·2
    (32, 1000, 64, torch.bfloat16, torch.bfloat16, None, "speed"),
    (65, 1000, 64, torch.float32, torch.float32, str(65 * 1000 * 4), "speed"),   # an explicit byte budget
    (65, 1000, 64, torch.float32, torch.float32, str(65 * 1000 * 4 - 1), "flat"),
    (1, 10, 64, torch.float32, torch.float32, "0", "flat"),
]


@pytest.mark.parametrize("B,C,D,xd,wd,budget,want", POLICY)
def test_auto_takes_the_speed_path_when_the_kept_products_fit(monkeypatch, B, C, D, xd, wd, budget, want):
    if budget is not None:
        monkeypatch.setenv("MAGLOSS_SPEED_BUDGET", budget)
    x, w = torch.empty(B, D, dtype=xd), torch.empty(C, D, dtype=wd)
    assert chunked.kept_bytes(B, C, reference.compute_dtype(xd)) == B * C * (8 if xd == torch.float64 else 4)
    assert chunked.select_path(x, w) == want
    monkeypatch.setenv("MAGLOSS_PATH", "auto")
    assert chunked.select_path(x, w) == want


def test_forced_paths_and_the_context_manager_override_the_environment(monkeypatch):
    x, w = torch.empty(4096, 8), torch.empty(10, 8)     # 4096·10·4 bytes > W's 320: auto says flat
    assert chunked.select_path(x, w) == "flat"
    monkeypatch.setenv("MAGLOSS_PATH", "speed")
    assert chunked.select_path(x, w) == "speed"
    with chunked.use_path("flat"):
        assert chunked.select_path(x, w) == "flat"
        with chunked.use_path("auto", budget=4096 * 10 * 4):
            assert chunked.select_path(x, w) == "speed"
        assert chunked.select_path(x, w) == "flat"
    assert chunked.select_path(x, w) == "speed"
    monkeypatch.setenv("MAGLOSS_PATH", "flat")
    assert chunked.select_path(x[:1], w) == "flat"


@pytest.mark.parametrize("var,value,needle", [
    ("MAGLOSS_PATH", "fast", r"MAGLOSS_PATH: expected 'auto' \(default\), 'speed' or 'flat', got 'fast'"),
    ("MAGLOSS_SPEED_BUDGET", "-1", r"MAGLOSS_SPEED_BUDGET: expected an integer >= 0 \(bytes\)"),
    ("MAGLOSS_SPEED_BUDGET", "2GiB", r"MAGLOSS_SPEED_BUDGET: expected an integer >= 0 \(bytes\), got '2GiB'"),
])
def test_malformed_environment_is_named(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    x, w, y, _ = make_case(3, 5, 4)
    with pytest.raises(ValueError, match=needle):
        MF.arcface_loss(x, w, y)


@pytest.mark.parametrize("kwargs,needle", [(dict(path="fast"), "path: expected one of"),
                                           (dict(budget=-5), "budget: expected an integer >= 0"),
                                           (dict(budget=1.5), "budget: expected an integer >= 0"),
                                           (dict(budget=True), "budget: expected an integer >= 0")])
def test_use_path_checks_its_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        chunked.use_path(**kwargs)
    assert chunked._override is None


# ---- the losses go through the op the policy picks -------------------------------------------------------
class _Ops(TorchDispatchMode):
    """Counts the custom ops and matrix products that run (the ops' kernels run inside)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


def _products(calls):
    return sum(c in ("aten::mm", "aten::mm.out", "aten::addmm_", "aten::addmm", "aten::addmm.out") for c in calls)


@pytest.mark.parametrize("path", ["speed", "flat"])
def test_the_losses_call_the_op_of_their_path(monkeypatch, path):
    monkeypatch.setenv("MAGLOSS_PATH", path)
    x, w, y, _ = make_case(6, 40, 8, seed=1, ignored=(2,))
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    with _Ops() as fwd:
        loss = MF.arcface_loss(x, w, y)
    with _Ops() as bwd:
        loss.backward()
    kept = path == "speed"
    assert ("magloss::margin_ce_kept" in fwd.calls) == kept and ("magloss::margin_ce" in fwd.calls) != kept
    assert ("magloss::margin_ce_backward_kept" in bwd.calls) == kept
    assert ("magloss::margin_ce_backward" in bwd.calls) != kept


@pytest.mark.parametrize("path", ["speed", "flat"])
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("case", ["arcface", "subcenter_adaface_curricular"])
def test_three_products_on_the_speed_path_four_on_the_flat(path, chunks, case):
    """Forward: one product per chunk on both paths. Backward: two per chunk on the speed path
    (U·W, Uᵀ·x̂), three on the flat one (the forward's product again)."""
    C = 40
    if case in FAMILIES:
        spec, _ = FAMILIES[case]
        x, w, y, _ = make_case(6, C, 8, seed=1, ignored=(2,))
        lam, extras = None, ()
    else:
        x, w, y, spec, lam, *extras = feature_case(case, 6, C, 8, seed=1, ignored=(2,))
    K = spec.subcenters
    grads = list(torch.randn(4, 6, dtype=x.dtype))
    keep = path == "speed"
    with _Ops() as fwd:
        out = chunked.margin_ce_forward(x, w, y, spec, -1, lam, *extras, chunk=C * K // chunks, keep=keep)
    kept = dict(kept=out[4], kept_norms=out[5]) if keep else {}
    with _Ops() as bwd:
        chunked.margin_ce_backward(*grads, x, w, y, out[0], spec, -1, lam, *extras, chunk=C * K // chunks, **kept)
    assert _products(fwd.calls) == chunks
    assert _products(bwd.calls) == (2 if keep else 3) * chunks


LOSSES = [("arcface_loss", {}), ("cosface_loss", {}), ("magface_loss", {}), ("sphereface_loss", {}),
          ("normface_loss", {}), ("magcosface_loss", {}), ("combined_margin_loss", dict(m1=0.9, m2=0.4, m3=0.15)),
          ("subcenter_arcface_loss", dict(subcenters=3)), ("adaface_loss", dict(batch_mean=40.0, batch_std=10.0)),
          ("curricular_face_loss", dict(t=0.3)), ("elastic_arcface_loss", dict(generator=None)),
          ("elastic_cosface_loss", dict(generator=None))]


@pytest.mark.parametrize("name,kwargs", LOSSES)
def test_every_loss_same_on_both_paths(monkeypatch, name, kwargs):
    """Each named loss: loss and both gradients on the speed path equal the flat path's (float64,
    several chunks, an ignored row). The flat path itself is tested against the reference in
    tests/test_chunked.py and tests/test_every_loss.py."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "5")
    fn = getattr(MF, name)
    K = kwargs.get("subcenters", 1)
    x, w, y, _ = make_case(7, 23, 6, seed=3, ignored=(4,))
    w = torch.cat([w] * K, dim=1).reshape(23 * K, 6) + 0.01 * torch.randn(23 * K, 6, dtype=w.dtype) if K > 1 else w
    kw = {k: v for k, v in kwargs.items() if k != "generator"}
    out = {}
    for path in ("flat", "speed"):
        monkeypatch.setenv("MAGLOSS_PATH", path)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        if "generator" in kwargs:
            kw["generator"] = torch.Generator().manual_seed(0)
        with _Ops() as rec:
            loss = fn(xs, ws, y, **kw)
        loss.backward()
        assert ("magloss::margin_ce_kept" in rec.calls) == (path == "speed")
        out[path] = (loss.detach(), xs.grad, ws.grad)
    for a, b in zip(out["flat"], out["speed"]):
        torch.testing.assert_close(b, a, **TIGHT)


def test_auto_on_a_shard_compares_the_gathered_batch_with_the_shard():
    """The class-sharded head passes its gathered batch and its shard to the same op: with the
    default budget, a global batch larger than D takes the flat path (flat memory, what a sharded
    head is for) and one at most D the speed path, whatever the shard's size."""
    for shard in (10, 100_000):
        w = torch.empty(shard, 512)
        assert chunked.select_path(torch.empty(4096, 512), w) == "flat"
        assert chunked.select_path(torch.empty(512, 512), w) == "speed"


# ---- the kept products ------------------------------------------------------------------------------------
class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.shapes.append(tuple(t.shape))
        return out


def test_the_only_large_intermediate_is_the_kept_matrix():
    """Forward + backward on the speed path: besides ∂W [C, D] and the kept [B, C], every 2-D
    intermediate is at most max(B·N, N·D, B·D) elements (as the flat path's)."""
    B, C, D, N = 16, 3000, 64, 80
    spec, _ = FAMILIES["magface"]
    x, w, y, grads = make_case(B, C, D, seed=10, ignored=(3,))
    x, w = x.float(), w.float()
    with _Largest() as rec:
        out = chunked.margin_ce_forward(x, w, y, spec, -1, None, chunk=N, keep=True)
        chunked.margin_ce_backward(*[g.float() for g in grads], x, w, y, out[0], spec, -1, None, chunk=N,
                                   kept=out[4], kept_norms=out[5])
    big = [s for s in rec.shapes if s[0] * s[1] > max(B * N, N * D, B * D)]
    assert set(big) <= {(C, D), (B, C)} and (B, C) in big, set(big)


@pytest.mark.parametrize("name", ["plain", "subcenter_adaface_curricular"])
def test_backward_at_another_chunk_width_and_retained_graph(name, monkeypatch):
    """The kept matrix is [B, K·C] whatever the forward's chunks: a backward at another width gives
    the reference's gradients; backpropagating twice through a retained graph gives them twice
    (the kept products are read, never written)."""
    if name == "plain":
        spec, lam = FAMILIES["sphereface"]
        x, w, y, grads = make_case(9, 31, 8, seed=4, ignored=(1,))
        lam, extras = lam_tensor(lam), ()
    else:
        x, w, y, spec, lam, *extras = feature_case(name, 9, 31, 8, seed=4, ignored=(1,))
        grads = list(torch.randn(4, 9, dtype=torch.float64))
    out = chunked.margin_ce_forward(x, w, y, spec, -1, lam, *extras, chunk=6, keep=True)
    kept = [t.clone() for t in out[4:]]
    want = reference.margin_ce_backward(*grads, x, w, y, out[0], spec, -1, lam, *extras)
    for chunk in (7, 6):
        got = chunked.margin_ce_backward(*grads, x, w, y, out[0], spec, -1, lam, *extras, chunk=chunk,
                                         kept=out[4], kept_norms=out[5])
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, **TIGHT)
    assert torch.equal(out[4], kept[0]) and torch.equal(out[5], kept[1])
    monkeypatch.setenv("MAGLOSS_PATH", "speed")
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = MF.arcface_loss(xs, ws, torch.where(y < 31, y, torch.zeros_like(y)))
    g1 = torch.autograd.grad(loss, (xs, ws), retain_graph=True)
    g2 = torch.autograd.grad(loss, (xs, ws))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["shape", "dtype", "norms"])
def test_a_bad_kept_is_named(bad):
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(4, 9, 8, seed=2)
    out = chunked.margin_ce_forward(x, w, y, spec, keep=True)
    kept, norms = out[4], out[5]
    if bad == "shape":
        kept = kept[:, :8]
    elif bad == "dtype":
        kept = kept.float()
    else:
        norms = None
    with pytest.raises(ValueError, match="kept"):
        chunked.margin_ce_backward(*grads, x, w, y, out[0], spec, kept=kept, kept_norms=norms)


# ---- the ops -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["arcface", "magface", "sphereface", "subcenter_adaface_curricular"])
def test_opcheck_kept_ops(monkeypatch, case):
    monkeypatch.setenv("MAGLOSS_CHUNK", "4")
    if case in FAMILIES:
        spec, lam = FAMILIES[case]
        x, w, y, _ = make_case(5, 8, 6, seed=8, ignored=(1,), norm_range=(1.0, 3.0))
        x, w, lam, extras = x.float(), w.float(), lam_tensor(lam), (None, None, None)
    else:
        x, w, y, spec, lam, *extras = feature_case(case, 5, 6, 6, seed=8, dtype=torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), y, lam, *extras, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce_kept.default, args)
    with torch.no_grad():
        lse, _, _, norms, kept, kept_norms = torch.ops.magloss.margin_ce_kept(*args)[:6]
    grads = list(torch.randn(4, 5))
    bargs = (*grads, x.detach(), w.detach(), y, lse, norms, kept, kept_norms, lam, *extras, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce_backward_kept.default, bargs)


def test_fused_device_follows_the_policy(monkeypatch):
    """Where a fused engine is registered and enabled for the device (here: a stand-in entry for
    "cpu"), the losses take the pair the policy picks, as on every other engine: the fused engine
    implements both (float32 and float64 alike)."""
    monkeypatch.setitem(magloss._ext._ENGINES, "cpu", object())
    x, w, y, _ = make_case(4, 9, 8, seed=2)
    calls = []
    monkeypatch.setattr(ops, "margin_ce", lambda *a: calls.append("flat") or (x[:, 0],) * 4)
    monkeypatch.setattr(ops, "margin_ce_kept", lambda *a: calls.append("speed") or (x[:, 0],) * 6)
    spec = MarginSpec.combined(64.0, 1.0, 0.5, 0.0)
    for path in ("speed", "flat"):
        monkeypatch.setenv("MAGLOSS_PATH", path)
        ops.margin_ce_rows(x.float(), w.float(), y, None, None, None, None, *spec.op_args(-1))
        ops.margin_ce_rows(x, w, y, None, None, None, None, *spec.op_args(-1))
    assert calls == ["speed", "speed", "flat", "flat"]


# ---- on a GPU (tests/gpu_check.sh runs the gpu-marked tests; the mark is set only where a GPU is visible) ----
@(pytest.mark.gpu if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device"))
@pytest.mark.parametrize("case", ["arcface", "sphereface", "subcenter_adaface_curricular"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_engine_both_paths_on_cuda(case, dtype):
    """The chunked engine on CUDA tensors (what CUDA runs without the extension, and for float64
    with it), speed and flat paths, several chunks, against the float64 reference on the CPU;
    with the extension the fused engine runs both paths for float32 (tests/test_cuda_parity_speed.py)."""
    if case in FAMILIES:
        spec, lam = FAMILIES[case]
        x, w, y, grads = make_case(37, 301, 24, seed=5, ignored=(3, 30))
        lam, extras = lam_tensor(lam), ()
    else:
        x, w, y, spec, lam, *extras = feature_case(case, 37, 101, 24, seed=5, ignored=(3, 30))
        grads = list(torch.randn(4, 37, dtype=torch.float64))
    want_rows = reference.margin_ce_forward(x, w, y, spec, -1, lam, *extras)
    want = (*want_rows, *reference.margin_ce_backward(*grads, x, w, y, want_rows[0], spec, -1, lam, *extras))
    dev = [None if t is None else t.to("cuda", dtype) for t in (x, w, lam, *extras)]
    xd, wd, lamd, extd = dev[0], dev[1], dev[2], dev[3:]
    gd = [g.to("cuda", dtype) for g in grads]
    yd = y.cuda()
    tol = TIGHT if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for keep in (True, False):
        out = chunked.margin_ce_forward(xd, wd, yd, spec, -1, lamd, *extd, chunk=40, keep=keep)
        kept = dict(kept=out[4], kept_norms=out[5]) if keep else {}
        g = chunked.margin_ce_backward(*gd, xd, wd, yd, out[0], spec, -1, lamd, *extd, chunk=40, **kept)
        for got, ref in zip((*out[:4], *g), want):
            scale = ref.abs().max().clamp_min(1.0)
            torch.testing.assert_close((got.double().cpu() / scale), ref / scale, **tol)


def test_backward_makes_no_gradient_of_the_kept_matrix():
    """``kept`` gets no gradient: the speed path's backward creates no B×C tensor (autograd would
    otherwise fill a zero gradient of the kept matrix's size at every step), and a loss that
    uses only some row statistics (the others' gradients absent) gets the flat path's gradients."""
    B, C = 6, 50
    x, w, y, _ = make_case(B, C, 8, seed=6, ignored=(1,))
    spec, _ = FAMILIES["magface"]
    out = {}
    for path in ("speed", "flat"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with chunked.use_path(path):
            lse, zy, reg, norms = ops.margin_ce_rows(xs, ws, y, None, None, None, None, *spec.op_args(-1))
        with _Largest() as rec:
            out[path] = torch.autograd.grad((lse - 2.0 * zy).sum(), (xs, ws))
        if path == "speed":
            assert (B, C) not in rec.shapes, rec.shapes
    for a, b in zip(out["speed"], out["flat"]):
        torch.testing.assert_close(a, b, **TIGHT)
