"""What a run reports: a live progress bar (rich), metrics as JSON lines, optionally TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def measure_matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 1024) -> float:
    """Achievable matmul FLOP/s of this machine in ``dtype`` (best of a few timed square matmuls)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


class RunLogger:
    """Metrics of a run: ``metrics.jsonl`` in the run directory, a progress bar, TensorBoard.

    Only the main process writes; other ranks get a logger that does nothing.
    """

    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool, tensorboard: bool
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._progress = None
        self._tb = None
        if not enabled:
            return
        self._file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        """Write one metrics record (must contain ``step``)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, record["step"])
        if self._progress is not None:
            info = " ".join(
                f"{k}={record[k]:.4g}" for k in ("loss", "val_loss", "lr", "tok_per_s", "mfu") if k in record
            )
            self._progress.update(self._task, completed=record["step"], info=info)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
