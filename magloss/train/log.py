"""The training command's logs: train.csv, eval.csv, log.jsonl (and TensorBoard), rank 0 only."""

from __future__ import annotations

import csv
import json
import os
from typing import List, Optional

_TRAIN_FIELDS = ("step", "epoch", "lr", "loss", "ce", "reg", "reg_weighted", "magnitude_mean", "magnitude_std",
                 "magnitude_min", "magnitude_max", "accuracy", "grad_scale", "images_per_s", "time")
_EVAL_FIELDS = ("step", "epoch", "set", "pairs", "accuracy_mean", "accuracy_std", "flip", "time")


class Log:
    """train.csv, eval.csv, log.jsonl (and TensorBoard) under the output folder; rank 0 only."""

    def __init__(self, out: str, enabled: bool, tensorboard: bool, keep_until: Optional[int]) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.paths = {"train": os.path.join(out, "train.csv"), "eval": os.path.join(out, "eval.csv"),
                      "jsonl": os.path.join(out, "log.jsonl")}
        if keep_until is not None:        # resumed: drop rows after the checkpoint, as if never written
            self._truncate(keep_until)
        else:
            for p in self.paths.values():
                if os.path.exists(p):
                    os.remove(p)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=keep_until)
            except ImportError:
                self.tb = None

    def _truncate(self, step: int) -> None:
        for kind in ("train", "eval"):
            p = self.paths[kind]
            if os.path.exists(p):
                with open(p, newline="") as f:
                    rows = list(csv.DictReader(f))
                self._rewrite_csv(p, [r for r in rows if int(r["step"]) <= step])
        p = self.paths["jsonl"]
        if os.path.exists(p):
            with open(p) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
            with open(p, "w") as f:
                f.writelines(lines)

    def _rewrite_csv(self, path: str, rows: List[dict]) -> None:
        fields = _TRAIN_FIELDS if path == self.paths["train"] else _EVAL_FIELDS
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, kind: str, row: dict) -> None:
        if not self.enabled:
            return
        path = self.paths[kind]
        fields = _TRAIN_FIELDS if kind == "train" else _EVAL_FIELDS
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in fields})
        with open(self.paths["jsonl"], "a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")
        if self.tb is not None:
            if kind == "train":
                for k, v in row.items():
                    if k not in ("step", "time") and isinstance(v, float):
                        self.tb.add_scalar(f"train/{k}", v, row["step"])
            else:
                self.tb.add_scalar(f"eval/{row['set']}/accuracy", row["accuracy_mean"], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
