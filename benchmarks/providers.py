"""Provider registry: every implementation the harness times, built for one case.

``build(provider, case)`` returns a :class:`Runner` or raises :class:`Unavailable` with
the reason (package not installed, fused engine not active, loss not offered, ...).

Providers (``PROVIDERS``), all timed on the same inputs:

* ``magloss``: magloss' functional losses with the fused CUDA engine. Only when
  ``magloss.extension_status()["fused"]`` is true and the device is CUDA; otherwise
  Unavailable (a reference-engine run is never labelled "magloss").
* ``chunked``: magloss' functional losses through the ops' default kernel, the chunked
  PyTorch engine (:mod:`magloss.chunked`): what magloss runs on the CPU and, without the
  extension, on CUDA. Unavailable where the fused kernels are the default (CUDA with the
  extension built).
* ``reference``: magloss' pure-PyTorch reference engine (``magloss.reference``) through
  autograd: what magloss runs without the extension (CPU, pure-Python installs).
* ``eager``: the upstream way in plain PyTorch (:mod:`benchmarks.eager`).
* ``eager-fullmatrix``: the literal upstream form, margin over the whole matrix.
* ``compile``: ``torch.compile`` of the ``eager`` function (default mode).
* ``pml``: pytorch-metric-learning's ArcFaceLoss / CosFaceLoss (no MagFace there).
* ``liger``: Liger-Kernel's fused linear cross entropy. PLAIN CE: no normalization, no margin.
* ``cce``: Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``). PLAIN CE.
* ``torch-lce``: torch's own ``torch.nn.functional.linear_cross_entropy`` (torch ≥ 2.13) with
  ``options=None``, its reference path (``cross_entropy(linear(x, W), y)``). PLAIN CE.
* ``torch-lce-chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions()``, its chunked
  path (the batch in pieces, the B×C logits never whole; gradients computed in the forward). PLAIN
  CE. Both are Unavailable, with the reason, where the installed torch lacks them.
* ``floor``: the bare matrix products of the same shapes with torch.matmul:
  forward X[B,D]·Wᵀ[D,C]; backward G[B,C]·W[C,D] and Gᵀ[C,B]·X[B,D].
* ``chunked-speed`` / ``chunked-flat``: ``chunked`` with the engine's path forced
  (``magloss.chunked.use_path``; ``chunked`` itself follows the default policy): the speed
  path keeps the forward's B×C products (three products per step), the flat path
  recomputes them in the backward (four products, memory flat in C).

Precisions: ``fp32`` (TF32 off), ``tf32``, ``bf16`` (autocast, fp32 leaves),
``fp32-simt`` (fp32 with MAGLOSS_FORCE_SIMT=1, magloss only). Liger, CCE, torch's
linear_cross_entropy and the floor get bf16 tensors directly in ``bf16`` (their own benchmarks' setting, and the floor is
the bare product), everything else runs under ``torch.autocast`` with fp32 x and W.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch
from torch import Tensor

try:  # run as a script (benchmarks/run.py) or imported as the benchmarks package
    from benchmarks import eager as eager_impl
    from benchmarks.catalog import LABELS, LOSS_FREE, PLAIN_CE, PROVIDERS
except ImportError:  # pragma: no cover
    import eager as eager_impl  # type: ignore[no-redef]
    from catalog import LABELS, LOSS_FREE, PLAIN_CE, PROVIDERS  # type: ignore[no-redef]

__all__ = ["PROVIDERS", "LABELS", "PLAIN_CE", "LOSS_FREE", "PRECISIONS", "LOSSES", "Case", "Runner",
           "Unavailable", "build", "precision_context", "make_inputs"]

PRECISIONS = ["fp32", "tf32", "bf16", "fp32-simt"]
LOSSES = ["arcface", "magface", "cosface"]
#: providers that have a distinct no-tensor-core path; the others' fp32 runs are already SIMT
SIMT_PROVIDERS = ("magloss",)


class Unavailable(Exception):
    """The provider cannot run this case (reason in the message)."""


@dataclass(frozen=True)
class Case:
    provider: str
    loss: str
    precision: str
    B: int
    C: int
    D: int
    device: str = "cpu"

    def key(self):
        return (self.provider, self.loss, self.precision, self.B, self.C, self.D)


@dataclass
class Runner:
    """What the harness times. ``fwd()`` returns the thing ``bwd`` consumes (the loss);
    ``leaves`` are the tensors whose gradients a backward produces (cleared between runs)."""

    fwd: Callable[[], object]
    bwd: Callable[[object, bool], None]          # bwd(out, retain_graph)
    leaves: List[Tensor]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    notes: str = ""
    keep: Dict[str, object] = field(default_factory=dict)   # keeps modules/inputs alive

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.leaves)

    def zero_grad(self) -> None:
        for t in self.leaves:
            t.grad = None


# -- precision -------------------------------------------------------------------------------
@contextlib.contextmanager
def precision_context(precision: str, device: str):
    """Global matmul settings for the case, restored on exit (autocast is per runner)."""
    cuda = torch.backends.cuda.matmul
    old = (cuda.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
           os.environ.get("MAGLOSS_FORCE_SIMT"))
    tf32 = precision == "tf32"
    cuda.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if precision == "fp32-simt":
        os.environ["MAGLOSS_FORCE_SIMT"] = "1"
    else:
        os.environ.pop("MAGLOSS_FORCE_SIMT", None)
    try:
        yield
    finally:
        cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])
        if old[3] is None:
            os.environ.pop("MAGLOSS_FORCE_SIMT", None)
        else:
            os.environ["MAGLOSS_FORCE_SIMT"] = old[3]


def _autocast(case: Case) -> Callable[[], ContextManager]:
    if case.precision != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(case.device.split(":")[0], dtype=torch.bfloat16)


def make_inputs(case: Case, dtype=torch.float32, seed: int = 0):
    """Embeddings x [B, D] with magnitudes in [15, 100] (inside MagFace's [l_a, u_a]),
    unit-norm class centres W [C, D] and labels [B], the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * (15 + 85 * torch.rand(case.B, 1, generator=g))
    labels = torch.randint(0, case.C, (case.B,), generator=g)
    dev = torch.device(case.device)
    w = torch.empty(case.C, case.D, device=dev)
    # generate W on the device in chunks (1M x 512 on the host would be slow to copy)
    gd = torch.Generator(device=dev).manual_seed(seed + 1)
    for start in range(0, case.C, 1 << 18):
        blk = w[start:start + (1 << 18)]
        blk.normal_(generator=gd)
        blk.div_(blk.norm(dim=1, keepdim=True))
    x = x.to(dev, dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    return x, w, labels.to(dev)


def _loss_backward(loss, retain: bool = False) -> None:
    loss.backward(retain_graph=retain)


# -- providers -------------------------------------------------------------------------------
def _magloss(case: Case) -> Runner:
    import magloss

    st = magloss.extension_status()
    if not case.device.startswith("cuda"):
        raise Unavailable("magloss fused engine runs on CUDA only (this run is on CPU; see provider "
                          "'reference' for magloss' CPU path)")
    if not st["fused"]:
        raise Unavailable(f"fused engine not active: {st['reason']}")
    fn = getattr(magloss.functional, _FUNCTIONAL[case.loss])
    x, w, y = make_inputs(case)
    ext = magloss._ext._C                              # loaded: "fused" says so
    simt = bool(ext.simt_path(torch.device(case.device).index or 0))   # reads MAGLOSS_FORCE_SIMT (precision_context)
    if case.precision == "fp32-simt" and not simt:
        raise Unavailable("MAGLOSS_FORCE_SIMT=1 did not select the plain-fp32 path (simt_path() is False)")
    return Runner(lambda: fn(x, w, y), _loss_backward, [x, w], _autocast(case),
                  notes=f"magloss.functional, fused kernels, simt_path={simt}, "
                        f"chunk_columns={int(ext.chunk_columns(case.B, case.C))}")


_FUNCTIONAL = {"arcface": "arcface_loss", "magface": "magface_loss", "cosface": "cosface_loss"}


def _chunked(case: Case) -> Runner:
    import magloss
    from magloss import functional as MF

    if case.device.startswith("cuda") and magloss.extension_status()["fused"]:
        raise Unavailable("the fused kernels are the default on this device (provider 'magloss')")
    fn = getattr(MF, _FUNCTIONAL[case.loss])
    x, w, y = make_inputs(case)
    n = magloss.chunked.chunk_columns(case.B, case.C)
    return Runner(lambda: fn(x, w, y), _loss_backward, [x, w], _autocast(case),
                  notes=f"magloss.functional, default op kernel = magloss.chunked, chunk_columns={n}")


def _chunked_path(case: Case, path: str) -> Runner:
    import magloss

    runner = _chunked(case)
    fwd = runner.fwd

    def forced():
        with magloss.chunked.use_path(path):       # the path is chosen in the forward; autograd keeps it
            return fwd()

    runner.fwd, runner.notes = forced, runner.notes + f", path={path} (magloss.chunked.use_path)"
    return runner


def _reference(case: Case) -> Runner:
    from magloss import functional as MF
    from magloss import reference
    from magloss.margins import MarginSpec

    spec, lam = {
        "arcface": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0), 0.0),
        "cosface": (MarginSpec.combined(64.0, 1.0, 0.0, 0.35), 0.0),
        "magface": (MarginSpec.magface(64.0, 10.0, 110.0, 0.45, 0.8, True), 35.0),
    }[case.loss]
    x, w, y = make_inputs(case)
    dev = case.device.split(":")[0]
    valid = y != -1

    def fwd():
        xa, wa = x, w
        if torch.is_autocast_enabled(dev):   # the eager way: both operands in the autocast dtype,
            dt = torch.get_autocast_dtype(dev)    # then the reference math with autocast off
            xa, wa = x.to(dt), w.to(dt)
        with torch.autocast(dev, enabled=False):
            lse, zy, reg, norms = reference.margin_ce_rows(xa, wa, y, spec)
        return MF.reduce_rows(lse - zy, reg, norms, valid, spec, "mean", lam, False)

    return Runner(fwd, _loss_backward, [x, w], _autocast(case),
                  notes="magloss.reference.margin_ce_rows under autograd (no value checks)")


