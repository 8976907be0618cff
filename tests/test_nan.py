"""NaN in, NaN out on the CPU paths: the margin functions, the reference engine (row statistics and
gradients), the functional losses and the modules with the input check on and off, and the
class-sharded head at world sizes 1 and 2.

The rule (docs/cuda.md, "NaN in, NaN out"):
* a NaN in embedding row i gives row i a NaN lse, zy, norm (and reg for the MagFace families), so a
  NaN loss; its gradient row is NaN and so is all of ∂W (every class column sees x̂_i);
* a NaN in class row j of the weight gives every row a NaN lse (every row's softmax sees column
  j), a NaN zy on the rows labelled j, and NaN gradients everywhere;
* an ignored row adds nothing to the loss, so a NaN there leaves the reduced loss finite and its
  own 'none' entry 0, but its lse is NaN (never −inf) and, as with F.linear + F.cross_entropy, the
  NaN reaches ∂W and its own ∂x through the products (0·NaN = NaN);
* every other row keeps the value it has with the NaN replaced by a number (rows are independent).
With the input check on (the default) the CPU path raises instead; MAGLOSS_CHECK_INPUTS=off (or 0)
lets the NaN through. The NaN masks below are derived by hand from these rules; the finite values
are compared with the same call on the NaN-free inputs. The fused engine's NaN cases are at the end
of tests/test_cuda_parity.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.distributed as mdist
import magloss.functional as MF
from magloss import reference
from magloss.margins import MAGCOS, MAGFACE, magnitude_margin, margin_terms, regularizer

from _dist_utils import spawn_worlds
from cases import ALL, FAMILIES, LOSS_NAMES, SAME_ROWS_RTOL, lam_tensor, loss_functional, make_case

NAN = float("nan")
B, C, D = 7, 13, 10
ROW, IGNORED, WROW_OF = 2, 4, 5     # NaN embedding row, ignored NaN row, row whose class gets the NaN weight row
WHERE = ["embedding", "ignored", "weight"]


def nan_case(where, seed=0, dtype=torch.float64):
    """(x, w, y) with one NaN entry placed by ``where``, the same inputs with the NaN replaced by
    a number, and the hand-derived masks: NaN rows of lse / zy / norms, NaN class of W or None."""
    x, w, y, _ = make_case(B, C, D, seed=seed, ignored=(IGNORED,))
    x, w = x.to(dtype), w.to(dtype)
    xn, wn = x.clone(), w.clone()
    rows = torch.zeros(B, dtype=torch.bool)
    zy_rows = torch.zeros(B, dtype=torch.bool)
    if where == "embedding":
        assert y[ROW] != -1
        xn[ROW, 3] = NAN
        rows[ROW] = zy_rows[ROW] = True
    elif where == "ignored":
        xn[IGNORED, 7] = NAN
        rows[IGNORED] = True              # its zy is 0: it has no label column
    else:
        j = int(y[WROW_OF])
        wn[j, 6] = NAN
        zy_rows = y == j
    return (xn, wn, y), (x, w, y), dict(lse=rows | (where == "weight"), zy=zy_rows, norms=rows)


def assert_nan_where(t, mask, what):
    got = torch.isnan(t)
    assert torch.equal(got, mask.expand_as(got)), f"{what}: NaN at {got.nonzero().tolist()}, expected at " \
                                                  f"{mask.expand_as(got).nonzero().tolist()}"


def assert_same_elsewhere(t, clean, mask, what):
    """Entries outside ``mask`` equal those of the NaN-free call (rows are independent)."""
    keep = ~mask.expand_as(t)
    torch.testing.assert_close(t[keep], clean[keep], rtol=SAME_ROWS_RTOL[t.dtype], atol=0,
                               msg=lambda m: f"{what}: {m}")


# ---- the margin functions ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ALL)
def test_margin_terms_keep_nan(family, dtype):
    """A NaN cosine gives NaN ψ and ∂ψ/∂c (1 only where it is 1 by definition: straight-through,
    Mag-CosFace); a NaN magnitude gives NaN ψ and ∂ψ/∂a for the MagFace families. Once a comparison
    sent a NaN cosine to the constant branch (∂ψ/∂c = 1) and dm/da was 0."""
    spec, lam = FAMILIES[family]
    lam_t = None if lam is None else lam_tensor(lam).to(dtype)
    c = torch.tensor([0.3, NAN, 0.9, -0.2], dtype=dtype)
    a = torch.tensor([30.0, 50.0, NAN, 140.0], dtype=dtype)
    psi, dc, da = margin_terms(c, a, spec, lam_t)
    mag = spec.kind in (MAGFACE, MAGCOS)
    dc_is_one = spec.straight_through or spec.kind == MAGCOS
    assert torch.isnan(psi[1]) and (dc[1] == 1 if dc_is_one else torch.isnan(dc[1]))
    assert torch.isnan(psi[2]) == mag and torch.isnan(da[2]) == mag
    fin = torch.tensor([True, False, not mag, True])
    clean = margin_terms(torch.where(torch.isnan(c), 0.5, c), torch.where(torch.isnan(a), 60.0, a), spec, lam_t)
    for name, got, want in zip(("psi", "dpsi/dc", "dpsi/da"), (psi, dc, da), clean):
        assert torch.isfinite(got[fin]).all() and torch.equal(got[fin], want[fin]), name


@pytest.mark.parametrize("fn", [lambda a: magnitude_margin(a, 10.0, 110.0, 0.45, 0.8),
                                lambda a: regularizer(a, 10.0, 110.0)], ids=["magnitude_margin", "regularizer"])
def test_magnitude_terms_keep_nan(fn):
    a = torch.tensor([5.0, NAN, 50.0, 200.0], dtype=torch.float64)
    value, slope = fn(a)
    assert torch.isnan(value).tolist() == [False, True, False, False]
    assert torch.isnan(slope).tolist() == [False, True, False, False]
    assert slope[0] == 0 and slope[3] == 0 and slope[2] != 0      # 0 outside [l_a, u_a], as before


# ---- the reference engine: row statistics and the explicit backward --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("family", ALL)
def test_reference_rows_and_gradients(family, where, dtype):
    spec, lam = FAMILIES[family]
    lam_t = lam_tensor(lam)
    (x, w, y), (xc, wc, _), m = nan_case(where, seed=len(family), dtype=dtype)
    rows = reference.margin_ce_rows(x, w, y, spec, -1, lam_t)
    clean = reference.margin_ce_rows(xc, wc, y, spec, -1, lam_t)
    reg_mask = m["norms"] if spec.has_regularizer else torch.zeros(B, dtype=torch.bool)
    for name, t, ct, mask in zip(("lse", "zy", "reg", "norms"), rows, clean,
                                 (m["lse"], m["zy"], reg_mask, m["norms"])):
        assert_nan_where(t, mask, f"{family} {where} {name}")
        assert_same_elsewhere(t, ct, mask, f"{family} {where} {name}")
    assert not torch.isinf(rows[0]).any()             # an ignored NaN row was once lse = −inf
    assert rows[1][IGNORED] == 0

    # Backward as the losses call it: no incoming lse/zy gradient on the ignored row.
    g = torch.Generator().manual_seed(3)
    grads = [torch.rand(B, generator=g, dtype=dtype) + 0.5 for _ in range(4)]
    for t in grads[:2]:
        t[IGNORED] = 0.0
    gx, gw = reference.margin_ce_backward(*grads, x, w, y, rows[0], spec, -1, lam_t)
    gxc, _ = reference.margin_ce_backward(*grads, xc, wc, y, clean[0], spec, -1, lam_t)
    x_rows = m["norms"] if where != "weight" else torch.ones(B, dtype=torch.bool)
    assert_nan_where(gx, x_rows.unsqueeze(1), f"{family} {where} grad_embeddings")
    assert_same_elsewhere(gx, gxc, x_rows.unsqueeze(1), f"{family} {where} grad_embeddings")
    assert torch.isnan(gw).all(), f"{family} {where}: every class column sees the NaN"


def test_plain_softmax_has_the_same_ignored_row_rule():
    """The rule for an ignored NaN row is PyTorch's own: F.linear + F.cross_entropy(ignore_index)
    gives a finite loss and a NaN ∂W (0·NaN in the product), as the margin losses do."""
    (x, w, y), _, _ = nan_case("ignored")
    wt = w.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(x, wt), y, ignore_index=-1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isnan(wt.grad).all()


# ---- the functional losses and the modules: input check on and off ----------------------------------
#: Every registered loss's functional form, with its FAMILIES hyperparameters where it has a row
#: the losses that sum over the classes instead of a log-sum-exp (magloss.onevsall)
ONE_VS_ALL = {n for n, cls in magloss.registry.LOSSES.items() if issubclass(cls, magloss.losses.OneVsAllLoss)}
LOSSES = {n: (lambda fn: lambda x, w, y, r: fn(x, w, y, reduction=r))(loss_functional(n)) for n in LOSS_NAMES}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("name", list(LOSSES))
def test_functional_raises_with_checks_on(monkeypatch, name, where):
    (x, w, y), _, _ = nan_case(where, dtype=torch.float32)
    for mode in (None, "async", "sync", "1"):
        if mode is None:
            monkeypatch.delenv("MAGLOSS_CHECK_INPUTS", raising=False)
        else:
            monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", mode)
        with pytest.raises(ValueError, match="weight" if where == "weight" else "embeddings"):
            LOSSES[name](x, w, y, "mean")


@pytest.mark.parametrize("mode", ["off", "0"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("name", list(LOSSES))
def test_functional_nan_with_checks_off(monkeypatch, name, where, mode):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", mode)
    (x, w, y), (xc, wc, _), m = nan_case(where, seed=1, dtype=torch.float32)
    valid = y != -1
    none_mask = (m["lse"] | m["zy"] | m["norms"]) & valid   # an ignored row's 'none' entry is 0
    per_row = LOSSES[name](x, w, y, "none")
    assert_nan_where(per_row, none_mask, f"{name} {where} 'none'")
    assert_same_elsewhere(per_row, LOSSES[name](xc, wc, y, "none"), none_mask, f"{name} {where} 'none'")
    assert per_row[IGNORED] == 0
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = LOSSES[name](xg, wg, y, "mean")
    if where == "ignored":
        torch.testing.assert_close(loss, LOSSES[name](xc, wc, y, "mean"))
    else:
        assert torch.isnan(loss)
    loss.backward()
    if where == "weight" and name in ONE_VS_ALL:
        # a sum over classes: ∂L/∂w_k reads only the cosines of class k, so the other classes'
        # gradients stay finite (the NaN reaches every loss row and every ∂x through class j)
        j = int(y[WROW_OF])
        assert_nan_where(wg.grad, (torch.arange(C) == j).unsqueeze(1), f"{name} {where} grad_weight")
    else:
        assert torch.isnan(wg.grad).all()
    assert_nan_where(xg.grad, (m["norms"] if where != "weight" else torch.ones(B, dtype=torch.bool)).unsqueeze(1),
                     f"{name} {where} grad_embeddings")


@pytest.mark.parametrize("where", ["embedding", "weight"])
def test_module_nan_with_checks_off(monkeypatch, where):
    """A module, MagFace's parts included: a NaN in the input batch or in the module's own class
    matrix reaches the loss, ce, reg (embeddings only: g(ã) does not read W) and norms."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    (x, w, y), _, m = nan_case(where, seed=2, dtype=torch.float32)
    mod = magloss.MagFaceLoss(D, C)
    with torch.no_grad():
        mod.weight.copy_(w)
    out = mod(x, y, return_parts=True)
    assert torch.isnan(out.loss) and torch.isnan(out.ce)
    assert torch.isnan(out.reg) == (where == "embedding")
    assert_nan_where(out.norms, m["norms"], "norms")


