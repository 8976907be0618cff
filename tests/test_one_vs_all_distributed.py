"""Sharded one-vs-all losses on gloo (CPU, two spawned ranks; and world 1 on a subgroup {0}) against
the single-process loss on the concatenated batch: loss, ∂x of each rank's rows, ∂W of each shard and
the replicated bias's gradient, over two SGD steps, with an uneven batch split, uneven shards and
ignored rows. Partial FC: the sampled loss equals the single-process loss over the kept classes."""

import os

import pytest
import torch
import torch.distributed as dist

import magloss
from _dist_utils import spawn
from cases import make_inputs
from magloss import registry

NAMES = ("sface", "uniface", "sphereface2", "p2sgrad")
#: (name, single-process class name): the losses this spawned suite covers, in the form of the
#: other spawned suites' CASES tables (tests/test_registry.py checks every sharded twin is covered).
CASES = [(name, registry.LOSSES[name].__name__) for name in NAMES]
B, C, D = 9, 11, 5
SPLIT = (5, 4)           # uneven batch; C = 11 gives shards of 6 and 5 classes
KW = {"sface": dict(scale=16.0, k=20.0), "uniface": dict(scale=8.0, bias_init=1.0),
      "sphereface2": dict(scale=10.0), "p2sgrad": {}}


def _data():
    x, w, y = make_inputs(B, C, D, norm_range=(2.0, 6.0), ignored=(3, 7), seed=21)
    return x, w, y


def _worker(rank, world, out_dir):
    x, w, y = _data()
    groups = {2: dist.group.WORLD, 1: dist.new_group([0])}
    for size, group in groups.items():
        if rank >= size:
            continue
        split = SPLIT if size == 2 else (B,)
        lo = sum(split[:rank])
        rows = slice(lo, lo + split[rank])
        for name in NAMES:
            single = registry.LOSSES[name](D, C, dtype=torch.float64, **KW[name])
            with torch.no_grad():
                single.weight.copy_(w)
            head = magloss.distributed.shard(single, group=group, ddp_backbone=False)
            xr = x[rows].clone().requires_grad_()
            opt = torch.optim.SGD(head.parameters(), lr=0.1)
            out = {}
            for step in range(2):
                opt.zero_grad()
                xr.grad = None
                loss = head(xr, y[rows])
                loss.backward()
                out[step] = dict(loss=loss.detach(), gx=xr.grad.clone(), gw=head.weight.grad.clone(),
                                 gb=None if head.bias is None else head.bias.grad.clone())
                opt.step()
            # Partial FC: one sampled training step, and the classes it kept
            pfc = magloss.distributed.shard(single, group=group, ddp_backbone=False, sample_rate=0.5, seed=3)
            out["pfc"] = dict(loss=pfc(x[rows], y[rows]).detach(), kept=pfc.last_sample.clone())
            torch.save(out, os.path.join(out_dir, f"{name}-w{size}-r{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ova_dist")
    spawn(_worker, 2, d, str(d))
    return d


def _single_steps(name):
    x, w, y = _data()
    m = registry.LOSSES[name](D, C, dtype=torch.float64, **KW[name])
    with torch.no_grad():
        m.weight.copy_(w)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    want = {}
    for step in range(2):
        opt.zero_grad()
        xg = x.clone().requires_grad_()
        loss = m(xg, y)
        loss.backward()
        want[step] = dict(loss=loss.detach(), gx=xg.grad, gw=m.weight.grad.clone(),
                          gb=None if m.bias is None else m.bias.grad.clone())
        opt.step()
    return want


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_equals_single_process(results, name, world):
    want = _single_steps(name)
    split = SPLIT if world == 2 else (B,)
    shards = [(0, 6), (6, 11)] if world == 2 else [(0, 11)]
    for r in range(world):
        got = torch.load(os.path.join(results, f"{name}-w{world}-r{r}.pt"))
        lo = sum(split[:r])
        for step in range(2):
            g, w = got[step], want[step]
            torch.testing.assert_close(g["loss"], w["loss"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g["gx"], w["gx"][lo:lo + split[r]], rtol=1e-10, atol=1e-12)
            a, b = shards[r]
            torch.testing.assert_close(g["gw"], w["gw"][a:b], rtol=1e-10, atol=1e-12)
            if w["gb"] is not None:
                torch.testing.assert_close(g["gb"], w["gb"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_partial_fc_is_the_loss_over_the_kept_classes(results, name, world):
    x, w, y = _data()
    got = [torch.load(os.path.join(results, f"{name}-w{world}-r{r}.pt"))["pfc"] for r in range(world)]
    kept = torch.cat([g["kept"] for g in got])
    assert kept.numel() < C and set(y[y >= 0].tolist()) <= set(kept.tolist())
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    yk = torch.where(y >= 0, remap[y.clamp_min(0)], y)
    m = registry.LOSSES[name](D, C, dtype=torch.float64, **KW[name])
    kind, params = m._kind, m.params       # built with the global C: P2SGrad's 1/C stays global
    want = magloss.onevsall.one_vs_all_loss(x, w[kept], yk, kind, params, m.bias)
    for g in got:
        torch.testing.assert_close(g["loss"], want.detach(), rtol=1e-12, atol=1e-12)