def _eager(case: Case, full_matrix: bool = False) -> Runner:
    fn = eager_impl.eager_loss(case.loss, full_matrix)
    x, w, y = make_inputs(case)
    return Runner(lambda: fn(x, w, y), _loss_backward, [x, w], _autocast(case))


_COMPILED: Dict[str, Callable] = {}


def _compile(case: Case) -> Runner:
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit"):   # never fall back to eager silently
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
    if case.loss not in _COMPILED:
        _COMPILED[case.loss] = torch.compile(eager_impl.eager_loss(case.loss))
    fn = _COMPILED[case.loss]
    x, w, y = make_inputs(case)
    return Runner(lambda: fn(x, w, y), _loss_backward, [x, w], _autocast(case),
                  notes="torch.compile(eager), default mode, automatic dynamic shapes")


def _pml(case: Case) -> Runner:
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError as exc:
        raise Unavailable(f"pytorch-metric-learning not installed ({exc})") from None
    if case.loss == "arcface":
        mod = pml_losses.ArcFaceLoss(case.C, case.D, margin=28.6, scale=64)     # margin in degrees (0.5 rad)
    elif case.loss == "cosface":
        mod = pml_losses.CosFaceLoss(case.C, case.D, margin=0.35, scale=64)
    else:
        raise Unavailable(f"pytorch-metric-learning has no {case.loss}")
    x, w, y = make_inputs(case)
    wt = w.detach().t().contiguous().requires_grad_()    # PML stores W as [D, C]
    del w
    mod.W = torch.nn.Parameter(wt)
    mod = mod.to(case.device)
    return Runner(lambda: mod(x, y), _loss_backward, [x, mod.W], _autocast(case), keep={"mod": mod},
                  notes="W stored [D, C] as PML does")


