"""The sharded AdaFace, CurricularFace, Sub-center ArcFace and ElasticFace (Partial FC
included) against the single-process losses on the concatenated batch, on gloo.

One spawn of 3 processes runs world sizes 2 (subgroup {0, 1}), 3 (WORLD) and 1 (subgroup
{0}); each rank runs two training steps of every case (the running state evolving: AdaFace's
norm statistics and CurricularFace's t over the global batch, ElasticFace's draws from the
shared seed, τ_i of rows whose class lives on another rank) and writes its loss, ∂x of its
rows, ∂W of its shard and its buffers; the tests compare them here with the single-process
module over all classes (float64, 1e-10)."""

from __future__ import annotations


import pytest
import torch

import magloss
import magloss.distributed as mdist

from _dist_utils import spawn_worlds, split_sizes
from cases import FP64_TOL

WORLD_SIZES = (2, 3, 1)
D, C, STEPS = 6, 17, 2
# name, single-process class, kwargs, Partial FC rate
CASES = [
    ("adaface", "AdaFaceLoss", dict(scale=16.0), 1.0),
    ("curricular", "CurricularFaceLoss", dict(scale=16.0), 1.0),
    ("subcenter", "SubCenterArcFaceLoss", dict(subcenters=3, scale=16.0), 1.0),
    ("elastic_arc_plus", "ElasticArcFaceLoss", dict(scale=16.0, plus=True), 1.0),
    ("elastic_cos", "ElasticCosFaceLoss", dict(scale=16.0), 1.0),
    ("pfc_subcenter", "SubCenterArcFaceLoss", dict(subcenters=2, scale=16.0), 0.5),
    ("pfc_curricular", "CurricularFaceLoss", dict(scale=16.0), 0.5),
]
IDS = [c[0] for c in CASES]
TOL = FP64_TOL
SEED = 11


def make_batch(name, step, k):
    g = torch.Generator().manual_seed(sum(map(ord, name)) + 97 * step)
    total = 10
    x = torch.randn(total, D, generator=g, dtype=torch.float64)
    x = x * (5.0 + 60.0 * torch.rand(total, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (total,), generator=g)
    y[3] = -1
    w = torch.randn(C * k, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return x, y, w


def _phase(rank, world, group, out_dir):
    res = {}
    for name, cls, kwargs, rate in CASES:
        k = kwargs.get("subcenters", 1)
        head = getattr(mdist, "Sharded" + cls)(D, C, **kwargs, sample_rate=rate, seed=SEED, ddp_backbone=False,
                                              group=group, dtype=torch.float64)
        rec = []
        for step in range(STEPS):
            x, y, w = make_batch(name, step, k)
            sizes = split_sizes(x.shape[0], world)
            lo = sum(sizes[:rank])
            head.weight.data.copy_(w[head.shard_start * k: head.shard_end * k])
            head.zero_grad()
            xl = x[lo: lo + sizes[rank]].clone().requires_grad_()
            loss = head(xl, y[lo: lo + sizes[rank]])
            loss.backward()
            rec.append({"loss": loss.detach(), "gx": xl.grad, "gw": head.weight.grad.clone(), "sizes": sizes,
                        "start": head.shard_start, "end": head.shard_end, "sample": head.last_sample,
                        "buffers": {n: b.clone() for n, b in head.named_buffers() if n != "step"}})
        res[name] = rec
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_adaptive")
    return spawn_worlds(_phase, WORLD_SIZES, out)


def _single(name, cls, kwargs, sample):
    """The single-process module; with Partial FC, over the sampled classes only."""
    single = getattr(magloss, cls)(D, C if sample is None else sample.numel(), **kwargs, dtype=torch.float64,
                                   **({"seed": SEED} if "Elastic" in cls else {}))
    return single


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharded_equals_single_process(results, world, case):
    name, cls, kwargs, rate = case
    k = kwargs.get("subcenters", 1)
    ranks = [results[(world, r)][name] for r in range(world)]
    single = None
    for step in range(STEPS):
        x, y, w = make_batch(name, step, k)
        sample = None
        if rate < 1.0:       # the union of the shards' samples: classes kept this step
            sample = torch.cat([rk[step]["sample"] for rk in ranks])
            rows = (sample.unsqueeze(1) * k + torch.arange(k)).flatten()
            remap = torch.full((C,), -1, dtype=torch.int64)
            remap[sample] = torch.arange(sample.numel())
            y_single = torch.where(y >= 0, remap[y.clamp_min(0)], y)
            assert (y_single[y >= 0] >= 0).all()         # every positive kept
            w_single = w[rows]
        else:
            y_single, w_single = y, w
        if single is None or rate < 1.0:
            state = None if single is None else {n: b.clone() for n, b in single.named_buffers()}
            single = _single(name, cls, kwargs, sample)
            if state:
                for n, b in state.items():
                    getattr(single, n).copy_(b)
        single.weight.data.copy_(w_single)
        single.zero_grad()
        xs = x.clone().requires_grad_()
        loss = single(xs, y_single)
        loss.backward()
        for r, rk in enumerate(ranks):
            rec = rk[step]
            torch.testing.assert_close(rec["loss"], loss.detach(), **TOL)
            lo = sum(rec["sizes"][:r])
            torch.testing.assert_close(rec["gx"], xs.grad[lo: lo + rec["sizes"][r]], **TOL)
            gw = torch.zeros(C * k, D, dtype=torch.float64)
            if sample is None:
                gw = single.weight.grad
            else:
                gw[rows] = single.weight.grad
            torch.testing.assert_close(rec["gw"], gw[rec["start"] * k: rec["end"] * k], **TOL)
            for n, b in rec["buffers"].items():
                torch.testing.assert_close(b, getattr(single, n), **TOL)
