"""Export a trained backbone to ONNX with a dynamic batch, checked with onnxruntime.

``python -m magloss.export OUTPUT/model.pt model.onnx [--fp16]`` writes a graph with

* input ``images``: ``[batch, 3, H, W]`` float32 (float16 with ``--fp16``), RGB, pixels
  normalized as in training, ``(p - 127.5) / 127.5``; ``batch`` is dynamic;
* output ``embedding``: ``[batch, D]`` float32, the L2-normalized embedding;
* output ``magnitude``: ``[batch]`` float32, the norm of the raw embedding (MagFace's
  quality score: larger for clearer faces).

The raw embedding is ``embedding * magnitude[:, None]``. Both outputs are float32 in
the fp16 graph too: the backbone's FC layer, its last BatchNorm and the normalization
run in float32 (as :class:`magloss.backbones.IResNet` runs them under autocast), so a
magnitude near 100 keeps its precision.

Graph simplifications for importers (:func:`embedding_model`, on by default): the
last two BatchNorms (``BatchNorm2d`` before the flatten, ``BatchNorm1d`` after the FC)
are folded into the FC layer, since ONNX importers such as older TensorRT releases
reject ``BatchNormalization`` on a 2-D tensor; PReLU is exported as ONNX ``PRelu``
with its slope shaped ``[C, 1, 1]`` (broadcastable), as the exporter does.

The check (:func:`check_onnx`) runs the file with onnxruntime's CPU provider at batch
1 and several other sizes and reports the largest absolute difference of each output
from the float32 torch model.

Needs ``pip install 'magloss[export]'`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = ["EmbeddingModel", "embedding_model", "export_onnx", "check_onnx", "load_backbone", "main"]

DEFAULT_OPSET = 17
DEFAULT_CHECK_BATCHES = (1, 2, 5, 16)


class ExportError(Exception):
    """Bad input to the export command (names the file or option and what was expected)."""


class EmbeddingModel(nn.Module):
    """``images [B, 3, H, W]`` → ``(embedding [B, D] unit-norm float32, magnitude [B] float32)``.

    ``eps`` (default 1e-12) bounds the divisor of a zero embedding.
    """

    def __init__(self, backbone: nn.Module, eps: float = 1e-12) -> None:
        super().__init__()
        self.backbone = backbone
        self.eps = float(eps)

    def forward(self, images: torch.Tensor):
        e = self.backbone(images).float()
        magnitude = torch.linalg.vector_norm(e, dim=1)
        return e / magnitude.clamp_min(self.eps)[:, None], magnitude


class _FoldedIResNet(nn.Module):
    """An IResNet whose output BatchNorms are folded into the FC layer (same function in eval)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem, self.stages, self.input_size = net.stem, net.stages, net.input_size
        fc, bn2, bn1 = net.fc, net.bn, net.features
        with torch.no_grad():
            w = fc.weight.double()
            b = fc.bias.double() if fc.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            # BatchNorm2d(x) = s2·x + t2 per channel, flattened as channel-major (c, h, w)
            s2 = bn2.weight.double() / torch.sqrt(bn2.running_var.double() + bn2.eps)
            t2 = bn2.bias.double() - bn2.running_mean.double() * s2
            hw = w.shape[1] // s2.numel()
            s2f, t2f = s2.repeat_interleave(hw), t2.repeat_interleave(hw)
            b = b + w @ t2f
            w = w * s2f[None, :]
            # BatchNorm1d(y) = s1·y + t1
            s1 = bn1.weight.double() / torch.sqrt(bn1.running_var.double() + bn1.eps)
            t1 = bn1.bias.double() - bn1.running_mean.double() * s1
            self.fc = nn.Linear(w.shape[1], w.shape[0])
            self.fc.weight.copy_((w * s1[:, None]).float())
            self.fc.bias.copy_((b * s1 + t1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.stages(self.stem(x)), 1)
        return self.fc(x.to(self.fc.weight.dtype))  # float32 FC after a float16 body, as IResNet


def embedding_model(backbone: nn.Module, fold_batchnorm: bool = True, half: bool = False) -> EmbeddingModel:
    """The module that is exported: a copy of ``backbone`` in eval mode wrapped by :class:`EmbeddingModel`.

    Args:
        backbone: a :class:`magloss.backbones.IResNet` (or any module ``[B, 3, H, W]`` → ``[B, D]``;
            folding needs the IResNet layout: ``stem``, ``stages``, ``bn``, ``fc``, ``features``).
        fold_batchnorm: fold the output BatchNorms into the FC layer (default True).
        half: convert the convolutional body to float16; the FC layer and what follows stay float32.
    """
    net = copy.deepcopy(backbone).eval()
    if fold_batchnorm:
        if not all(hasattr(net, a) for a in ("stem", "stages", "bn", "fc", "features")):
            raise ExportError("fold_batchnorm: the backbone is not a magloss IResNet (stem, stages, bn, fc, "
                              "features); pass fold_batchnorm=False")
        net = _FoldedIResNet(net).eval()
    if half:
        net = net.half()
        net.fc.float()
        if hasattr(net, "features"):
            net.features.float()
    return EmbeddingModel(net).eval()


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'magloss[export]'") from exc


def _input_size(backbone: nn.Module):
    size = getattr(backbone, "input_size", None)
    if size is None:
        raise ExportError("backbone: it has no input_size (H, W); a magloss IResNet has one")
    return tuple(int(v) for v in size)


def load_backbone(model: Union[str, nn.Module], what: str = "MODEL") -> nn.Module:
    """``model`` itself when a module, else :func:`magloss.train.load_model` of the path (eval mode, CPU).

    Raises:
        ExportError: naming ``what`` (the argument), a missing file or one that is not a model.pt.
    """
    if isinstance(model, nn.Module):
        return model
    from .train import load_model

    if not os.path.isfile(model):
        raise ExportError(f"{what}: {model!r} not found (expected a training run's OUTPUT/model.pt)")
    try:
        return load_model(model)
    except Exception as exc:
        raise ExportError(f"{what}: {model!r} is not a model.pt of python -m magloss.train (a dict with network, "
                          f"embedding_size, input_size, dropout, state_dict): {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]}") from None


def export_onnx(model: Union[str, nn.Module], out: str, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                fold_batchnorm: bool = True, check_batches: Optional[Sequence[int]] = DEFAULT_CHECK_BATCHES,
                seed: int = 0) -> Dict:
    """Export a backbone to ONNX (dynamic batch) and check it with onnxruntime.

    Args:
        model: a backbone module, or the path of ``OUTPUT/model.pt`` (:func:`magloss.train.load_model`).
        out: the ``.onnx`` file (written under a temporary name, renamed when complete).
        precision: ``"fp32"`` (default) or ``"fp16"`` (float16 input and body; outputs float32).
        opset: ONNX opset (default 17; TorchScript-based exporter).
        fold_batchnorm: see :func:`embedding_model`.
        check_batches: batch sizes for :func:`check_onnx` (default 1, 2, 5, 16); None or empty: no check.
        seed: of the random check images.

    Returns:
        dict: ``path``, ``precision``, ``opset``, ``input_size`` (H, W), ``embedding_size``,
        ``operators`` (sorted ONNX op types), ``check`` (:func:`check_onnx`'s result or None).

    Raises:
        ExportError: a bad option or model file (named). ImportError: onnx/onnxruntime missing.
    """
    _require_onnx()
    import onnx

    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision: expected 'fp32' or 'fp16', got {precision!r}")
    if not 7 <= int(opset) <= 21:
        raise ExportError(f"opset: expected an ONNX opset in 7 .. 21 (17 recommended), got {opset}")
    backbone = load_backbone(model)
    h, w = _input_size(backbone)
    wrapped = embedding_model(backbone, fold_batchnorm, half=precision == "fp16")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    example = torch.zeros(2, 3, h, w, dtype=dtype)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapped, (example,), tmp, input_names=["images"], output_names=["embedding", "magnitude"],
                              dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}, "magnitude": {0: "batch"}},
                              opset_version=int(opset), do_constant_folding=True, dynamo=False)
        graph = onnx.load(tmp)
        onnx.checker.check_model(graph)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    report = {"path": out, "precision": precision, "opset": int(opset), "input_size": (h, w),
              "embedding_size": int(wrapped(example[:1])[0].shape[1]),
              "operators": sorted({n.op_type for n in graph.graph.node}), "check": None}
    if check_batches:
        report["check"] = check_onnx(out, backbone, check_batches, seed=seed)
    return report