def _low(case: Case):
    """Inputs for providers that take the low-precision tensors directly in bf16."""
    x, w, y = make_inputs(case)
    if case.precision == "bf16":
        x = x.detach().to(torch.bfloat16).requires_grad_()
        w = w.detach().to(torch.bfloat16).requires_grad_()
    return x, w, y


def _liger(case: Case) -> Runner:
    if not case.device.startswith("cuda"):
        raise Unavailable("Liger-Kernel needs CUDA (Triton)")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # ImportError, or triton failing to initialise
        raise Unavailable(f"liger-kernel not installed or not importable ({exc})") from None
    mod = LigerFusedLinearCrossEntropyLoss()
    x, w, y = _low(case)
    return Runner(lambda: mod(w, x, y), _loss_backward, [x, w], keep={"mod": mod},
                  notes="PLAIN CE (no normalization, no margin); gradients computed in the forward; "
                        + ("bf16 x and W" if case.precision == "bf16" else "fp32 x and W"))


def _cce(case: Case) -> Runner:
    if not case.device.startswith("cuda"):
        raise Unavailable("Cut Cross-Entropy needs CUDA (Triton)")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"cut-cross-entropy not installed or not importable ({exc})") from None
    x, w, y = _low(case)
    return Runner(lambda: linear_cross_entropy(x, w, y), _loss_backward, [x, w],
                  notes="PLAIN CE (no normalization, no margin); fp32 dot precision follows "
                        "torch.get_float32_matmul_precision; "
                        + ("bf16 x and W" if case.precision == "bf16" else "fp32 x and W"))


