"""Where one forward+backward of the chunked engine's time goes, by op class (CPU).

    python benchmarks/profile_step.py B C speed|flat      # ArcFace, D = 512, 2 threads

Prints the step's median time (5 calls) and the bare products' (the floor: X·Wᵀ, G·W, Gᵀ·X),
then the self CPU time of one profiled step grouped as: the products; the passes over W and
∂W (row norms, the column term of ∂W); the B×N tile passes; the other tensor ops. What the
profile does not attribute to tensor ops (step − their sum) is per-call overhead: the checks
and their host reads, Python, dispatch. docs/cpu_engine.md quotes its output."""
import sys
import time

import torch

import magloss.functional as MF
from magloss import chunked
torch.set_num_threads(2)
B, C, D, path = int(sys.argv[1]), int(sys.argv[2]), 512, sys.argv[3]
x = torch.randn(B, D, requires_grad=True); w = torch.randn(C, D, requires_grad=True); y = torch.randint(0, C, (B,))
g = torch.randn(B, C)
def floor():
    torch.mm(x.detach(), w.detach().t()); torch.mm(g, w.detach()); torch.mm(g.t(), x.detach())
def step():
    with chunked.use_path(path):
        x.grad = w.grad = None
        MF.arcface_loss(x, w, y).backward()
for f in (floor, step, floor, step): f()
tf, ts = [], []
for _ in range(5):
    t0 = time.perf_counter(); floor(); tf.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
tf, ts = sorted(tf)[2] * 1e3, sorted(ts)[2] * 1e3
with torch.profiler.profile() as prof:
    step()
groups = {"products": ("aten::mm", "aten::addmm_", "aten::addmm"),
          "passes over W / dW (row norms, dW column term)": ("aten::linalg_vector_norm", "aten::addcmul_"),
          "B x N tile passes (addcmul, exp, scale, sum, column sums)": ("aten::addcmul", "aten::exp_", "aten::mul", "aten::mul_", "aten::sum", "aten::addmv_", "aten::mv")}
tot = {k: 0.0 for k in groups}
allself = 0.0
for e in prof.key_averages():
    if e.key.startswith("aten::"):
        allself += e.self_cpu_time_total
    for k, names in groups.items():
        if e.key in names:
            tot[k] += e.self_cpu_time_total
prof_total = sum(e.self_cpu_time_total for e in prof.key_averages())
print(f"B={B} C={C} {path}: step {ts:.1f} ms (median of 5), floor {tf:.1f} ms, ratio {ts/tf:.2f}")
for k, v in tot.items():
    print(f"  {k}: {v/1e3:.1f} ms")
print(f"  other aten ops: {(allself - sum(tot.values()))/1e3:.1f} ms; profiled step total (self, all events) {prof_total/1e3:.1f} ms")
