"""Class-sharded losses, Partial FC and resharding checkpoints on gloo (CPU, spawned ranks).

One spawn of 3 gloo processes runs the phases for world sizes 2 (subgroup {0, 1}), 3
(WORLD) and 1 (subgroup {0}), in that order; each phase runs every case and writes each rank's
results (loss, ∂embeddings of its rows, ∂W of its shard, samples, errors) to a file;
the tests below then compare them, in this process, with the single-process magloss
loss on the concatenated batch over the full class set (float64 to 1e-10, float32 to
1e-5). The order matters for the checkpoint round trip 2 → 3 → 1.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import magloss
import magloss.distributed as mdist
from magloss import checkpoint

from _dist_utils import spawn_worlds, split_sizes
from cases import FP32_TOL, FP64_TOL, make_inputs

WORLD_SIZES = (2, 3, 1)          # spawn order: the checkpoint is written by 2, read by 3, re-written, read by 1
D = 6
C = 17                           # not divisible by 2 or 3: uneven shards
C_PFC = 203                      # Partial FC: shards of 102/101 or 68/68/67 classes

# name, single-process class, kwargs, dtype, total rows, batch split, label pattern, reduction, extra
CASES = [
    ("normface", "NormFaceLoss", dict(scale=16.0), torch.float64, 10, "even", "random", "mean", {}),
    ("cosface", "CosFaceLoss", dict(), torch.float64, 10, "uneven", "ignored", "mean", {}),
    ("arcface", "ArcFaceLoss", dict(), torch.float64, 10, "uneven", "ignored", "sum", {}),
    ("arcface_easy_st", "ArcFaceLoss", dict(easy_margin=True, straight_through=True), torch.float64, 9, "even",
     "random", "none", {}),
    ("combined", "CombinedMarginLoss", dict(m1=0.9, m2=0.4, m3=0.15), torch.float64, 11, "even", "last_shard",
     "mean", {}),
    ("sphere_norm", "SphereFaceLoss", dict(lambda_base=0.5, lambda_min=0.0), torch.float64, 10, "uneven",
     "ignored", "mean", {}),
    ("sphere_fixed", "SphereFaceLoss", dict(margin=2, scale=30.0, lambda_base=3.0, lambda_min=0.0), torch.float64,
     10, "even", "random", "mean", {}),
    ("magface", "MagFaceLoss", dict(), torch.float64, 12, "uneven", "ignored", "mean", {"parts": True}),
    ("magface_sum", "MagFaceLoss", dict(easy_margin=False), torch.float64, 10, "even", "last_shard", "sum",
     {"parts": True}),
    ("magcos", "MagCosFaceLoss", dict(), torch.float64, 10, "empty", "rank0_ignored", "mean", {"parts": True}),
    ("magcos_none", "MagCosFaceLoss", dict(ignore_index=-100), torch.float64, 9, "even", "ignored", "none", {}),
    ("arcface_all_ignored", "ArcFaceLoss", dict(), torch.float64, 6, "even", "all_ignored", "mean", {}),
    ("arcface_f32", "ArcFaceLoss", dict(), torch.float32, 10, "uneven", "ignored", "mean", {}),
    ("magface_f32", "MagFaceLoss", dict(), torch.float32, 10, "even", "random", "mean", {"parts": True}),
    ("arcface_bf16_autocast", "ArcFaceLoss", dict(), torch.float32, 10, "even", "random", "mean",
     {"autocast": torch.bfloat16}),
    ("pfc_rate1", "ArcFaceLoss", dict(), torch.float64, 10, "uneven", "ignored", "mean", {"rate": 1.0}),
    ("pfc_rate01", "ArcFaceLoss", dict(), torch.float64, 12, "uneven", "ignored", "mean", {"rate": 0.1}),
    ("pfc_rate01_magface", "MagFaceLoss", dict(), torch.float64, 12, "even", "random", "mean", {"rate": 0.1}),
    ("pfc_rate01_f32", "CosFaceLoss", dict(), torch.float32, 12, "even", "random", "sum", {"rate": 0.1}),
]
CASE_IDS = [c[0] for c in CASES]
TOL = {torch.float64: FP64_TOL, torch.float32: FP32_TOL}


# -- inputs: the same deterministic global batch in every process --------------------------------
def batch_sizes(split: str, total: int, world: int):
    if split == "even" or world == 1:
        return split_sizes(total, world)
    if split == "uneven":
        return [total - 3, 3] if world == 2 else [2, total - 5, 3]
    if split == "empty":                       # rank 1 has no rows at all
        return [total - 4, 0, 4][:world] if world == 3 else [total, 0]
    raise ValueError(split)


def make_case(case):
    name, _, kwargs, _, total, _, pattern, _, extra = case
    num_classes = C_PFC if "rate" in extra else C
    ignore = kwargs.get("ignore_index", -1)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    # magnitudes in [5, 125]: some outside MagFace's [l_a, u_a]
    x, w, y = make_inputs(total, num_classes, D, norm_range=(5.0, 125.0), generator=g)
    if pattern == "ignored":
        y[[1, total - 2]] = ignore
    elif pattern == "last_shard":              # every label on the last shard of any world size ≤ 3
        y = torch.randint(num_classes - 5, num_classes, (total,), generator=g)
    elif pattern == "rank0_ignored":
        y[:3] = ignore
    elif pattern == "all_ignored":
        y[:] = ignore
    row_weights = 0.5 + torch.rand(total, generator=g, dtype=torch.float64)   # for reduction='none'
    return x, w, y, row_weights


def accuracy_labels(x, w, y):
    """y with every other non-ignored row relabelled to its float64 cosine arg-max."""
    best = ((x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T).argmax(1)
    y = y.clone()
    y[::2] = torch.where(y[::2] >= 0, best[::2], y[::2])
    return y


def single_module(case, num_classes):
    _, cls, kwargs, _, _, _, _, reduction, _ = case
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return getattr(magloss, cls)(D, num_classes, reduction=reduction, dtype=case[3], **kwargs)


def sharded_module(case, **kw):
    _, cls, kwargs, _, _, _, _, reduction, extra = case
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kw.setdefault("ddp_backbone", False)     # compared with ∂L/∂x of one process: no DDP here
        return getattr(mdist, "Sharded" + cls)(D, C_PFC if "rate" in extra else C, reduction=reduction,
                                              sample_rate=extra.get("rate", 1.0), dtype=case[3], **kwargs, **kw)


def scalar_of(out, case, row_weights):
    """The scalar every rank backpropagates (identical on all ranks)."""
    loss = out.loss if isinstance(out, tuple) else out
    if case[7] == "none":
        return (loss * row_weights.to(loss.dtype)).sum()
    return loss


def run_forward(module, x, y, case, row_weights):
    extra = case[8]
    kw = {"return_parts": True} if extra.get("parts") else {}
    if "autocast" in extra:
        with torch.autocast("cpu", dtype=extra["autocast"]):
            out = module(x, y, **kw)
    else:
        out = module(x, y, **kw)
    scalar_of(out, case, row_weights).backward()
    return out


# -- the worker: every case, Partial FC extras, DDP, checkpoint, errors ------------------------------
def _record_error(fn):
    try:
        fn()
    except Exception as exc:           # noqa: BLE001 - the test inspects type and message
        return type(exc).__name__, str(exc)
    return None


def _phase(rank, world, group, out_dir):
    torch.manual_seed(1234)
    res = {"cases": {}, "errors": {}}
    for case in CASES:
        x, w, y, row_weights = make_case(case)
        dtype = case[3]
        sizes = batch_sizes(case[5], x.shape[0], world)
        lo = sum(sizes[:rank])
        x_loc = x[lo: lo + sizes[rank]].to(dtype).requires_grad_()
        y_loc = y[lo: lo + sizes[rank]]
        head = sharded_module(case, seed=7, group=group)
        head.weight.data.copy_(w[head.shard_start: head.shard_end].to(dtype))
        out = run_forward(head, x_loc, y_loc, case, row_weights)
        rec = {"loss": (out.loss if isinstance(out, tuple) else out).detach(), "gx": x_loc.grad,
               "gw": head.weight.grad, "start": head.shard_start, "end": head.shard_end, "sizes": sizes,
               "sample": head.last_sample}
        if isinstance(out, tuple):
            rec["ce"], rec["reg"], rec["norms"] = out.ce.detach(), out.reg.detach(), out.norms.detach()
        if head.last_sample is not None:   # same seed and step -> same sample; another seed -> another
            again = sharded_module(case, seed=7, group=group)
            other = sharded_module(case, seed=8, group=group)
            for h in (again, other):
                h(x_loc.detach(), y_loc)
            rec["sample_again"], rec["sample_other_seed"] = again.last_sample, other.last_sample
            head(x_loc.detach(), y_loc)
            rec["sample_next_step"] = head.last_sample
            step = int(head.step)          # a raising forward (NaN, seen by every rank) keeps the step
            x_nan = x_loc.detach().clone()
            x_nan[0, 0] = float("nan")
            try:
                head(x_nan, y_loc)
                rec["nan_raised"] = False
            except ValueError:
                rec["nan_raised"] = True
            rec["step_kept_on_error"] = int(head.step) == step
            head.eval()                    # eval mode: every class, the full loss
            out = head(x_loc.detach(), y_loc)
            rec["eval_loss"], rec["eval_sample"] = (out.loss if isinstance(out, tuple) else out), head.last_sample
        res["cases"][case[0]] = rec

    # mdist.shard(): the converter copies this rank's rows of a single-process module
    case = CASES[CASE_IDS.index("arcface")]
    x, w, y, rw = make_case(case)
    sizes = batch_sizes(case[5], x.shape[0], world)
    lo = sum(sizes[:rank])
    single = single_module(case, C)
    single.weight.data.copy_(w)
    head = mdist.shard(single, group=group, ddp_backbone=False)
    x_loc = x[lo: lo + sizes[rank]].clone().requires_grad_()
    out = run_forward(head, x_loc, y[lo: lo + sizes[rank]], case, rw)
    res["shard_converter"] = {"type": type(head).__name__, "loss": out.detach(), "gx": x_loc.grad,
                              "gw": head.weight.grad}

    # training accuracy over the global batch: some labels set to the arg-max, so it is not 0
    case = CASES[CASE_IDS.index("cosface")]
    x, w, y, _ = make_case(case)
    y = accuracy_labels(x, w, y)
    sizes = batch_sizes(case[5], x.shape[0], world)
    lo = sum(sizes[:rank])
    head = sharded_module(case, group=group)
    head.weight.data.copy_(w[head.shard_start: head.shard_end])
    res["accuracy"] = head.accuracy(x[lo: lo + sizes[rank]], y[lo: lo + sizes[rank]])

    # reduce-scatter backward path (NCCL's) on gloo, where this torch supports it
    from magloss.distributed import comm

    try:
        dist_ok = True
        probe = torch.zeros(1)
        dist.reduce_scatter(probe, [torch.ones(1) for _ in range(world)], group=group)
    except Exception:                  # noqa: BLE001 - older gloo: no reduce_scatter
        dist_ok = False
    if dist_ok:
        comm.REDUCE_SCATTER_BACKENDS = ("nccl", "gloo")
        case = CASES[CASE_IDS.index("magface")]
        x, w, y, rw = make_case(case)
        sizes = batch_sizes(case[5], x.shape[0], world)
        lo = sum(sizes[:rank])
        x_loc = x[lo: lo + sizes[rank]].clone().requires_grad_()
        head = sharded_module(case, group=group)
        head.weight.data.copy_(w[head.shard_start: head.shard_end])
        run_forward(head, x_loc, y[lo: lo + sizes[rank]], case, rw)
        res["reduce_scatter_gx"] = x_loc.grad
        comm.REDUCE_SCATTER_BACKENDS = ("nccl",)

    # DDP backbone: with undo_ddp_average its gradient is that of the global mean loss
    from torch.nn.parallel import DistributedDataParallel as DDP

    case = CASES[CASE_IDS.index("magface")]
    _, w, y, _ = make_case(case)
    inputs = torch.randn(y.shape[0], 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sizes = split_sizes(y.shape[0], world)
    lo = sum(sizes[:rank])
    # the default head (ddp_backbone=True) compensates by itself; ddp_backbone=False with
    # undo_ddp_average by hand is the same; ddp_backbone=False alone leaves DDP's average
    for key, ddp_backbone, undo in (("ddp_grad_default", True, False), ("ddp_grad", False, True),
                                    ("ddp_grad_averaged", False, False)):
        backbone = torch.nn.Linear(5, D, dtype=torch.float64)
        with torch.no_grad():
            backbone.weight.copy_(torch.linspace(-3, 3, 5 * D, dtype=torch.float64).view(D, 5))
            backbone.bias.fill_(0.5)
        ddp = DDP(backbone, process_group=group)
        head = sharded_module(case, group=group, ddp_backbone=ddp_backbone)
        head.weight.data.copy_(w[head.shard_start: head.shard_end])
        emb = ddp(inputs[lo: lo + sizes[rank]])
        if undo:
            emb = mdist.undo_ddp_average(emb, group)
        head(emb, y[lo: lo + sizes[rank]]).backward()
        res[key] = backbone.weight.grad.clone()
    # compensating twice is refused, on every rank, before any communication
    head = sharded_module(case, group=group, ddp_backbone=True)
    emb = mdist.undo_ddp_average(inputs[lo: lo + sizes[rank], :1].expand(-1, D).clone(), group)
    res["errors"]["ddp_compensated_twice"] = _record_error(lambda: head(emb, y[lo: lo + sizes[rank]]))

    # checkpoints: written by 2, read by 3 and re-written, read by 1
    ck2, ck3 = os.path.join(out_dir, "ck2"), os.path.join(out_dir, "ck3")
    case = CASES[CASE_IDS.index("arcface_f32")]
    head = sharded_module(case, seed=world, group=group)          # a different init per world size
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    if world == 2:
        x, w, y, rw = make_case(case)
        head.weight.data.copy_(w[head.shard_start: head.shard_end].float())
        sizes = split_sizes(x.shape[0], world)
        lo = sum(sizes[:rank])
        head(x[lo: lo + sizes[rank]].float(), y[lo: lo + sizes[rank]]).backward()
        opt.step()
        checkpoint.save_class_matrix(ck2, head, opt)
    elif world == 3:
        checkpoint.load_class_matrix(ck2, head, opt)
        checkpoint.save_class_matrix(ck3, head, opt)
    else:
        checkpoint.load_class_matrix(ck3, head, opt)
    st = opt.state[head.weight]
    res["ckpt"] = {"weight": head.weight.detach().clone(), "exp_avg": st["exp_avg"].clone(),
                   "exp_avg_sq": st["exp_avg_sq"].clone(), "step": st["step"].clone(),
                   "start": head.shard_start}
    # the same with K = 3 sub-centers per class: shards hold whole classes (K rows each)
    sc2, sc3 = os.path.join(out_dir, "sc2"), os.path.join(out_dir, "sc3")
    head = mdist.ShardedSubCenterArcFaceLoss(D, C, subcenters=3, seed=world, group=group)
    if world == 2:
        head.weight.data.copy_(SUBCENTER_W[3 * head.shard_start: 3 * head.shard_end])
        checkpoint.save_class_matrix(sc2, head)
    elif world == 3:
        checkpoint.load_class_matrix(sc2, head)
        checkpoint.save_class_matrix(sc3, head)
    else:
        checkpoint.load_class_matrix(sc3, head)
    res["subcenter_ckpt"] = (head.shard_start, head.weight.detach().clone())

    # bad configuration: every rank must raise the same clear error (no hang)
    g = dict(group=group)
    res["errors"]["num_classes_differs"] = _record_error(lambda: mdist.ShardedArcFaceLoss(D, C + (rank % 2), **g))
    res["errors"]["embedding_size_differs"] = _record_error(lambda: mdist.ShardedArcFaceLoss(D + rank % 2, C, **g))
    res["errors"]["sample_rate_differs"] = _record_error(
        lambda: mdist.ShardedArcFaceLoss(D, C, sample_rate=1.0 - 0.5 * (rank % 2), **g))
    res["errors"]["fewer_classes_than_ranks"] = _record_error(lambda: mdist.ShardedArcFaceLoss(D, world - 1, **g))
    res["errors"]["sample_rate_zero"] = _record_error(lambda: mdist.ShardedArcFaceLoss(D, C, sample_rate=0.0, **g))
    head = mdist.ShardedArcFaceLoss(D, C, **g)
    bad_y = torch.tensor(BAD_LABELS[world][rank])
    res["errors"]["label_out_of_range"] = _record_error(lambda: head(torch.randn(2, D), bad_y))
    res["errors"]["wrong_embedding_size"] = _record_error(lambda: head(torch.randn(2, D + 1), bad_y))
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # one spawn of 3 ranks: world 2 on the subgroup {0, 1}, world 3 on WORLD, world 1 on {0}
    # (fewer processes to start, the slow part, and the ``group`` argument gets exercised)
    out = tmp_path_factory.mktemp("dist")
    return spawn_worlds(_phase, WORLD_SIZES, out), str(out)


# -- the single-process oracle ------------------------------------------------------------------------
def reference(case, sample=None):
    """Single-process loss, ∂x [B, D] and ∂W [C, D] on the concatenated batch (restricted to
    the classes in ``sample`` for Partial FC, with zero ∂W on the others)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # tiny tensors: threads only cost time on a loaded CI machine
    try:
        return _reference(case, sample)
    finally:
        torch.set_num_threads(threads)


