"""The training loop of a :class:`~magloss.train.run.Run`: the steps (data, flips, schedule,
forward, backward, clipping, logging), the periodic checkpoints and evaluations, and the
ways it stops early (a damaged record, Ctrl-C, SIGTERM), each after saving the finished steps."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from magloss import functional as MF
from magloss.checkpoint import all_ok
from magloss.distributed.comm import comm_device, gather_rows

from .checkpoints import write_model, write_onnx
from .errors import Stopped, os_reason
from .inputs import EVAL_FOLDS, STOP_SIGNALS, _ignore_stop_signals, _stop_signals_blocked, resize
from .sampler import GlobalBatchSampler, _mix

#: How the one line names each of the signals that stop a run (inputs.STOP_SIGNALS). The exit
#: status is 128 + the signal's number, the shells' convention for a process ended by a signal:
#: 130 for Ctrl-C (SIGINT), 143 for SIGTERM (a scheduler's or ``docker stop``'s preemption), so
#: a job script tells a preempted run from a finished one.
_STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated by SIGTERM"}


def _overflow_everywhere(head: nn.Module, group) -> None:
    """fp16 under a sharded head: the class matrix's gradient is local to each rank, so an
    overflow on one shard must make every rank skip the step (GradScaler decides per rank).
    Called on the *scaled* gradients before ``unscale_``: a rank that saw no Inf/NaN but
    learns that another did poisons its own gradient so that its scaler skips too."""
    g = head.weight.grad
    bad = torch.zeros((), device=head.weight.device) if g is None else (~torch.isfinite(g).all()).float()
    flag = bad.clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() > 0 and bad.item() == 0 and g is not None:
        g.fill_(float("inf"))


class Loop:
    """The training half of :class:`~magloss.train.run.Run` (which builds what it uses: the
    model, the head, the optimizer, the data, the log, the process group)."""

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> List[dict]:
        """Every .bin set on rank 0 (the others wait); rows also go to the log. A set whose
        evaluation fails is reported (one line, naming it) and skipped: training goes on."""
        rows = []
        if self.is_main and self.bins:
            was = self.backbone.training
            self.backbone.eval()

            def embed(x):
                return self.backbone(resize(x, self.image_size))

            for b in self.bins:
                try:
                    r = b.evaluate(embed, flip=self.args.flip, batch_size=self.args.eval_batch_size,
                                   device=self.device, n_folds=EVAL_FOLDS)
                except Exception as exc:          # an evaluation never costs the run
                    self.eval_failures += 1
                    self._say(f"magloss.train: warning: step {self.step}: evaluation of {b.path} failed, "
                              f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              err=True)
                    continue
                row = {"step": self.step, "epoch": self._epochs_done(), "set": b.name, "pairs": len(b),
                       "accuracy_mean": r["accuracy_mean"], "accuracy_std": r["accuracy_std"],
                       "flip": self.args.flip, "time": time.time()}
                self.log.write("eval", row)
                self._say(f"step {self.step}: {b.name} {100 * r['accuracy_mean']:.2f} ± "
                          f"{100 * r['accuracy_std']:.2f} % ({len(b)} pairs{', flip' if self.args.flip else ''})")
                rows.append(row)
            self.backbone.train(was)
        self._barrier()
        return rows

    # -- training ----------------------------------------------------------------------------
    def _epochs_done(self) -> float:
        return self.epoch + self.position / self.n

    def _next(self, per_step: int) -> Tuple[int, int]:
        """(epoch, position) after one more step: the epoch ends when another global batch
        would not fit (its remaining samples are dropped)."""
        position = self.position + per_step
        return (self.epoch + 1, 0) if position + per_step > self.n else (self.epoch, position)

    def _say(self, text: str, err: bool = False) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr if err else None)
        else:
            print(text, flush=True, file=sys.stderr if err else sys.stdout)

    def _loader(self):
        sampler = GlobalBatchSampler(self.n, self.args.batch_size, self.world, self.rank, self.args.seed,
                                     self.epoch, self.position)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.args.workers,
                                           pin_memory=self.plan.pin_memory, worker_init_fn=_ignore_stop_signals)

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: the run stops after the step in progress (checkpoint, exit
        128 + signum). A Ctrl-C a second or more after the first stop signal stops at once; one
        sooner is the same keypress delivered twice (the terminal and torchrun both send it).
        A repeated SIGTERM changes nothing: the checkpoint goes on (a scheduler that will not
        wait sends SIGKILL)."""
        now = time.monotonic()
        if signum == signal.SIGINT and self._interrupted is not None and now - self._interrupted >= 1.0:
            raise KeyboardInterrupt
        if self._interrupted is None:
            self._interrupted, self._signal = now, int(signum)

    def _agree(self, data_error: Optional[str]) -> Tuple[bool, int]:
        """(some rank's batch has a damaged record, the stop signal some rank received or 0):
        one small all-reduce under torchrun, so that every rank stops at the same step (and
        with the same status: the larger signal number when ranks received different ones)."""
        flags = [float(data_error is not None), float(self._signal if self._interrupted is not None else 0)]
        if self.group is not None and self.world > 1:
            t = torch.tensor(flags, device=comm_device(self.group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flags = t.tolist()
        return flags[0] > 0, int(flags[1])

    def _stop_by_signal(self, signum: int) -> None:
        self._stop(f"{_STOPPED[signal.Signals(signum)]} at step {self.step}", 128 + signum)

    def _stop(self, reason: str, code: int, mine: bool = False, save: bool = True) -> None:
        """Save the finished steps (when any since the last checkpoint, and ``save``) and raise Stopped."""
        if save and self.step > 0 and self.saved_step != self.step:
            self.save()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        a = self.args
        if self.saved_step is None:
            where = "no step was finished, nothing saved"
        else:
            where = (f"checkpoint of step {self.saved_step} in {os.path.join(a.output, 'checkpoints')}; resume with: "
                     f"python -m magloss.train {shlex.quote(a.data_dir)} --output {shlex.quote(a.output)} --resume")
        raise Stopped(f"{reason}; {where}", code, show=self.is_main or mine)

    def train(self) -> None:
        """Train to ``self.total`` steps, save the checkpoint and ``model.pt``, then evaluate.

        Raises:
            Stopped: a damaged record in a batch (code 2), Ctrl-C (code 130) or SIGTERM (code
            143) during the steps, after saving the finished steps; a checkpoint or ``model.pt``
            that cannot be written (code 1).
        """
        a = self.args
        per_step = self.world * a.batch_size
        total = self.total
        self._bar = None
        self._interrupted = self._signal = None
        if self.is_main and a.progress:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                                 file=sys.stderr)
            except ImportError:
                self._bar = None
        self._say(f"magloss.train: {self.n} images, {self.num_classes} classes, {a.network} "
                  f"{self.image_size[0]}x{self.image_size[1]} -> {a.embedding_size}, loss {a.loss}, world {self.world}, "
                  f"global batch {per_step}, {self.n // per_step} steps/epoch, amp {self.amp}, device {self.device}"
                  + (f", resumed at step {self.step}" if self.step else "")
                  + (" (the run is finished: nothing left to train)" if self.step >= total else ""))
        handler = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS} if handler else {}
        try:
            self._steps(total, per_step)
        except KeyboardInterrupt:         # a second Ctrl-C: the bar ends its line before main's one line
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.saved_step != self.step:
            self.save()
        error = None
        if self.is_main:              # the outputs exist before any evaluation can fail or hang
            try:
                write_model(self)
            except OSError as exc:    # the checkpoint is written: --resume writes model.pt again
                error = exc
            if error is None and a.export_onnx:
                write_onnx(self)
        try:
            all_ok(error, self.group, os.path.join(a.output, "model.pt"))     # the others wait for rank 0
        except OSError as exc:
            self._stop(f"cannot write model.pt: {os_reason(exc)}", 1, mine=True, save=False)
        self.evaluate()

    def _steps(self, total: int, per_step: int) -> None:
        a = self.args
        tick, tick_step = time.perf_counter(), self.step
        bb_params = self.optimizer.param_groups[0]["params"]
        self.backbone.train()
        self.head.train()
        while self.step < total:
            with _stop_signals_blocked():         # the workers start with the signals blocked
                batches = iter(self._loader())
            for images, labels, errors in batches:
                bad = next((e for e in errors if e), None)
                data_error, signum = self._agree(bad)
                if data_error:
                    self._stop(f"{bad or 'another rank read a damaged record'} (training stopped before step "
                               f"{self.step + 1})", 2, mine=bad is not None)
                if signum:
                    self._stop_by_signal(signum)
                torch.manual_seed(_mix(a.seed, self.step, self.rank))
                x = (images.to(self.device, non_blocking=True).float() - 127.5) / 127.5
                flip = torch.rand(x.shape[0]) < 0.5
                x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
                y = labels.to(self.device, non_blocking=True)
                epoch, position = self._next(per_step)
                lr = self.schedule(epoch + position / self.n)
                for grp in self.optimizer.param_groups:
                    grp["lr"] = lr
                last = self.step + 1 >= total
                log = (self.step + 1) % a.log_every == 0 or last
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    emb = self.model(x)
                    # the parts (and their side outputs, the accuracy's source) only on logged steps
                    parts = self.head(emb, y, return_parts=log)
                loss = parts.loss if log else parts
                if log:   # what this step saw: its embeddings against the class matrix before the update
                    acc = self._accuracy(parts, emb, y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.scaler.is_enabled() and self.world > 1:
                    _overflow_everywhere(self.head, self.group)
                self.scaler.unscale_(self.optimizer)
                if a.clip_grad_norm > 0:
                    nn.utils.clip_grad_norm_(bb_params, a.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                self.epoch, self.position = epoch, position
                if self._bar is not None:
                    self._bar.update(1)
                if log:
                    now = time.perf_counter()
                    row = self._row(parts, acc, lr, (self.step - tick_step) * per_step / max(now - tick, 1e-9))
                    tick, tick_step = now, self.step
                    self.log.write("train", row)
                    if self._bar is not None:
                        self._bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}",
                                              mag=f"{row['magnitude_mean']:.1f}", lr=f"{lr:.3g}")
                    elif self.is_main:
                        print(f"step {self.step} epoch {row['epoch']:.3f} loss {row['loss']:.4f} "
                              f"acc {row['accuracy']:.3f} |x| {row['magnitude_mean']:.2f} lr {lr:.4g}", flush=True)
                if last:
                    return                # the last checkpoint, model.pt and the evaluation: train()
                if (a.save_every and self.step % a.save_every == 0) or (not a.save_every and self.position == 0):
                    self.save()
                if a.eval_every and self.step % a.eval_every == 0:
                    self.evaluate()
                if self.position == 0:
                    break
        if self._interrupted is not None:
            self._stop_by_signal(self._signal)

    def _accuracy(self, parts, emb, y):
        """The step's training accuracy: from the loss call's own side outputs (its predicted
        classes: no extra product; global under a sharded head), except where the forward saw
        only some classes (Partial FC: the sampled ones would overstate it) or computed no side
        outputs (the softmax head): there the head's ``accuracy`` (one more
        chunked product over all classes; collective when sharded)."""
        sampled = getattr(self.head, "last_sample", None) is not None
        if parts.predicted_class is not None and not sampled:
            sizes = getattr(self.head, "last_batch_sizes", None)     # a sharded head: the global batch's labels
            if sizes is not None:
                y = gather_rows(y.to(torch.int64), sizes, self.head.group)
            return MF.parts_accuracy(parts, y, self.head.ignore_index)
        with torch.no_grad():
            return self.head.accuracy(emb.detach().float(), y)

    def _row(self, parts, acc, lr, speed) -> dict:
        parts = type(parts)(*(t.detach().float() for t in parts[:5]))
        norms = parts.norms
        return {"step": self.step, "epoch": self._epochs_done(), "lr": lr, "loss": float(parts.loss),
                "ce": float(parts.ce), "reg": float(parts.reg), "reg_weighted": float(parts.reg_weighted),
                "magnitude_mean": float(norms.mean()), "magnitude_std": float(norms.std()) if norms.numel() > 1 else 0.0,
                "magnitude_min": float(norms.min()), "magnitude_max": float(norms.max()), "accuracy": float(acc),
                "grad_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
                "images_per_s": speed, "time": time.time()}
