"""Train a small face-recognition-style model with a class-sharded margin head.

The backbone (a small CNN) is data-parallel under DistributedDataParallel; the head's
class matrix is split across the ranks (model parallel over classes) with
:mod:`magloss.distributed`, optionally with Partial FC sampling. Data is synthetic:
every class has a fixed random 3×32×32 template, a sample is its template plus noise.

CPU (gloo), two processes, five steps::

    torchrun --nproc_per_node=2 examples/train_sharded.py --steps 5

GPUs (NCCL), one process per GPU, mixed precision and Partial FC at 10 %::

    torchrun --nproc_per_node=8 examples/train_sharded.py --device cuda --amp \\
        --num-classes 1000000 --sample-rate 0.1 --loss magface --steps 1000

Run without torchrun it trains on a single process (world size 1). ``--save DIR``
writes a checkpoint that ``--resume DIR`` reads back at any world size (the class
matrix and its optimizer state are resharded; see magloss.checkpoint). ``--steps`` is
the total: a resumed run continues from the checkpoint's step up to it, and at the same
world size it computes exactly what an uninterrupted run would have. The checkpoint holds:

* the class matrix and its SGD momentum, sharded (``checkpoint.save_class_matrix``);
* ``backbone.pt``: the backbone's weights and BatchNorm statistics;
* ``trainer.pt``: the step reached, the backbone's SGD momentum, the head's replicated
  state (Partial FC's sampling step, SphereFace's iteration, AdaFace's and
  CurricularFace's statistics, ElasticFace's margin generator), the GradScaler state
  and the options a resume must repeat (loss, seed, sample rate).

The data order needs no saved state: the batch of rank ``r`` at step ``t`` is drawn
from a generator seeded by ``(seed, t, r)`` alone (:func:`batch_generator`), so
restoring the step restores it, at any world size.

Gradient scale: the sharded loss is the global mean over every rank's rows and is the
same on every rank. DDP averages the backbone's gradients over ranks; the sharded head
compensates by default (``ddp_backbone=True``: it multiplies the embeddings' gradient by
the world size), so the backbone receives exactly the gradient of the global mean loss,
like the head.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import magloss  # noqa: F401
except ImportError:        # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import magloss.distributed as mdist  # noqa: E402
from magloss import checkpoint, registry  # noqa: E402
from magloss.distributed.partial_fc import sampling_generator  # noqa: E402

#: every loss that has a class-sharded twin, by its registry name
LOSSES = {name: registry.sharded(name) for name in registry.LOSSES if registry.sharded(name) is not None}
#: what --save writes besides the sharded class matrix
BACKBONE_FILE, TRAINER_FILE = "backbone.pt", "trainer.pt"
#: the options a resumed run must repeat
RESUME_MUST_MATCH = ("loss", "num_classes", "embedding_size", "seed", "sample_rate")
#: keeps the data streams apart from Partial FC's sampling streams, seeded by (seed, step, rank) too
_DATA_SALT = 0x5EEDDA7A


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=sorted(LOSSES), default="arcface")
    p.add_argument("--num-classes", type=int, default=1000, help="global class count C (default 1000)")
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=20, help="total steps; --resume continues from the saved step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC rate in (0, 1]; 1 = full softmax")
    p.add_argument("--amp", action="store_true", help="autocast: float16 + GradScaler on CUDA, bfloat16 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", help="save backbone and sharded head here at the end")
    p.add_argument("--resume", metavar="DIR", help="resume from a --save DIR: backbone, head, the optimizer "
                   "state of both, the step, Partial FC's sampler and the data order")
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size <= 0 or args.num_classes <= 0:
        p.error("--steps must be >= 0, --batch-size and --num-classes > 0")
    return args


class Backbone(nn.Module):
    """Three strided conv blocks and a linear embedding: [N, 3, 32, 32] -> [N, D]."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.embed = nn.Linear(128, embedding_size)

    def forward(self, x):
        return self.embed(self.features(x))


def batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of rank ``rank``'s batch at ``step``: a function of (seed, step, rank) only."""
    return sampling_generator(seed ^ _DATA_SALT, step, rank)