def _reference(case, sample):
    x, w, y, row_weights = make_case(case)
    dtype = case[3]
    ignore = case[2].get("ignore_index", -1)
    if sample is not None:
        remap = torch.full((w.shape[0],), -1, dtype=torch.long)
        remap[sample] = torch.arange(sample.numel())
        assert bool((remap[y[y != ignore]] >= 0).all()), "a positive class was not sampled"
        y = torch.where(y != ignore, remap[y.clamp_min(0)], y)
        w_used = w[sample]
    else:
        w_used = w
    module = single_module(case, w_used.shape[0])
    module.weight.data.copy_(w_used.to(dtype))
    xr = x.to(dtype).requires_grad_()
    out = run_forward(module, xr, y, case, row_weights)
    gw = torch.zeros(w.shape, dtype=dtype)
    if sample is not None:
        gw[sample] = module.weight.grad
    else:
        gw = module.weight.grad
    return out, xr.grad, gw


def gathered(results, world, name):
    recs = [results[(world, r)]["cases"][name] for r in range(world)]
    return recs, torch.cat([r["gx"] for r in recs]), torch.cat([r["gw"] for r in recs])


def assert_close(actual, expected, dtype, what, autocast=False):
    if autocast:   # bf16 operands; ∂x is rounded to bf16 per rank before the sum over ranks
        err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
        assert err < 2e-2, f"{what}: relative error {err:.3g}"
        return
    expected = expected.detach()
    # atol scales with the tensor: float32 logits of s = 64 carry ~1e-5 relative rounding anyway
    tol = TOL[dtype]
    atol = tol["atol"] * max(1.0, float(expected.abs().max())) if expected.numel() else tol["atol"]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what}: {m}")


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sharded_equals_single_process(results, world, case):
    res, _ = results
    recs, gx, gw = gathered(res, world, case[0])
    sample = None
    if recs[0]["sample"] is not None:
        sample = torch.cat([r["sample"] for r in recs])
    ref, ref_gx, ref_gw = reference(case, sample)
    dtype, autocast = case[3], "autocast" in case[8]
    ref_loss = ref.loss if isinstance(ref, tuple) else ref
    for r, rec in enumerate(recs):
        assert_close(rec["loss"], ref_loss.detach(), dtype, f"loss on rank {r}", autocast)
        if isinstance(ref, tuple):
            for part in ("ce", "reg", "norms"):
                assert_close(rec[part], getattr(ref, part).detach(), dtype, f"{part} on rank {r}", autocast)
    assert_close(gx, ref_gx, dtype, "d/d embeddings (all ranks' rows)", autocast)
    assert_close(gw, ref_gw, dtype, "d/d weight (all shards)", autocast)
    assert [(r["start"], r["end"]) for r in recs] == [
        mdist.shard_range(ref_gw.shape[0], world, r) for r in range(world)]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["pfc_rate1", "arcface"])