def _torch_lce_options(chunked: bool):
    """The ``options`` argument of torch's linear_cross_entropy (None: its reference path), or
    Unavailable where this torch has no linear_cross_entropy (added in torch 2.13) or, for the
    chunked path, no ``torch.nn.LinearCrossEntropyOptions``."""
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy "
                          "(new in torch 2.13)")
    if not chunked:
        return None
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (chunked path)")
    return torch.nn.LinearCrossEntropyOptions()


def _torch_lce(case: Case, chunked: bool) -> Runner:
    options = _torch_lce_options(chunked)
    x, w, y = _low(case)
    fn = torch.nn.functional.linear_cross_entropy
    return Runner(lambda: fn(x, w, y, options=options), _loss_backward, [x, w],
                  notes="PLAIN CE (no normalization, no margin); "
                        + (f"options={options!r}: gradients computed in the forward" if chunked
                           else "options=None: linear then cross_entropy")
                        + "; " + ("bf16 x and W" if case.precision == "bf16" else "fp32 x and W"))


def _floor(case: Case) -> Runner:
    x, w, _ = _low(case)
    x, w = x.detach(), w.detach()
    g = torch.randn(case.B, case.C, device=x.device, dtype=x.dtype)

    def fwd():
        return torch.matmul(x, w.t())                       # [B,D]x[D,C]

    def bwd(_, retain=False):
        gx = torch.matmul(g, w)                             # [B,C]x[C,D]
        gw = torch.matmul(g.t(), x)                         # [C,B]x[B,D]
        del gx, gw                                          # stand-ins for the gradients of x and W

    return Runner(fwd, bwd, [x, w], keep={"g": g},
                  notes="3 products with torch.matmul; " + ("bf16 operands" if case.precision == "bf16"
                                                            else case.precision + " operands"))


_BUILDERS: Dict[str, Callable[[Case], Runner]] = {
    "magloss": _magloss,
    "chunked": _chunked,
    "reference": _reference,
    "eager": _eager,
    "eager-fullmatrix": lambda c: _eager(c, full_matrix=True),
    "compile": _compile,
    "pml": _pml,
    "liger": _liger,
    "cce": _cce,
    "torch-lce": lambda c: _torch_lce(c, chunked=False),
    "torch-lce-chunked": lambda c: _torch_lce(c, chunked=True),
    "floor": _floor,
    "chunked-speed": lambda c: _chunked_path(c, "speed"),
    "chunked-flat": lambda c: _chunked_path(c, "flat"),
}


def build(case: Case) -> Runner:
    """The runner for ``case``, or Unavailable(reason)."""
    if case.provider not in _BUILDERS:
        raise Unavailable(f"unknown provider {case.provider!r}; choose from {PROVIDERS}")
    if case.precision == "fp32-simt" and case.provider not in SIMT_PROVIDERS:
        raise Unavailable("fp32-simt is magloss' forced no-tensor-core path; other providers' fp32 "
                          "(TF32 off) runs are already SIMT")
    if case.precision == "bf16" and case.device == "cpu" and case.provider in ("magloss",):
        raise Unavailable("no CPU fused path")
    return _BUILDERS[case.provider](case)


def availability(device: str) -> Dict[str, Optional[str]]:
    """Provider -> None if it can run on ``device``, else the reason (a cheap import probe)."""
    out: Dict[str, Optional[str]] = {}
    for p in PROVIDERS:
        try:
            if p == "magloss":
                import magloss
                st = magloss.extension_status()
                if not device.startswith("cuda"):
                    raise Unavailable("fused engine runs on CUDA only")
                if not st["fused"]:
                    raise Unavailable(f"fused engine not active: {st['reason']}")
            elif p in ("torch-lce", "torch-lce-chunked"):
                _torch_lce_options(p == "torch-lce-chunked")
            elif p == "pml":
                import pytorch_metric_learning  # noqa: F401
            elif p in ("liger", "cce"):
                if not device.startswith("cuda"):
                    raise Unavailable("needs CUDA (Triton)")
                if p == "liger":
                    import liger_kernel.transformers  # noqa: F401
                else:
                    import cut_cross_entropy  # noqa: F401
            out[p] = None
        except Unavailable as exc:
            out[p] = str(exc)
        except Exception as exc:
            out[p] = f"not installed or not importable ({type(exc).__name__}: {exc})"
    return out