def check_onnx(path: str, backbone: nn.Module, batches: Sequence[int] = DEFAULT_CHECK_BATCHES, seed: int = 0) -> Dict:
    """Run ``path`` with onnxruntime (CPU) against the float32 torch backbone.

    For each batch size ``b``: random images ``[b, 3, H, W]`` (uniform in ``[-1, 1]``, float32,
    cast to the graph's input type) go through both; the torch side is
    :class:`EmbeddingModel` over ``backbone`` unfolded, in float32.

    Returns:
        dict: ``batches`` maps each batch size b to ``{"embedding": e, "magnitude": m, "magnitude_rel": r}``,
        e and m the largest absolute differences of the embedding and of the magnitude, r the largest
        difference of the magnitude relative to torch's; ``embedding``, ``magnitude`` and ``magnitude_rel``
        hold the worst over the batches.
    """
    _require_onnx()
    import onnxruntime as ort

    batches = [int(b) for b in batches]
    if not batches or min(batches) < 1:
        raise ExportError(f"check batches: expected positive batch sizes, got {batches}")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_type = sess.get_inputs()[0].type
    np_dtype = np.float16 if "float16" in in_type else np.float32
    reference = EmbeddingModel(copy.deepcopy(backbone).float().eval()).eval()
    h, w = _input_size(backbone)
    gen = torch.Generator().manual_seed(int(seed))
    out = {"batches": {}}
    for b in batches:
        x = torch.rand(b, 3, h, w, generator=gen) * 2 - 1
        x = x.to(torch.float16).float() if np_dtype == np.float16 else x  # both sides see the same pixels
        with torch.no_grad():
            emb, mag = reference(x)
        got_emb, got_mag = sess.run(["embedding", "magnitude"], {"images": x.numpy().astype(np_dtype)})
        if got_emb.shape != tuple(emb.shape) or got_mag.shape != tuple(mag.shape):
            raise ExportError(f"{path}: batch {b}: output shapes {got_emb.shape}, {got_mag.shape}; torch gives "
                              f"{tuple(emb.shape)}, {tuple(mag.shape)}")
        d_mag = np.abs(got_mag.astype(np.float64) - mag.double().numpy())
        out["batches"][b] = {"embedding": float(np.abs(got_emb.astype(np.float64) - emb.double().numpy()).max()),
                             "magnitude": float(d_mag.max()),
                             "magnitude_rel": float((d_mag / np.maximum(mag.double().numpy(), 1e-12)).max())}
    for k in ("embedding", "magnitude", "magnitude_rel"):
        out[k] = max(r[k] for r in out["batches"].values())
    return out


