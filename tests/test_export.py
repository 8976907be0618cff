"""magloss.export: ONNX graphs of a backbone, run by onnxruntime against torch (float64 references)."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from magloss import export as E
from magloss.backbones import build_backbone

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _backbone(seed=0, size=(16, 32), d=24):
    """A tiny IResNet with non-trivial BatchNorm statistics (so folding has something to fold)."""
    torch.manual_seed(seed)
    net = build_backbone("tiny", d, size)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
                if m.weight.requires_grad:
                    m.weight.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    return net.eval()


def _reference(net, x):
    """Unit embedding and magnitude of the backbone's raw output, float64 (layer by layer: IResNet's
    forward runs its FC layer in float32)."""
    n = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        e = n.features(n.fc(torch.flatten(n.bn(n.stages(n.stem(x.double()))), 1)))
    m = e.norm(dim=1)
    return (e / m[:, None]).numpy(), m.numpy()


def test_folded_batchnorms_compute_the_same_function():
    net = _backbone(1)
    x = torch.rand(5, 3, 16, 32, dtype=torch.float64) * 2 - 1
    folded = E.embedding_model(net, fold_batchnorm=True).double()
    emb, mag = folded(x)
    want_e, want_m = _reference(net, x)
    # the folded weights are stored in float32: agreement to its rounding, not to float64's
    np.testing.assert_allclose(emb.detach().numpy(), want_e, atol=1e-6)
    np.testing.assert_allclose(mag.detach().numpy(), want_m, rtol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())


@pytest.mark.parametrize("fold", [True, False])
def test_fp32_graph_matches_torch_at_every_batch(tmp_path, fold):
    net = _backbone(2)
    r = E.export_onnx(net, str(tmp_path / "m.onnx"), fold_batchnorm=fold, check_batches=(1, 3))
    assert r["check"]["embedding"] < 1e-5 and r["check"]["magnitude_rel"] < 1e-5
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 16, 32]
    assert [o.name for o in sess.get_outputs()] == ["embedding", "magnitude"]
    for b in (1, 2, 7, 33):
        x = torch.rand(b, 3, 16, 32, generator=torch.Generator().manual_seed(b)) * 2 - 1
        emb, mag = sess.run(None, {"images": x.numpy()})
        want_e, want_m = _reference(net, x)
        assert emb.dtype == np.float32 and emb.shape == (b, 24) and mag.shape == (b,)
        np.testing.assert_allclose(emb, want_e, atol=2e-6)
        np.testing.assert_allclose(mag, want_m, rtol=2e-6)
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    (gemm,) = [n for n in nodes if n.op_type in ("Gemm", "MatMul")]
    after_fc = {n.op_type for n in nodes if gemm.output[0] in n.input}
    assert ("BatchNormalization" in after_fc) == (not fold)  # folded: no BatchNorm on the 2-D embedding


def test_fp16_graph_has_half_input_float_outputs(tmp_path):
    net = _backbone(3)
    r = E.export_onnx(net, str(tmp_path / "h.onnx"), precision="fp16", check_batches=(1, 4))
    sess = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)"
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
    x = (torch.rand(6, 3, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).half()
    emb, mag = sess.run(None, {"images": x.numpy()})
    want_e, want_m = _reference(net, x.float())
    assert np.abs(emb - want_e).max() < 2e-2 and np.abs(mag / want_m - 1).max() < 2e-2
    assert 0 < r["check"]["embedding"] < 2e-2  # half precision does differ, within bounds


def test_model_pt_round_trip_and_cli(tmp_path):
    net = _backbone(4)
    torch.save({"network": "tiny", "embedding_size": 24, "input_size": [16, 32], "dropout": 0.0,
                "state_dict": net.state_dict()}, tmp_path / "model.pt")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "magloss.export", str(tmp_path / "model.pt"), str(tmp_path / "c.onnx"),
                          "--check", "1,5"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "batch 1: max |Δ| embedding" in run.stdout and "batch 5" in run.stdout
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 16, 32) * 2 - 1
    np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], _reference(net, x)[0], atol=2e-6)


@pytest.mark.parametrize("kw, needle", [
    ({"model": "missing.pt"}, "MODEL: .*not found"),
    ({"model": "bad.pt"}, "MODEL: .*not a model.pt"),
    ({"precision": "int8"}, "precision"),
    ({"opset": 3}, "opset"),
])
def test_bad_input_is_named(tmp_path, kw, needle):
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    model = kw.pop("model", None)
    model = str(tmp_path / model) if model else _backbone()
    with pytest.raises(E.ExportError, match=needle):
        E.export_onnx(model, str(tmp_path / "x.onnx"), **kw)
    assert not (tmp_path / "x.onnx").exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []
