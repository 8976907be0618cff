"""The providers' names and what the records say about them, without torch (benchmarks/summary.py
and benchmarks/plot.py read result files on machines that need not have it; benchmarks/providers.py
builds the runners)."""

from __future__ import annotations

PROVIDERS = ["magloss", "chunked", "reference", "eager", "eager-fullmatrix", "compile", "pml", "liger", "cce",
             "torch-lce", "torch-lce-chunked", "floor", "chunked-speed", "chunked-flat"]
LABELS = {
    "magloss": "magloss fused CUDA engine",
    "chunked": "magloss chunked PyTorch engine (the ops' default kernel without the fused ones)",
    "reference": "magloss reference engine (pure PyTorch, autograd)",
    "eager": "eager upstream-style PyTorch (benchmarks/eager.py), margin on the label column",
    "eager-fullmatrix": "eager upstream-style PyTorch, margin over the full matrix (one-hot mix)",
    "compile": "torch.compile of eager",
    "pml": "pytorch-metric-learning ArcFaceLoss/CosFaceLoss",
    "liger": "Liger-Kernel fused linear CE (plain CE: no normalization, no margin)",
    "cce": "Cut Cross-Entropy (plain CE: no normalization, no margin)",
    "torch-lce": "torch.nn.functional.linear_cross_entropy, options=None (plain CE: no normalization, no margin)",
    "torch-lce-chunked": "torch.nn.functional.linear_cross_entropy, chunked options (plain CE: no normalization, "
                         "no margin)",
    "floor": "bare matrix products, torch.matmul (the floor)",
    "chunked-speed": "magloss chunked engine, speed path forced (forward's products kept: 3 products)",
    "chunked-flat": "magloss chunked engine, flat path forced (products recomputed: 4 products, memory flat in C)",
}
#: providers that compute plain cross entropy, not the margin loss (labelled as such)
PLAIN_CE = ("liger", "cce", "torch-lce", "torch-lce-chunked")
#: providers whose work does not depend on the loss: run once per shape, recorded with this loss name
LOSS_FREE = {**{p: "plain-ce" for p in PLAIN_CE}, "floor": "matmul"}
