"""Promises that hold for every loss, iterated over :data:`magloss.registry.LOSSES` (and each
loss's sharded twin, world size 1 on an in-process gloo group): a loss added to the registry is
covered here without anyone listing it.

* an empty batch gives 0 with zero gradients (module, sharded; ElasticFace+ too);
* ``torch.compile(fullgraph=True)`` equals eager: loss, gradients and the state update;
* ``.half()``/``.bfloat16()``/``.to(dtype)`` modules run and their running state stays float32
  (float64 in a float64 module), and keeps moving where the old low-precision buffers stalled;
* ``state_dict`` round trips continue a run exactly;
* float labels and out-of-range labels are errors naming ``labels`` (loss and accuracy), and a
  failed call changes no state; a NaN batch is the accuracy's error too (NaN out with checks off);
* constructor errors name the argument (bools must be bools, NaN hyperparameters, counts);
* what is not supported says so, naming the loss (torch.func, double backward).

Shapes are tiny: each loss compiles once.
"""

import copy
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

import magloss
from cases import LOSS_NAMES, LOSS_VARIANTS, VARIANTS, build_loss, make_inputs
from magloss import registry
from magloss.distributed import shard

D, C, B = 8, 5, 6
NAMES = LOSS_NAMES
SHARDED = [n for n in NAMES if registry.sharded(n) is not None]
ALL = LOSS_VARIANTS


def _build(name, sharded=False, **kw):
    return build_loss(name, D, C, sharded=sharded, **kw)


def _batch(dtype=torch.float32, seed=0, b=B):
    x, _, y = make_inputs(b, C, D, dtype=torch.float64, norm_range=(15.0, 60.0), ignored=(1,), seed=seed)
    return x.to(dtype), y