def save_trainer(path: str, step: int, args, head, backbone, optimizer, scaler) -> None:
    """Rank 0 writes ``trainer.pt``: everything but the weights that a resume needs (replicated on every rank)."""
    replicated = {k: v for k, v in head.state_dict().items() if k != "weight"}    # buffers and extra state
    momentum = [{k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
                for p in backbone.parameters()]
    torch.save({"step": step, "head_state": replicated, "backbone_optimizer": momentum, "scaler": scaler.state_dict(),
                "options": {k: getattr(args, k) for k in RESUME_MUST_MATCH}}, os.path.join(path, TRAINER_FILE))


def read_trainer(path: str, args) -> dict:
    """``trainer.pt`` of a ``--save`` directory, checked against this run's options (before any process
    group exists, so that a wrong ``--resume`` stops every rank with one clear message)."""
    files = [os.path.join(path, f) for f in (BACKBONE_FILE, TRAINER_FILE)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"--resume {path}: missing {', '.join(missing)} (write the checkpoint with --save)")
    state = torch.load(files[1], map_location="cpu", weights_only=True)
    for k, saved in state["options"].items():
        if saved != getattr(args, k):
            raise SystemExit(f"--resume {path}: the checkpoint was trained with --{k.replace('_', '-')} {saved}, "
                             f"this run asks for {getattr(args, k)}")
    return state


def resume(path: str, state: dict, head, backbone, optimizer, scaler, device) -> int:
    """Load a ``--save`` directory (``state``: its :func:`read_trainer`) into the modules and the
    optimizer; return the step to continue from."""
    backbone.load_state_dict(torch.load(os.path.join(path, BACKBONE_FILE), map_location=device, weights_only=True))
    checkpoint.load_class_matrix(path, head, optimizer)        # weight rows and their momentum, resharded
    missing, unexpected = head.load_state_dict(state["head_state"], strict=False)
    if unexpected or missing != ["weight"]:
        raise SystemExit(f"--resume {path}: the head's state does not match (missing {missing}, extra {unexpected})")
    for p, st in zip(backbone.parameters(), state["backbone_optimizer"]):
        optimizer.state[p] = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in st.items()}
    if state["scaler"]:                # empty when saved without CUDA AMP
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def setup():
    """Initialize the process group from torchrun's environment (or as a world of 1)."""
    if "RANK" not in os.environ:                 # plain `python examples/train_sharded.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
    return int(os.environ["LOCAL_RANK"])


def main(argv=None):
    args = parse_args(argv)
    trainer_state = read_trainer(args.resume, args) if args.resume else None
    local_rank = setup()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)                  # same backbone init on every rank (DDP also broadcasts)

    backbone = Backbone(args.embedding_size).to(device)
    head = LOSSES[args.loss](args.embedding_size, args.num_classes, sample_rate=args.sample_rate,
                             seed=args.seed, device=device)
    model = DDP(backbone, device_ids=[local_rank] if use_cuda else None)
    # The head is NOT wrapped in DDP: each rank owns different classes.
    optimizer = torch.optim.SGD([{"params": model.parameters()}, {"params": head.parameters()}],
                                lr=args.lr, momentum=0.9)
    amp_dtype = torch.float16 if use_cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and use_cuda)
    start = 0
    if args.resume:
        start = resume(args.resume, trainer_state, head, backbone, optimizer, scaler, device)
        if rank == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)

    # Synthetic data: the same class templates on every rank, a different stream of samples per rank.
    templates = torch.randn(args.num_classes, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))

    if rank == 0:
        print(f"world={world} device={device} loss={args.loss} C={args.num_classes} "
              f"shard sizes={[mdist.shard_range(args.num_classes, world, r) for r in range(world)]} "
              f"sample_rate={args.sample_rate} amp={args.amp}", flush=True)
    model.train()
    head.train()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        data_gen = batch_generator(args.seed, step, rank)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=data_gen)
        images = templates[labels] + 0.5 * torch.randn(args.batch_size, 3, 32, 32, generator=data_gen)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            embeddings = model(images)
            loss = head(embeddings, labels)        # the head compensates DDP's averaging
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        if rank == 0:
            kept = "all" if head.last_sample is None else f"{head.last_sample.numel()}/{head.num_local}"
            print(f"step {step:4d}  loss {loss.item():9.4f}  classes kept on rank 0: {kept}  "
                  f"{(time.perf_counter() - t0) * 1e3:7.1f} ms", flush=True)

    if args.save:
        checkpoint.save_class_matrix(args.save, head, optimizer)     # collective: every rank writes its rows
        if rank == 0:
            torch.save(backbone.state_dict(), os.path.join(args.save, BACKBONE_FILE))
            save_trainer(args.save, max(start, args.steps), args, head, backbone, optimizer, scaler)
        dist.barrier()
        if rank == 0:
            print(f"saved to {args.save}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
