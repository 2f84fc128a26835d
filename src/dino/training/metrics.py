"""The run's metrics: ``metrics.jsonl`` (one JSON object a line) and, optionally, TensorBoard
event files beside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dino.atomic_files import atomic_write, write_failure

log = logging.getLogger("dino")


class MetricsFile:
    """``metrics.jsonl``, one JSON object a line. On resume from iteration R, it keeps the lines
    of the steps before R and the k-NN lines of the evaluations the checkpoint holds, so that the
    resumed run writes the lines of an uninterrupted run.

    With ``tensorboard`` and the tensorboard package installed, every numeric value is also
    written as a TensorBoard scalar (``train/<name>``, ``knn/top1_k<k>``, ``knn/top5_k<k>``) at
    its iteration, in event files beside ``metrics.jsonl``; on resume the events from the
    resumed iteration on are purged, as the lines are."""

    def __init__(
        self, path: Path, resume_iteration: int, evaluated: set[int], tensorboard: bool = False
    ) -> None:
        self.path = path
        self.tb = _tensorboard_writer(path.parent, resume_iteration) if tensorboard else None
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if not isinstance(row, dict):
                    continue
                it = row.get("iteration", 0)
                if "knn" in row:
                    if it <= resume_iteration and row.get("epoch") in evaluated:
                        keep.append(line)
                elif it < resume_iteration:
                    keep.append(line)
            text = "".join(f"{line}\n" for line in keep)
            atomic_write(path, lambda f: f.write(text.encode()))
        try:
            self.f = open(path, "a")
        except OSError as exc:
            raise write_failure(path, exc) from None

    def write(self, row: dict[str, Any]) -> None:
        try:  # a line torn by a full disk is dropped on resume, as one torn by a kill
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        except OSError as exc:
            raise write_failure(self.path, exc) from None
        if self.tb is not None:
            step = int(row.get("iteration", 0))
            for k, v in row.get("knn", {}).items():
                for metric in ("top1", "top5"):
                    self.tb.add_scalar(f"knn/{metric}_k{k}", v[metric], step)
            for name, value in row.items():
                if name not in ("iteration", "knn", "knn_top1_k20") and _is_number(value):
                    self.tb.add_scalar(f"train/{name}", value, step)
            self.tb.flush()

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:  # its last line could not be written: reported by write already
            pass
        if self.tb is not None:
            self.tb.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensorboard_writer(run_dir: Path, resume_iteration: int) -> Any:
    """A ``SummaryWriter`` into the run folder, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    except Exception as exc:  # installed but broken (e.g. a protobuf it cannot use)
        log.warning("tensorboard cannot be imported (%s): writing metrics.jsonl only", exc)
        return None
    # purge_step drops the events a resumed run is about to write again
    return SummaryWriter(str(run_dir), purge_step=resume_iteration or None)
