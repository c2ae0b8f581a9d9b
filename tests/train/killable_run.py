"""``evolm train pretrain`` in one CPU thread, optionally SIGKILLing itself at a chosen moment.

Run by the resume tests as a child process::

    python killable_run.py [--kill-after-step N | --kill-in-save N] <evolm train pretrain flags>

``--kill-after-step N``: SIGKILL right after the metrics record of step N is written.
``--kill-in-save N``: SIGKILL in the middle of writing checkpoint N's files (the model is written,
``trainer_state.pt`` half of it, no ``COMPLETE`` marker yet).

SIGKILL cannot be caught: no ``finally`` block, ``atexit`` hook or buffered write runs, which is
what a crash, an OOM kill or a pre-empted machine does to a run.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    own, flags = parser.parse_known_args()
    torch.set_num_threads(1)

    from evolm.cli.main import main as evolm_main
    from evolm.train import pretrain as recipe
    from evolm.train.log import RunLogger

    if own.kill_after_step is not None:
        log = RunLogger.log

        def log_then_die(self: RunLogger, record: dict) -> None:
            log(self, record)
            if record["step"] == own.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

        RunLogger.log = log_then_die

    if own.kill_in_save is not None:
        write_state = recipe.write_trainer_state

        def write_half_then_die(directory, state: dict) -> None:
            if state["step"] == own.kill_in_save:
                buffer = io.BytesIO()
                torch.save(state, buffer)
                with open(directory / "trainer_state.pt", "wb") as fh:
                    fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            write_state(directory, state)

        recipe.write_trainer_state = write_half_then_die

    return evolm_main(["train", "pretrain", *flags])


if __name__ == "__main__":
    sys.exit(main())