def test_partial_fc_rate_one_is_the_full_loss(results, world, name):
    res, _ = results
    recs, gx, gw = gathered(res, world, name)
    assert all(r["sample"] is None for r in recs)
    case = CASES[CASE_IDS.index(name)]
    ref, ref_gx, ref_gw = reference(case)           # the full class set, no sample
    assert_close(recs[0]["loss"], ref, case[3], "loss")
    assert_close(gw, ref_gw, case[3], "d/d weight")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["pfc_rate01", "pfc_rate01_magface", "pfc_rate01_f32"])
def test_partial_fc_sampling(results, world, name):
    res, _ = results
    case = CASES[CASE_IDS.index(name)]
    _, _, y, _ = make_case(case)
    recs, _, gw = gathered(res, world, name)
    rate = case[8]["rate"]
    kept = torch.zeros(C_PFC, dtype=torch.bool)
    for r, rec in enumerate(recs):
        start, end = rec["start"], rec["end"]
        sample = rec["sample"]
        assert sample.dtype == torch.int64 and bool((sample[1:] > sample[:-1]).all()), "sorted, distinct"
        assert bool(((sample >= start) & (sample < end)).all()), "a shard samples its own classes only"
        positives = torch.unique(y[(y >= start) & (y < end)])
        assert bool(torch.isin(positives, sample).all()), f"rank {r} dropped a positive class"
        expected = max(math.ceil(round(rate * (end - start), 9)), positives.numel())
        assert sample.numel() == expected, f"rank {r}: kept {sample.numel()}, expected {expected}"
        assert torch.equal(rec["sample_again"], sample), "same seed and step must give the same sample"
        assert not torch.equal(rec["sample_other_seed"], sample), "another seed should give another sample"
        assert not torch.equal(rec["sample_next_step"], sample), "the next step should give another sample"
        assert rec["nan_raised"] and rec["step_kept_on_error"], "a raising forward must not advance the step"
        kept[sample] = True
    assert bool((gw[~kept] == 0).all()), "unsampled rows of W received gradient"
    full = reference(case)[0]
    for r, rec in enumerate(recs):
        assert rec["eval_sample"] is None
        assert_close(rec["eval_loss"], full.loss if isinstance(full, tuple) else full, case[3],
                     f"eval-mode loss on rank {r} (all classes)")
    assert bool((gw[kept].abs().sum(1) > 0).all()), "every sampled row should receive gradient"
    assert kept.sum() < C_PFC // 2


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_shard_converter(results, world):
    res, _ = results
    recs = [res[(world, r)]["shard_converter"] for r in range(world)]
    ref, ref_gx, ref_gw = reference(CASES[CASE_IDS.index("arcface")])
    assert all(r["type"] == "ShardedArcFaceLoss" for r in recs)
    for r, rec in enumerate(recs):
        assert_close(rec["loss"], ref, torch.float64, f"loss on rank {r}")
    assert_close(torch.cat([r["gx"] for r in recs]), ref_gx, torch.float64, "d/d embeddings")
    assert_close(torch.cat([r["gw"] for r in recs]), ref_gw, torch.float64, "d/d weight")


