#!/usr/bin/env python3
"""README-ready markdown from one results JSON: ratios and the performance targets of README.md (Benchmarks).

    python benchmarks/summary.py benchmarks/results/RUN.json [--subject magloss] [--B 512 --C 85742 --D 512]
    python benchmarks/summary.py benchmarks/results/cpu_chunked_RUN.json --cpu-engine

Prints (1) the ratio table of the subject (default ``magloss``, the fused engine) to eager,
torch.compile, each peer and the floor, forward+backward, at the shape of record
(B=512, C=85,742, D=512, or the nearest shape the run has), and (2) every §6 target with
the measured numbers and met / not met / not measured. A ratio below 1 means the
subject is faster. Liger and CCE compute plain cross entropy (no normalization, no margin).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.catalog import LOSS_FREE  # noqa: E402

LOSSES = ("arcface", "magface", "cosface")
PRECISIONS = ("fp32", "tf32", "bf16")
PEERS = [("eager", "eager"), ("compile", "torch.compile"), ("pml", "PML"), ("liger", "Liger (plain CE)"),
         ("cce", "CCE (plain CE)"), ("torch-lce", "F.linear_cross_entropy (plain CE)"),
         ("torch-lce-chunked", "F.linear_cross_entropy chunked (plain CE)"), ("floor", "floor")]


class Results:
    def __init__(self, doc: dict):
        self.doc = doc
        self.idx: Dict[tuple, dict] = {}
        for r in doc["results"]:
            self.idx[(r["provider"], r["loss"], r["mode"], r["precision"], r["B"], r["C"], r["D"])] = r

    def get(self, provider, loss, precision, B, C, D, mode="full") -> Optional[dict]:
        loss = LOSS_FREE.get(provider, loss)
        return self.idx.get((provider, loss, mode, precision, B, C, D))

    def ms(self, *a, **k) -> Optional[float]:
        r = self.get(*a, **k)
        return r["median_ms"] if r and r["status"] == "ok" else None

    def mem(self, *a, **k) -> Optional[float]:
        r = self.get(*a, **k)
        return r["peak_extra_mb"] if r and r["status"] == "ok" else None

    def status(self, *a, **k) -> str:
        r = self.get(*a, **k)
        return "not run" if r is None else r["status"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _x(v: Optional[float], why: str = "—") -> str:
    return why if v is None else f"{v:.2f}×"


def pick_shape(doc: dict, B=None, C=None, D=None) -> Tuple[int, int, int]:
    shapes = {(r["B"], r["C"], r["D"]) for r in doc["results"]}
    if not shapes:
        return (B or 512, C or 85742, D or 512)
    Bs = sorted({s[0] for s in shapes})
    Cs = sorted({s[1] for s in shapes})
    Ds = sorted({s[2] for s in shapes})
    B = B or (512 if 512 in Bs else Bs[-1])
    C = C or min(Cs, key=lambda c: abs(math.log(c / 85742)))
    D = D or (512 if 512 in Ds else Ds[-1])
    return B, C, D


def ratio_table(res: Results, subject: str, shape) -> List[str]:
    B, C, D = shape
    head = f"| loss | precision | {subject} ms | " + " | ".join(f"vs {n}" for _, n in PEERS) + \
           " | extra memory vs eager |"
    lines = [head, "|" + " --- |" * (4 + len(PEERS))]
    for prec in PRECISIONS + ("fp32-simt",):
        for loss in LOSSES:
            t = res.ms(subject, loss, prec, B, C, D)
            if t is None and res.get(subject, loss, prec, B, C, D) is None:
                continue
            cells = []
            for p, _ in PEERS:
                pp = "fp32" if prec == "fp32-simt" else prec        # SIMT is compared with the fp32 runs
                ref = res.ms(p, loss, pp, B, C, D)
                st = res.status(p, loss, pp, B, C, D)
                cells.append(_x(_ratio(t, ref), "—" if st == "not run" else st))
            pm = "fp32" if prec == "fp32-simt" else prec
            mem = _ratio(res.mem(subject, loss, prec, B, C, D), res.mem("eager", loss, pm, B, C, D))
            mem_s = "—" if mem is None else f"{100 * mem:.1f}%"
            ts = f"{t:.3f}" if t is not None else res.status(subject, loss, prec, B, C, D)
            lines.append(f"| {loss} | {prec} | {ts} | " + " | ".join(cells) + f" | {mem_s} |")
    return lines


def _verdict(values: List[Optional[float]], ok) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not measured"
    if len(got) < len(values):
        return ("met" if all(ok(v) for v in got) else "not met") + " (partial)"
    return "met" if all(ok(v) for v in got) else "not met"


def targets(res: Results, subject: str, shape) -> List[str]:
    B, C, D = shape
    doc = res.doc
    losses = [l for l in LOSSES if any(r["loss"] == l for r in doc["results"])] or list(LOSSES)
    rows = []

    def per_loss(fn) -> Tuple[List[Optional[float]], str]:
        vals = [fn(l) for l in losses]
        return vals, ", ".join(f"{l} {_x(v, 'n/a')}" for l, v in zip(losses, vals))

    def add(target, vals_txt, ok):
        vals, txt = vals_txt
        rows.append(f"| {target} | {txt} | {_verdict(vals, ok)} |")

    for prec, bound in (("fp32", 0.5), ("tf32", 0.25), ("bf16", 0.25)):
        add(f"fwd+bwd time ≤ {bound}× eager, {prec}",
            per_loss(lambda l, p=prec: _ratio(res.ms(subject, l, p, B, C, D), res.ms("eager", l, p, B, C, D))),
            lambda v, b=bound: v <= b)
    for prec, bound in (("fp32", 1.2), ("tf32", 1.5), ("bf16", 1.5)):
        add(f"fwd+bwd time ≤ {bound}× the bare-product floor, {prec}",
            per_loss(lambda l, p=prec: _ratio(res.ms(subject, l, p, B, C, D), res.ms("floor", l, p, B, C, D))),
            lambda v, b=bound: v <= b)
    for prec in PRECISIONS:
        vals, txt = per_loss(lambda l, p=prec: _ratio(res.mem(subject, l, p, B, C, D),
                                                      res.mem("eager", l, p, B, C, D)))
        txt = ", ".join(f"{l} {'n/a' if v is None else f'{100 * v:.1f}%'}" for l, v in zip(losses, vals))
        add(f"extra memory ≤ 5% of eager's, {prec}", (vals, txt), lambda v: v <= 0.05)
    # flat in C: the subject's extra memory over the run's C values, max / min
    Cs = sorted({r["C"] for r in doc["results"] if r["B"] == B and r["D"] == D})
    for prec in PRECISIONS:
        def flat(l, p=prec):
            ms = [res.mem(subject, l, p, B, c, D) for c in Cs]
            if len(Cs) < 2 or any(m is None for m in ms):
                return None
            return max(ms) / max(min(ms), 1e-9)
        vals, _ = per_loss(flat)
        txt = ", ".join(f"{l} {'n/a' if v is None else f'max/min {v:.2f}'}" for l, v in zip(losses, vals))
        add(f"extra memory flat in C ({', '.join(f'{c:,}' for c in Cs)}), {prec}", (vals, txt),
            lambda v: v <= 1.5)
    for peer, name in (("liger", "Liger"), ("cce", "CCE")):
        for prec in PRECISIONS:
            add(f"no slower than {name} (plain CE), {prec}",
                per_loss(lambda l, p=prec, q=peer: _ratio(res.ms(subject, l, p, B, C, D),
                                                          res.ms(q, l, p, B, C, D))),
                lambda v: v <= 1.0)
    simt = subject if subject == "magloss" else None
    add("fp32 without tensor cores (fp32-simt) ≤ 0.7× eager fp32",
        per_loss(lambda l: _ratio(res.ms(simt, l, "fp32-simt", B, C, D) if simt else None,
                                  res.ms("eager", l, "fp32", B, C, D))),
        lambda v: v <= 0.7)
    # linear in C: log-log slope of time vs C between the two largest C values
    for prec in PRECISIONS:
        def slope(l, p=prec):
            if len(Cs) < 2:
                return None
            c1, c2 = Cs[-2], Cs[-1]
            t1, t2 = res.ms(subject, l, p, B, c1, D), res.ms(subject, l, p, B, c2, D)
            if t1 is None or t2 is None:
                return None
            return math.log(t2 / t1) / math.log(c2 / c1)
        vals, _ = per_loss(slope)
        span = f"{Cs[-2]:,}→{Cs[-1]:,}" if len(Cs) >= 2 else "one C only"
        txt = ", ".join(f"{l} {'n/a' if v is None else f'slope {v:.2f}'}" for l, v in zip(losses, vals))
        add(f"time linear in C (log-log slope {span} ≤ 1.1), {prec}", (vals, txt), lambda v: v <= 1.1)
    return ["| performance target | measured (B={}, C={:,}, D={}, forward+backward) | status |".format(B, C, D),
            "| --- | --- | --- |"] + rows


def summarize(doc: dict, subject: str = "magloss", shape=None) -> str:
    res = Results(doc)
    shape = shape or pick_shape(doc)
    env = doc.get("env", {})
    B, C, D = shape
    out = [f"Run: {env.get('gpu')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit "
           f"{str(env.get('commit'))[:10]}{' (dirty)' if env.get('dirty') else ''}, {env.get('date')}; "
           f"complete={doc.get('complete')}.",
           f"Command: `{env.get('command')}`", ""]
    prov = doc.get("providers", {})
    if subject == "magloss" and not any(r["provider"] == "magloss" for r in doc["results"]):
        reason = prov.get("magloss", {}).get("reason") or "no magloss records in this run"
        out += [f"**The fused engine was not measured in this run** ({reason}): every magloss ratio and "
                "target below is 'not measured'.", ""]
    elif subject != "magloss":
        out += [f"**Subject: `{subject}`** ({prov.get(subject, {}).get('label', subject)}), not the fused "
                "engine: these ratios are NOT magloss' fused numbers.", ""]
    out += [f"Forward+backward at B={B}, C={C:,}, D={D}: {subject} time and its ratio to each alternative "
            "(below 1× = the subject is faster; the floor is the bare products, normally the lowest time). fp32-simt rows compare with the fp32 runs.", ""]
    out += ratio_table(res, subject, shape)
    missing = [f"{p} ({v.get('reason')})" for p, v in prov.items() if not v.get("available")]
    if missing:
        out += ["", "Not run: " + "; ".join(missing) + "."]
    if subject == "magloss":
        out += ["", *targets(res, subject, shape)]
    else:
        out += ["", "(The performance targets are the fused engine's; they are evaluated for `--subject magloss` only.)"]
    return "\n".join(out)


def cpu_engine_table(doc: dict, loss: str = "arcface", precision: str = "fp32") -> str:
    """The chunked engine's CPU record: per (B, C), forward+backward, its time, its ratio to the
    bare products (target ≤ 1.5×), how many times faster it is than eager and PML (target
    ≥ 2×) and than the reference, and its peak extra memory beside the reference's (target at
    the largest C: ≤ 5%)."""
    res = Results(doc)
    env = doc.get("env", {})
    shapes = sorted({(r["B"], r["C"], r["D"]) for r in doc["results"] if r["provider"] == "chunked"})
    out = [f"Run: {env.get('gpu')}, torch {env.get('torch')}, {env.get('threads')} thread(s), commit "
           f"{str(env.get('commit'))[:10]}{' (dirty)' if env.get('dirty') else ''}, {env.get('date')}; "
           f"load average at start {env.get('loadavg_start')}, end {env.get('loadavg_end')}; "
           f"complete={doc.get('complete')}.", f"Command: `{env.get('command')}`", "",
           "| B | C | chunked ms | × floor (≤ 1.5) | eager ÷ chunked (≥ 2) | PML ÷ chunked (≥ 2) "
           "| reference ÷ chunked | chunked MB | reference MB | chunked ÷ reference memory |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for B, C, D in shapes:
        t = res.ms("chunked", loss, precision, B, C, D)

        def over(p):
            return _x(_ratio(res.ms(p, loss, precision, B, C, D), t), "not run")

        m, mr = res.mem("chunked", loss, precision, B, C, D), res.mem("reference", loss, precision, B, C, D)
        share = "—" if m is None or not mr else f"{100 * m / mr:.1f}%"
        out.append(f"| {B} | {C:,} | {_fmt_ms(t)} | {_x(_ratio(t, res.ms('floor', loss, precision, B, C, D)))} "
                   f"| {over('eager')} | {over('pml')} | {over('reference')} | {_fmt_mb(m)} | {_fmt_mb(mr)} "
                   f"| {share} |")
    return "\n".join(out)


def _fmt_ms(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _fmt_mb(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:,.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--subject", default="magloss", help="provider whose ratios are reported (default magloss)")
    ap.add_argument("--B", type=int)
    ap.add_argument("--C", type=int)
    ap.add_argument("--D", type=int)
    ap.add_argument("--cpu-engine", action="store_true",
                    help="the chunked engine's CPU table (time vs floor, eager, PML, reference; memory)")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.json).read_text())
    if args.cpu_engine:
        print(cpu_engine_table(doc))
        return
    print(summarize(doc, args.subject, pick_shape(doc, args.B, args.C, args.D)))


if __name__ == "__main__":
    sys.exit(main())