def test_check_mode_is_validated_on_the_cpu_path_too(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sometimes")
    (x, w, y), _, _ = nan_case("embedding", dtype=torch.float32)
    with pytest.raises(ValueError, match="MAGLOSS_CHECK_INPUTS: expected 'async' \\(default\\), 'sync' or 'off', "
                                         "got 'sometimes'"):
        MF.arcface_loss(x, w, y)


def test_labels_are_checked_even_with_checks_off(monkeypatch):
    """'off' drops only the NaN/Inf check: the reference indexes with the labels."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    (x, w, y), _, _ = nan_case("embedding", dtype=torch.float32)
    y = y.clone()
    y[1] = C
    with pytest.raises(ValueError, match=f"got {C} at row 1"):
        MF.arcface_loss(x, w, y)


# ---- the class-sharded head: world sizes 1 and 2 ---------------------------------------------------------
SHARDED = [("arcface", "ArcFaceLoss"), ("magface", "MagFaceLoss"), ("sphereface", "SphereFaceLoss")]
SPLIT = [4, 3]                     # rows per rank at world size 2 (uneven); NaN rows 2 and 4 on ranks 0 and 1


def _sharded_phase(rank, world, group, out_dir):
    os.environ["MAGLOSS_CHECK_INPUTS"] = "off"
    sizes = SPLIT if world == 2 else [B]
    lo = sum(sizes[:rank])
    out = {}
    for fam, cls in SHARDED:
        for where in WHERE:
            (x, w, y), (_, w_clean, _), _ = nan_case(where, seed=4)
            if where == "weight":   # the NaN class on the last shard: only the lse combine carries it
                w = w_clean.clone()
                w[C - 1, 6] = NAN
            head = getattr(mdist, "Sharded" + cls)(D, C, reduction="none", group=group,
                                                          dtype=torch.float64, ddp_backbone=False)  # exact dL/dx
            head.weight.data.copy_(w[head.shard_start: head.shard_end])
            xl = x[lo: lo + sizes[rank]].clone().requires_grad_()
            loss = head(xl, y[lo: lo + sizes[rank]])
            (loss * torch.linspace(0.5, 1.5, B, dtype=torch.float64)).sum().backward()
            out[(fam, where)] = dict(loss=loss.detach(), gx=xl.grad, gw=head.weight.grad,
                                     start=head.shard_start, x=x, w=w, y=y)
    # Checks on: the NaN rows are gathered, so every rank raises the same error (no rank hangs).
    os.environ["MAGLOSS_CHECK_INPUTS"] = "async"
    (x, w, y), _, _ = nan_case("embedding", seed=4)
    head = mdist.ShardedArcFaceLoss(D, C, group=group, dtype=torch.float64)
    try:
        head(x[lo: lo + sizes[rank]], y[lo: lo + sizes[rank]])
        out["checks_on"] = None
    except ValueError as exc:
        out["checks_on"] = str(exc)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return spawn_worlds(_sharded_phase, (2, 1), tmp_path_factory.mktemp("nan_dist"))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("fam,cls", SHARDED, ids=[f for f, _ in SHARDED])
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_head_keeps_nan(monkeypatch, sharded, world, fam, cls, where):
    """The per-row loss of the sharded head has NaN exactly where the single-process loss has it,
    and equal values elsewhere; so have ∂x and ∂W. With the NaN class on the last shard, rank 0's
    local lse is finite: only the log-sum-exp combine over ranks carries the NaN to every row."""
    recs = [sharded[(world, r)][(fam, where)] for r in range(world)]
    x, w, y = recs[0]["x"], recs[0]["w"], recs[0]["y"]
    loss = recs[0]["loss"]
    gx = torch.cat([r["gx"] for r in recs])
    gw = torch.cat([r["gw"] for r in recs])
    expected_nan = {"embedding": torch.arange(B) == ROW, "ignored": torch.zeros(B, dtype=torch.bool),
                    "weight": y != -1}[where]
    assert_nan_where(loss, expected_nan, f"world {world} {fam} {where} loss")
    for r in recs[1:]:          # the same loss on every rank
        torch.testing.assert_close(r["loss"], loss, rtol=0, atol=0, equal_nan=True)

    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    single = getattr(magloss, cls)(D, C, reduction="none", dtype=torch.float64)
    with torch.no_grad():
        single.weight.copy_(w)
    xs = x.clone().requires_grad_()
    ref = single(xs, y)
    (ref * torch.linspace(0.5, 1.5, B, dtype=torch.float64)).sum().backward()
    for name, got, want in (("loss", loss, ref.detach()), ("grad_embeddings", gx, xs.grad),
                            ("grad_weight", gw, single.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True,
                                   msg=lambda m: f"world {world} {fam} {where} {name}: {m}")


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_head_raises_on_every_rank_with_checks_on(sharded, world):
    msgs = [sharded[(world, r)]["checks_on"] for r in range(world)]
    assert msgs[0] == f"embeddings: contains NaN or Inf (row {ROW})" and all(m == msgs[0] for m in msgs)