@pytest.mark.parametrize("world", [w for w in WORLD_SIZES if w > 1])
def test_reduce_scatter_backward_matches(results, world):
    res, _ = results
    if "reduce_scatter_gx" not in res[(world, 0)]:
        pytest.skip("gloo has no reduce_scatter in this torch")
    gx = torch.cat([res[(world, r)]["reduce_scatter_gx"] for r in range(world)])
    _, ref_gx, _ = reference(CASES[CASE_IDS.index("magface")])
    assert_close(gx, ref_gx, torch.float64, "d/d embeddings via reduce_scatter")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ddp_backbone_gets_the_global_gradient(results, world):
    res, _ = results
    case = CASES[CASE_IDS.index("magface")]
    _, w, y, _ = make_case(case)
    inputs = torch.randn(y.shape[0], 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    backbone = torch.nn.Linear(5, D, dtype=torch.float64)
    with torch.no_grad():
        backbone.weight.copy_(torch.linspace(-3, 3, 5 * D, dtype=torch.float64).view(D, 5))
        backbone.bias.fill_(0.5)
    head = single_module(case, C)
    head.reduction = "mean"
    head.weight.data.copy_(w)
    head(backbone(inputs), y).backward()
    for r in range(world):
        assert_close(res[(world, r)]["ddp_grad_default"], backbone.weight.grad, torch.float64,
                     f"backbone grad with the default head, rank {r}")
        assert_close(res[(world, r)]["ddp_grad"], backbone.weight.grad, torch.float64, f"backbone grad, rank {r}")
        assert_close(res[(world, r)]["ddp_grad_averaged"], backbone.weight.grad / world, torch.float64,
                     f"backbone grad with ddp_backbone=False, rank {r}")
        name, msg = res[(world, r)]["errors"]["ddp_compensated_twice"]
        assert name == "ValueError" and msg.startswith("embeddings: they went through undo_ddp_average")


def test_checkpoint_round_trip_2_3_1(results):
    res, out = results
    full = {k: torch.cat([res[(2, r)]["ckpt"][k] for r in range(2)]) for k in ("weight", "exp_avg", "exp_avg_sq")}
    for world in (3, 1):
        for r in range(world):
            ck = res[(world, r)]["ckpt"]
            s = ck["start"]
            for k in full:
                assert torch.equal(ck[k], full[k][s: s + ck[k].shape[0]]), f"{k} on rank {r} of {world}"
            assert torch.equal(ck["step"], res[(2, 0)]["ckpt"]["step"])
    # and into a single-process module, without any process group
    assert not torch.distributed.is_initialized()
    module = magloss.ArcFaceLoss(D, C)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    checkpoint.load_class_matrix(os.path.join(out, "ck3"), module, opt)
    assert torch.equal(module.weight.detach(), full["weight"])
    assert torch.equal(opt.state[module.weight]["exp_avg"], full["exp_avg"])
    weight, state = checkpoint.load_full(os.path.join(out, "ck2"))
    assert torch.equal(weight, full["weight"]) and torch.equal(state["exp_avg_sq"], full["exp_avg_sq"])
    # the loaded optimizer keeps stepping
    module.weight.grad = torch.ones_like(module.weight)
    opt.step()
    with pytest.raises(ValueError, match="num_classes"):
        checkpoint.load_class_matrix(os.path.join(out, "ck3"), magloss.ArcFaceLoss(D, C + 1))


# A class matrix with 3 sub-centers per class whose every value names its row.
SUBCENTER_W = torch.arange(3 * C * D, dtype=torch.float32).view(3 * C, D)


def test_subcenter_checkpoint_round_trip_2_3_1(results):
    """Written by 2 ranks, read and re-written by 3, read by 1, by a single-process module and
    by load_full: every rank holds exactly the K rows of each of its classes."""
    res, out = results
    for world in (2, 3, 1):
        for r in range(world):
            start, weight = res[(world, r)]["subcenter_ckpt"]
            assert torch.equal(weight, SUBCENTER_W[3 * start: 3 * start + weight.shape[0]]), f"rank {r} of {world}"
    module = magloss.SubCenterArcFaceLoss(D, C, subcenters=3)
    checkpoint.load_class_matrix(os.path.join(out, "sc3"), module)
    assert torch.equal(module.weight.detach(), SUBCENTER_W)
    assert torch.equal(checkpoint.load_full(os.path.join(out, "sc2"))[0], SUBCENTER_W)
    with pytest.raises(ValueError, match="subcenters"):
        checkpoint.load_class_matrix(os.path.join(out, "sc3"), magloss.SubCenterArcFaceLoss(D, C, subcenters=2))
    with pytest.raises(ValueError, match="subcenters"):
        checkpoint.load_class_matrix(os.path.join(out, "ck3"), magloss.SubCenterArcFaceLoss(D, C, subcenters=3))


# Two labels per rank; the first bad one (smallest global row) is what every rank reports.
BAD_LABELS = {1: [[0, C + 3]], 2: [[0, 0], [0, C + 3]], 3: [[0, 0], [-5, 0], [0, C + 3]]}
FIRST_BAD = {1: (C + 3, 1), 2: (C + 3, 3), 3: (-5, 2)}   # (label, global row)

ERRORS = [
    ("num_classes_differs", "ValueError", "num_classes", True),
    ("embedding_size_differs", "ValueError", "embedding_size", True),
    ("sample_rate_differs", "ValueError", "sample_rate", True),
    ("fewer_classes_than_ranks", "ValueError", "num_classes", False),
    ("sample_rate_zero", "ValueError", "sample_rate", False),
    ("label_out_of_range", "ValueError", "labels", False),
    ("wrong_embedding_size", "ValueError", "embeddings", False),
]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("key, exc, needle, needs_two", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_configuration_errors(results, world, key, exc, needle, needs_two):
    res, _ = results
    for r in range(world):
        err = res[(world, r)]["errors"][key]
        if needs_two and world == 1:          # a single rank cannot disagree with itself
            assert err is None
            continue
        if key == "fewer_classes_than_ranks" and world == 1:   # num_classes = 0
            assert err is not None and err[0] == "ValueError"
            continue
        assert err is not None, f"rank {r} of {world}: no error for {key}"
        assert err[0] == exc and needle in err[1], f"rank {r} of {world}: {err}"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_bad_label_error_is_the_same_on_every_rank(results, world):
    res, _ = results
    value, row = FIRST_BAD[world]
    want = f"labels: expected class indices in [0, {C}) or ignore_index=-1, got {value} at global row {row}"
    for r in range(world):
        assert res[(world, r)]["errors"]["label_out_of_range"] == ("ValueError", want), f"rank {r} of {world}"


def test_needs_an_initialized_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        mdist.ShardedArcFaceLoss(D, C)
    with pytest.raises(TypeError, match="module"):
        mdist.shard(magloss.SoftmaxLoss(D, C))


@pytest.mark.parametrize("num_classes, world", [(17, 1), (17, 2), (17, 3), (3, 3), (100, 7)])
def test_shard_range_partitions_the_classes(num_classes, world):
    ranges = [mdist.shard_range(num_classes, world, r) for r in range(world)]
    sizes = [e - s for s, e in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
    assert sizes == split_sizes(num_classes, world)


def test_torchrun_example_runs(tmp_path):
    """The README command, shortened: 2 gloo ranks, a few steps, Partial FC, AMP, a checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "examples", "train_sharded.py"), "--steps", "2", "--num-classes", "51",
           "--batch-size", "8", "--embedding-size", "16", "--loss", "magface", "--sample-rate", "0.5", "--amp",
           "--device", "cpu", "--save", str(ck)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step ") == 2 and "saved to" in proc.stdout
    weight, state = checkpoint.load_full(str(ck))
    assert weight.shape == (51, 16) and state["momentum_buffer"].shape == (51, 16)
    assert bool(torch.isfinite(weight).all())


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sharded_accuracy_is_the_global_cosine_argmax(results, world):
    res, _ = results
    x, w, y, _ = make_case(CASES[CASE_IDS.index("cosface")])
    y = accuracy_labels(x, w, y)
    best = ((x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T).argmax(1)   # by hand
    valid = y != -1
    expected = int(((best == y) & valid).sum()) / int(valid.sum())
    for r in range(world):
        assert float(res[(world, r)]["accuracy"]) == expected


def test_load_class_matrix_refuses_another_optimizers_state(tmp_path):
    """SGD's momentum loaded into Adam made its first step fail with KeyError: 'exp_avg'; now the
    load is a ValueError naming both optimizers, and nothing (weight, optimizer) is changed."""
    m = magloss.ArcFaceLoss(8, 5)
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 8) * 5, torch.tensor([0, 1, 2, 3])).backward()
    sgd.step()
    checkpoint.save_class_matrix(str(tmp_path / "ck"), m, sgd)
    other = magloss.ArcFaceLoss(8, 5)
    before = other.weight.detach().clone()
    adam = torch.optim.Adam(other.parameters())
    with pytest.raises(ValueError, match=r"^optimizer: .*SGD state .*momentum_buffer.*Adam keeps exp_avg"):
        checkpoint.load_class_matrix(str(tmp_path / "ck"), other, adam)
    assert torch.equal(other.weight, before) and not adam.state
    same = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)    # the kind it was written with loads
    checkpoint.load_class_matrix(str(tmp_path / "ck"), other, same)
    assert torch.equal(other.weight, m.weight)
    assert torch.equal(same.state[other.weight]["momentum_buffer"], sgd.state[m.weight]["momentum_buffer"])