def _batches(text: str):
    try:
        v = [int(t) for t in text.split(",") if t.strip()]
        if min(v) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes, got {text!r}") from None
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m magloss.export``: exit status 2 and a one-line error on bad input,
    1 when the onnxruntime check exceeds ``--tolerance``."""
    p = argparse.ArgumentParser(prog="python -m magloss.export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Export a trained backbone (OUTPUT/model.pt of python -m magloss.train) to "
                                            "ONNX with a dynamic batch; outputs 'embedding' (unit norm) and 'magnitude'.")
    p.add_argument("model", help="model.pt of a training run")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--fp16", action="store_true", help="float16 input and body (outputs stay float32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--no-fold", action="store_true", help="keep the output BatchNorms (no folding into the FC layer)")
    p.add_argument("--check", type=_batches, default=list(DEFAULT_CHECK_BATCHES), help="onnxruntime check batch sizes")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--tolerance", type=float, default=None,
                   help="fail (exit 1) when the largest |Δ| of the embedding exceeds it (default: 1e-4 fp32, 1e-2 fp16)")
    a = p.parse_args(argv)
    try:
        r = export_onnx(a.model, a.out, precision="fp16" if a.fp16 else "fp32", opset=a.opset,
                        fold_batchnorm=not a.no_fold, check_batches=None if a.no_check else a.check)
    except (ExportError, ImportError, OSError) as exc:
        p.error(str(exc))
    print(f"wrote {r['path']}: {r['precision']}, opset {r['opset']}, input [batch, 3, "
          f"{r['input_size'][0]}, {r['input_size'][1]}], embedding {r['embedding_size']}; operators: {' '.join(r['operators'])}")
    if r["check"] is None:
        return 0
    for b, d in r["check"]["batches"].items():
        print(f"  onnxruntime vs torch, batch {b}: max |Δ| embedding {d['embedding']:.3g}, magnitude {d['magnitude']:.3g} "
              f"(relative {d['magnitude_rel']:.3g})")
    tol = a.tolerance if a.tolerance is not None else (1e-2 if a.fp16 else 1e-4)
    if r["check"]["embedding"] > tol:
        print(f"error: the embedding differs by {r['check']['embedding']:.3g} > tolerance {tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
