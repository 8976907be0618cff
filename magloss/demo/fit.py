"""The demo's training: one (loss, seed) run trained and measured, and many runs side by side
in worker processes with progress lines."""

from __future__ import annotations

import math
import queue as queue_mod
import time
from typing import Callable, Dict, List, Optional

import torch

from . import data as dd
from .measure import evaluate
from .model import SmallCNN, make_loss


def train_one(name: str, args, seed: int, images, labels, num_classes: int, device: torch.device,
              on_steps: Optional[Callable[[int], None]] = None) -> Dict:
    """Train backbone + loss head (``name``: a :data:`magloss.registry.LOSSES` key) for ``args.steps`` steps.

    ``images``: ``[N, C, S, S]`` float in [0, 1], ``labels``: ``[N]`` int64 in
    ``0..num_classes-1``; ``seed`` fixes the initialization, the batches and the
    augmentation. ``on_steps(k)`` is called every few steps with the number of steps done
    since the last call (progress). Returns ``{"model", "head", "history",
    "train_seconds"}``; ``history`` holds per-step loss, CE part, regularizer part (MagFace's
    g; 0 for a loss without one), mean magnitude and batch accuracy (the head's
    ``accuracy``: argmax cosine, no margin).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SmallCNN(images.shape[1], images.shape[-1], args.embedding_size, args.width,
                     dropout=args.dropout, init_magnitude=args.init_magnitude).to(device)
    head = make_loss(name, args, args.embedding_size, num_classes).to(device)
    # no weight decay on the last BatchNorm: it sets the magnitude, which the loss must control
    feat = list(model.features.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in feat)]
    groups = [
        {"params": rest + list(head.parameters()), "weight_decay": args.weight_decay},
        {"params": feat, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))
    )
    n = images.shape[0]
    batch = min(args.batch_size, n)
    hist = {"loss": [], "ce": [], "reg": [], "mean_magnitude": [], "train_accuracy": []}
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if pos + batch > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + batch]
        pos += batch
        x = dd.random_shift(images[idx], args.shift, gen)
        x = dd.random_degrade(x, args.train_degrade, gen)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        emb = model(x)
        parts = head(emb, y, return_parts=True)
        loss, ce, reg = parts.loss, float(parts.ce.detach()), float(parts.reg.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = float(head.accuracy(emb.detach(), y))
            mag = float(emb.detach().norm(dim=1).mean())
        hist["loss"].append(float(loss.detach()))
        hist["ce"].append(ce)
        hist["reg"].append(reg)
        hist["mean_magnitude"].append(mag)
        hist["train_accuracy"].append(acc)
        if on_steps is not None and ((step + 1) % 10 == 0 or step + 1 == args.steps):
            on_steps((step + 1) - 10 * (step // 10) if (step + 1) % 10 else 10)
    return {"model": model, "head": head, "history": hist, "train_seconds": time.perf_counter() - t0}


_progress_queue = None


def _worker_init(threads: int, progress_queue) -> None:
    global _progress_queue
    torch.set_num_threads(threads)
    _progress_queue = progress_queue


def run_one(task: Dict) -> Dict:
    """Train and evaluate one (loss, seed): the unit a worker process runs.

    ``task``: ``{"name", "seed", "args", "train": (images, labels, num_classes),
    "held": (images, labels), "levels", "device"}``. Returns ``{"name", "seed",
    "result", "history"}``. Progress goes as ``("steps", k)`` and ``("evaluated", 1)`` to
    ``task["report"](kind, k)`` when given (in-process), else to the worker's queue.
    """
    report = task.get("report") or (lambda kind, k: _progress_queue.put((kind, k)))
    device = torch.device(task["device"])
    tx, ty, n_cls = task["train"]
    trained = train_one(task["name"], task["args"], task["seed"], tx, ty, n_cls, device,
                        on_steps=lambda k: report("steps", k))
    hx, hy = task["held"]
    result = evaluate(trained, task["args"], task["seed"], hx, hy, device, task["levels"])
    report("evaluated", 1)
    return {"name": task["name"], "seed": task["seed"], "result": result, "history": trained["history"]}


def run_all(tasks: List[Dict], jobs: int, threads: int, progress: bool) -> List[Dict]:
    """Run the tasks, ``jobs`` at a time in worker processes (spawned; in this process when
    ``jobs == 1``), each with ``threads`` torch threads, with a progress line for training
    (steps of all runs) and one for evaluation (runs done). Results come back in task order."""
    from tqdm.auto import tqdm

    total_steps = sum(t["args"].steps for t in tasks)
    bars = {
        "steps": tqdm(total=total_steps, desc="train    ", unit="step", disable=not progress, dynamic_ncols=True),
        "evaluated": tqdm(total=len(tasks), desc="evaluate ", unit="run", disable=not progress, dynamic_ncols=True),
    }

    def report(kind, k):
        bars[kind].update(k)

    try:
        if jobs <= 1:
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return [run_one(dict(t, report=report)) for t in tasks]
            finally:
                torch.set_num_threads(old)
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch has started threads can hang
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                    initargs=(threads, q)) as pool:
            futures = [pool.submit(run_one, t) for t in tasks]
            while not all(f.done() for f in futures):
                try:
                    report(*q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
            while True:
                try:
                    report(*q.get_nowait())
                except queue_mod.Empty:
                    break
            return [f.result() for f in futures]
    finally:
        for b in bars.values():
            b.close()