def _state(module):
    """Every buffer and the extra state (ElasticFace's generator), cloned."""
    out = {k: v.clone() for k, v in module.named_buffers()}
    if isinstance(module, magloss.adaptive.ElasticState):
        out["extra"] = module.get_extra_state()["generator"].clone()
    return out


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def group():
    """A world-size-1 gloo group in this process (HashStore), torn down after the module."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if own:
        dist.destroy_process_group()


def _forms(name, group):
    forms = [("module", _build(name))]
    if VARIANTS.get(name, (name,))[0] in SHARDED:
        forms.append(("sharded", _build(name, sharded=True, group=group)))
    return forms


# -- empty batch -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_empty_batch_is_zero_with_zero_gradients(name, group, one_thread):
    for form, m in _forms(name, group):
        before = _state(m)
        for reduction in ("mean", "sum", "none"):
            m.reduction = reduction
            x = torch.zeros(0, D, requires_grad=True)
            loss = m(x, torch.zeros(0, dtype=torch.long))
            assert loss.shape == ((0,) if reduction == "none" else ()), (form, reduction)
            assert loss.sum().item() == 0.0, (form, reduction)
            m.weight.grad = None
            loss.sum().backward()
            assert x.grad.shape == (0, D)
            assert m.weight.grad is None or not m.weight.grad.any(), (form, reduction)
        # an empty batch is no data: the running state does not move (SphereFace counts the step)
        after = _state(m)
        for k in ("batch_mean", "batch_std", "t"):
            if k in before:
                assert torch.equal(before[k], after[k]), (form, k)


def test_empty_batch_functional_and_subcenter_counts():
    x = torch.zeros(0, D, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    w = torch.randn(3 * C, D, requires_grad=True)
    F = magloss.functional
    for loss in (F.subcenter_arcface_loss(x, w, y, subcenters=3),
                 F.curricular_face_loss(x, w[:C], y, 0.3),
                 F.elastic_arcface_loss(x, w[:C], y, plus=True, generator=torch.Generator().manual_seed(0)),
                 F.elastic_cosface_loss(x, w[:C], y, plus=True, generator=torch.Generator().manual_seed(0))):
        w.grad = None
        assert loss.item() == 0.0
        loss.backward()
        assert not w.grad.any()
    counts = magloss.subcenter.subcenter_counts(x, w, y, 3)
    assert counts.shape == (C, 3) and counts.dtype == torch.int64 and not counts.any()


# -- torch.compile -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph_equals_eager(name, one_thread):
    torch._dynamo.reset()
    eager = _build(name)
    compiled_mod = copy.deepcopy(eager)
    x, y = _batch()
    outs = []
    for mod, run in ((eager, eager), (compiled_mod, torch.compile(compiled_mod, fullgraph=True))):
        xi = x.clone().requires_grad_()
        loss = run(xi, y)
        loss.backward()
        outs.append((loss.detach(), xi.grad, mod.weight.grad, _state(mod)))
    (l0, gx0, gw0, s0), (l1, gx1, gw1, s1) = outs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)
    assert s0.keys() == s1.keys()
    for k in s0:                           # the state update survives compilation
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-6, atol=0, msg=k)
    if s0:
        assert any(not torch.equal(v, _state(_build(name))[k]) for k, v in s0.items()) or name == "softmax"


# -- low-precision modules ---------------------------------------------------------------------------------
_STATE_NAMES = ("batch_mean", "batch_std", "t")


def _state_buffers(m):
    return {k: v for k, v in m.named_buffers() if k in _STATE_NAMES}


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to_bf16"])
@pytest.mark.parametrize("name", ALL)
def test_low_precision_modules_run_and_keep_float32_state(name, convert, group, one_thread):
    dtype = torch.bfloat16 if "bf16" in convert or convert == "bfloat16" else torch.float16
    for form, m in _forms(name, group):
        for k, v in _state_buffers(m).items():             # distinctive values, not round in any dtype
            v.fill_(0.123456789 if k == "t" else 3.14159265)
        want = {k: v.clone() for k, v in _state_buffers(m).items()}
        m = m.to(dtype) if convert == "to_bf16" else getattr(m, convert)()
        assert m.weight.dtype == dtype
        for k, v in _state_buffers(m).items():
            assert v.dtype == torch.float32 and torch.equal(v, want[k]), (form, k)   # not rounded on the way
        x, y = _batch(dtype)
        loss = m(x, y)
        assert torch.isfinite(loss) and loss.dtype == torch.float32, form
        loss.backward()
        for k, v in _state_buffers(m).items():
            assert v.dtype == torch.float32, (form, k)
        for k, v in _state_buffers(m.double()).items():     # a float64 module keeps float64 (BatchNorm-like)
            assert v.dtype == torch.float64, (form, k)
        for k, v in _state_buffers(m.float()).items():
            assert v.dtype == torch.float32, (form, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaface_statistics_keep_moving_in_low_precision(dtype):
    """After n identical batches μ_n = m + (μ_0 − m)·(1 − α)^n (m the batch's mean clipped norm),
    σ_n likewise with the batch's std: computed here in float64 from the same rounded inputs."""
    m = magloss.AdaFaceLoss(D, C).to(dtype)
    x, y = _batch(dtype, b=16)
    x = x / 10.0                       # norms ≈ 1.5..6: μ, σ far from their starting 20, 100
    n = 150
    for _ in range(n):
        m(x, y)
    a = x.double().norm(dim=1)[y != -1]
    decay = 0.99 ** n
    want_mean = a.mean() + (20.0 - a.mean()) * decay
    want_std = a.std() + (100.0 - a.std()) * decay
    assert m.batch_mean.dtype == torch.float32
    assert abs(m.batch_mean.item() - want_mean.item()) < 1e-3 * want_mean.item()
    assert abs(m.batch_std.item() - want_std.item()) < 1e-3 * want_std.item()


def test_curricular_t_keeps_moving_in_float16():
    """t_n = c̄·(1 − (1 − α)^n) for n identical batches (no optimizer step: the label cosines stay)."""
    m = magloss.CurricularFaceLoss(D, C).half()
    x, y = _batch(torch.float16, b=16)
    with torch.no_grad():            # rows close to their class: c̄ near 0.98, where fp16's step is 2^-11
        x = (m.weight[y.clamp_min(0)] * 30 + x * 0.05).half()
    n = 400
    for _ in range(n):
        m(x, y)
    xh, wh = x.double(), m.weight.double()
    valid = y != -1
    c = torch.nn.functional.cosine_similarity(xh[valid], wh[y[valid]], dim=1)
    want = c.mean() * (1 - 0.99 ** n)
    assert m.t.dtype == torch.float32
    assert abs(m.t.item() - want.item()) < 2e-4


# -- state_dict round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_the_run(name, group, one_thread):
    for form, m in _forms(name, group):
        for step in range(3):
            m(*_batch(seed=step))
        sd = copy.deepcopy(m.state_dict())
        other = _build(name, sharded=form == "sharded", **({"group": group} if form == "sharded" else {}))
        if "seed" in inspect.signature(type(other)).parameters:
            other = _build(name, sharded=form == "sharded", seed=99,
                           **({"group": group} if form == "sharded" else {}))
        other.load_state_dict(sd)
        _same_state(_state(other), _state(m))
        x, y = _batch(seed=7)
        torch.testing.assert_close(other(x, y), m(x, y), rtol=0, atol=0)
        # a low-precision module's checkpoint loads into float32 state, and back into a float32 module
        kw = {"group": group} if form == "sharded" else {}
        low = _build(name, sharded=form == "sharded", **kw).bfloat16()
        low.load_state_dict(m.state_dict())
        back = _build(name, sharded=form == "sharded", **kw)
        back.load_state_dict(low.state_dict())
        for mod in (low, back):
            for k, v in _state_buffers(mod).items():
                assert v.dtype == torch.float32 and torch.equal(v, getattr(m, k)), (form, k)


# -- labels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bad_labels_are_errors_naming_labels_and_change_nothing(name, group, one_thread):
    x, y = _batch()
    for _form, m in _forms(name, group):
        before = _state(m)
        with pytest.raises(TypeError, match=r"^labels: .*int64"):
            m(x, y.float())
        bad = y.clone()
        bad[3] = C + 94
        with pytest.raises(ValueError, match=rf"^labels: .*\[0, {C}\).*got {C + 94}"):
            m(x, bad)
        if hasattr(m, "accuracy"):
            with pytest.raises(ValueError, match=rf"^labels: .*got {C + 94}"):
                m.accuracy(x, bad)
            with pytest.raises(TypeError, match=r"^labels: "):
                m.accuracy(x, y.double())
        _same_state(_state(m), before)


def test_subcenter_helpers_refuse_float_labels():
    m = magloss.SubCenterArcFaceLoss(D, C, subcenters=3)
    x, y = _batch()
    counts = m.subcenter_counts(x, y)
    for call in (lambda: m.subcenter_counts(x, y.float()), lambda: m.far_from_class(x, y.double(), counts)):
        with pytest.raises(TypeError, match=r"^labels: .*int64"):
            call()


def test_sharded_labels_on_no_shard_are_the_range_error(group):
    """Every valid label lies in [0, C) and so on exactly one shard: a batch whose labels match
    no class on any shard is the range ValueError on every rank (with Partial FC too), never a
    silent loss (insightface#1437: float labels cast, num_classes too small)."""
    for rate in (1.0, 0.5):
        m = magloss.distributed.ShardedArcFaceLoss(D, C, sample_rate=rate, group=group)
        x, _ = _batch()
        with pytest.raises(ValueError, match=r"^labels: .*num_classes|^labels: expected class indices"):
            m(x, torch.full((B,), C, dtype=torch.long))
        assert int(m.step) == 0


@pytest.mark.parametrize("form", ["module", "functional", "sharded"])
def test_accuracy_nan_is_an_error_or_nan(form, group, monkeypatch):
    x, y = _batch()
    x[2] = math.nan
    m = magloss.ArcFaceLoss(D, C)
    if form == "sharded":
        m = shard(m, group=group)
        acc = m.accuracy(x, y)                 # the sharded accuracy has no value check: NaN out
        assert math.isnan(acc.item())
        return
    call = (lambda: m.accuracy(x, y)) if form == "module" else (lambda: magloss.functional.accuracy(x, m.weight, y))
    with pytest.raises(ValueError, match="^embeddings: .*NaN"):
        call()
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    assert math.isnan(call().item())
    y[2] = -1                                  # the NaN row ignored: a number again
    assert math.isfinite(call().item())


# -- argument errors -------------------------------------------------------------------------------------
_BOOLS = ("easy_margin", "straight_through", "plus", "bias")


def _params(cls):
    return {k: p for k, p in inspect.signature(cls).parameters.items()
            if k not in ("embedding_size", "num_classes", "kw", "kwargs")}


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_argument(name):
    cls = registry.LOSSES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = cls(np.int64(D), np.int32(C))                  # numpy integer counts are counts
    assert type(m.num_classes) is int and m.weight.shape[-1] == D
    for arg, value in (("embedding_size", 0), ("embedding_size", 8.0), ("num_classes", True), ("num_classes", -2)):
        kw = {"embedding_size": D, "num_classes": C, arg: value}
        with pytest.raises(ValueError, match=rf"^{arg}: "):
            cls(**kw)
    for arg, p in _params(cls).items():
        if arg in _BOOLS:
            with pytest.raises(TypeError, match=rf"^{arg}: expected a bool"):
                cls(D, C, **{arg: "no"})
        elif isinstance(p.default, float) or arg in ("scale", "margin"):
            with pytest.raises(ValueError, match=rf"^{arg}: "):
                cls(D, C, **{arg: math.nan})
    if "scale" in _params(cls):
        with pytest.raises(ValueError, match=r"^scale: "):
            cls(D, C, scale=1e39)
    with pytest.raises(ValueError, match=r"^reduction: "):
        cls(D, C, reduction="avg")


@pytest.mark.parametrize("name", NAMES)
def test_sharded_from_meta_prototype_and_numpy_counts(name, group):
    if name not in SHARDED:
        pytest.skip("no sharded twin")
    cls = registry.LOSSES[name]
    kw = {"seed": 1} if "seed" in inspect.signature(cls).parameters else {}
    head = shard(cls(D, C, device="meta", **kw), group=group)        # as the training command builds heads
    assert head.weight.device.type == "cpu" and head.weight.shape[-1] == D
    assert torch.isfinite(head(*_batch()))
    twin = registry.sharded(name)(np.int64(D), np.int64(C), group=group)
    assert twin.num_classes == C


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_transforms_say_so_naming_the_loss(name):
    m = _build(name).double()
    x, y = _batch(torch.float64)
    with pytest.raises(RuntimeError, match=rf"^{type(m).__name__}: torch.func transforms .* not supported"):
        torch.func.grad(lambda xx: m(xx, y))(x)
    if name == "softmax":                      # PyTorch's own kernels: second order works there
        return
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m(xg, y), xg, create_graph=True)   # first order, graph kept: supported
    with pytest.raises(RuntimeError, match=r"second-order gradients are not supported"):
        g.sum().backward()
