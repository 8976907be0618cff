"""CPU smoke test of the benchmark suite (benchmarks/): not a timed test.

* The eager baseline computes the same loss and gradients as magloss' reference (float64).
* The harness runs a tiny grid end to end: JSON schema, markdown table, resume, merge,
  out-of-memory recording, plots and the README summary.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import magloss  # noqa: E402
from benchmarks import eager  # noqa: E402
from benchmarks import providers as P  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402

REFERENCE = {
    "arcface": magloss.functional.arcface_loss,
    "cosface": magloss.functional.cosface_loss,
    "magface": magloss.functional.magface_loss,
}


def _inputs(B=24, C=37, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    # magnitudes below, inside and above MagFace's [l_a, u_a] = [10, 110]
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(4.0, 140.0, B, dtype=torch.float64)[:, None]
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * 1.7
    y = torch.randint(0, C, (B,), generator=g)
    # rows whose label centre points away: θ + m > π (ArcFace's threshold branch), c < 0 (easy margin)
    for i in range(3):
        w[y[i]] = -x[i] / x[i].norm() * (1.0 + i) + 0.01 * torch.randn(D, generator=g, dtype=torch.float64)
    return x, w, y


@pytest.mark.parametrize("loss", ["arcface", "magface", "cosface"])
@pytest.mark.parametrize("full_matrix", [False, True])
def test_eager_matches_reference_float64(loss, full_matrix):
    x, w, y = _inputs()
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    le = eager.eager_loss(loss, full_matrix)(xe, we, y)
    le.backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    lr = REFERENCE[loss](xr, wr, y)
    lr.backward()
    assert le.dtype == torch.float64
    torch.testing.assert_close(le, lr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(we.grad, wr.grad, rtol=1e-10, atol=1e-12)


def test_eager_threshold_branch_is_exercised():
    x, w, y = _inputs()
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).t()
    c_y = cos.gather(1, y[:, None]).squeeze(1)
    assert (c_y < -0.9).any()          # past θ = π − m for m = 0.5
    assert ((c_y > 0) & (c_y < 1)).any()


TINY = ["--device", "cpu", "--grid", "ci", "--B", "4", "--C", "50,80", "--D", "8", "--losses", "arcface,magface",
        "--precisions", "fp32,bf16", "--providers", "magloss,reference,eager,floor,liger,cce",
        "--iters", "2", "--min-iters", "1", "--warmup", "1", "--case-seconds", "0"]

ENV_KEYS = {"gpu", "torch", "cuda", "commit", "command", "date", "dirty", "magloss_extension", "timer"}
RECORD_KEYS = {"provider": str, "loss": str, "mode": str, "precision": str, "B": int, "C": int, "D": int,
               "status": str}
NUMBERS = ("median_ms", "p20_ms", "p80_ms")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    doc = bench_run.main([*TINY, "--out", str(out)])
    return out, doc


def test_harness_json_schema(tiny_run):
    out, doc = tiny_run
    on_disk = json.loads(out.read_text())
    assert on_disk["results"] == doc["results"]
    assert ENV_KEYS <= set(on_disk["env"])
    assert on_disk["env"]["timer"] == "time.perf_counter"
    assert "benchmarks/run.py" in on_disk["env"]["command"]
    assert on_disk["complete"] is True
    recs = on_disk["results"]
    assert recs
    for r in recs:
        for k, t in RECORD_KEYS.items():
            assert isinstance(r[k], t), (k, r)
        assert r["mode"] in ("fwd", "bwd", "full")
        assert r["precision"] in ("fp32", "tf32", "bf16", "fp32-simt")
        assert "peak_extra_mb" in r and r["peak_extra_mb"] is None       # CPU: no allocator statistics
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0 and r["products"] == {"fwd": 1, "bwd": 2, "full": 3}[r["mode"]]
    got = {(r["provider"], r["loss"], r["precision"], r["C"]) for r in recs}
    for prov, loss in (("eager", "arcface"), ("eager", "magface"), ("reference", "magface"), ("floor", "matmul")):
        for prec in ("fp32", "bf16"):
            for C in (50, 80):
                assert (prov, loss, prec, C) in got
    # each case has the three modes
    assert {r["mode"] for r in recs if r["provider"] == "eager"} == {"fwd", "bwd", "full"}
    # on CPU the fused engine is never claimed: no "magloss" records, and the reason is recorded
    assert not any(r["provider"] == "magloss" for r in recs)
    assert on_disk["providers"]["magloss"]["available"] is False
    assert on_disk["providers"]["magloss"]["reason"]
    for peer in ("liger", "cce"):
        assert on_disk["providers"][peer]["available"] is False


def test_harness_markdown_table(tiny_run, capsys):
    out, doc = tiny_run
    table = bench_run.markdown_table(doc["results"])
    lines = table.splitlines()
    assert lines[0].startswith("| provider | loss | precision | B | C | D | mode | median ms | p20 ms | p80 ms")
    assert len(lines) == 2 + len(doc["results"])
    assert any("| eager | magface | bf16 | 4 | 80 | 8 | full |" in line for line in lines)


def test_harness_resume_and_merge(tiny_run, tmp_path):
    out, doc = tiny_run
    copy = tmp_path / "resumed.json"
    copy.write_text(out.read_text())
    again = bench_run.main([*TINY, "--out", str(copy), "--resume", "--quiet"])
    assert len(again["results"]) == len(doc["results"])          # nothing left to run
    assert again["resumed_from"]
    # a run cut short by --max-seconds is marked incomplete, and --resume finishes it
    part = tmp_path / "part.json"
    cut = bench_run.main([*TINY, "--providers", "eager", "--out", str(part), "--max-seconds", "0", "--quiet"])
    assert cut["complete"] is False and len(cut["results"]) <= 3
    done = bench_run.main([*TINY, "--providers", "eager", "--out", str(part), "--resume", "--quiet"])
    assert done["complete"] is True and len(done["results"]) == 2 * 2 * 2 * 3
    merged = bench_run.main(["--merge", str(out), str(part), "--out", str(tmp_path / "m.json"), "--quiet"])
    assert len(merged["results"]) == len(doc["results"])


def test_harness_records_out_of_memory(tmp_path, monkeypatch):
    def boom(case):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(P._BUILDERS, "floor", boom)
    doc = bench_run.main([*TINY, "--providers", "floor", "--precisions", "fp32", "--out", str(tmp_path / "o.json"),
                          "--quiet"])
    assert {r["status"] for r in doc["results"]} == {"oom"}
    assert len(doc["results"]) == 2 * 3                  # every C and mode recorded, none dropped
    assert all(r["median_ms"] is None for r in doc["results"])


def test_plots_and_summary(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot, summary

    out, doc = tiny_run
    paths = plot.make_plots(out, tmp_path)
    assert {p.name for p in paths} == {f"tiny_B4_{k}.png" for k in ("time", "memory", "ratio_eager", "ratio_floor")}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    text = summary.summarize(doc)
    assert "The fused engine was not measured" in text
    assert "| performance target |" in text and "not measured" in text
    ref = summary.summarize(doc, subject="reference")
    assert "NOT magloss' fused numbers" in ref
    assert "| arcface | fp32 |" in ref


@pytest.mark.skipif(not __import__("benchmarks.cpu_memory", fromlist=["supported"]).supported(),
                    reason="needs Linux /proc/self/clear_refs")
def test_interleaved_run_with_fresh_process_memory(tmp_path):
    """--interleave times every provider of a shape in rounds (the same number of calls each,
    the load average recorded); --cpu-memory measures each case in a fresh process: the
    reference's extra memory holds B×C matrices, the chunked engine's does not grow with C."""
    args = ["--device", "cpu", "--grid", "ci", "--providers", "chunked,reference", "--losses", "arcface",
            "--precisions", "fp32", "--modes", "full", "--B", "32", "--C", "8000,40000", "--D", "16",
            "--interleave", "--cpu-memory", "--threads", "1", "--min-iters", "2", "--case-seconds", "0",
            "--warmup", "0", "--quiet", "--out", str(tmp_path / "i.json")]
    doc = bench_run.main(args)
    recs = {(r["provider"], r["C"]): r for r in doc["results"]}
    assert set(recs) == {(p, c) for p in ("chunked", "reference") for c in (8000, 40000)}
    assert all(r["status"] == "ok" and r["interleaved"] and r["iters"] == 2 and len(r["loadavg"]) == 3
               for r in recs.values())
    # Both C above the engine's widest chunk (4096 columns): below it the chunk, and so the tiles,
    # are narrower, which is not growth with C. One float32 B×C matrix at C = 40,000: 4.9 MB.
    bxc_mb = 32 * 40000 * 4 / 2**20
    assert recs[("reference", 40000)]["peak_extra_mb"] >= 2 * bxc_mb
    assert recs[("chunked", 40000)]["peak_extra_mb"] < bxc_mb
    assert recs[("chunked", 40000)]["peak_extra_mb"] - recs[("chunked", 8000)]["peak_extra_mb"] < 0.25 * bxc_mb


# ---- torch's own fused head: torch.nn.functional.linear_cross_entropy (plain CE) -------------------
TORCH_LCE = ["torch-lce", "torch-lce-chunked"]
HAS_LCE = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


@pytest.mark.skipif(not HAS_LCE, reason=f"torch {torch.__version__} has no linear_cross_entropy")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", TORCH_LCE)
@pytest.mark.parametrize("shape", [(5, 37, 16), (70, 300, 24)], ids=lambda s: "B%d-C%d-D%d" % s)
def test_torch_linear_cross_entropy_provider_is_plain_ce(provider, precision, shape):
    """Both providers compute F.cross_entropy(x @ Wᵀ, y) on the harness's inputs (no normalization,
    no margin): loss and gradients against float64 on the same (rounded) inputs."""
    B, C, D = shape
    case = P.Case(provider, "arcface", precision, B, C, D)
    runner = P.build(case)
    assert provider in P.PLAIN_CE and P.LOSS_FREE[provider] == "plain-ce"
    x, w = runner.leaves
    assert x.dtype == w.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    loss = runner.fwd()
    runner.bwd(loss, False)
    _, _, y = P.make_inputs(case)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64 @ w64.T, y)
    ref.backward()
    # bf16: the products of rounded operands accumulate in bf16-rounded outputs (about 3 significant digits)
    rtol = {"fp32": 2e-5, "bf16": 3e-2}[precision]
    for got, want in ((loss, ref.detach()), (x.grad, x64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("missing,providers", [
    ("functional", TORCH_LCE),                   # torch < 2.13 (the GPU machine's 2.11): both unavailable
    ("options", ["torch-lce-chunked"]),          # the function without the options class: chunked only
])
def test_torch_linear_cross_entropy_unavailable_cleanly(monkeypatch, missing, providers):
    if missing == "functional":
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    else:
        monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", lambda *a, **k: None, raising=False)
        monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)
    avail = P.availability("cpu")
    for p in TORCH_LCE:
        case = P.Case(p, "arcface", "fp32", 4, 10, 8)
        if p in providers:
            with pytest.raises(P.Unavailable, match=re.escape(f"torch {torch.__version__} has no torch.nn")):
                P.build(case)
            assert f"torch {torch.__version__} has no" in avail[p]
        else:
            assert avail[p] is None
            P.build(case)
