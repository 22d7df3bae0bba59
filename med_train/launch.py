"""`med train --processes N`: N training processes on this machine through torch's own launcher (torchrun's
`torch.distributed.run`, as `torchrun --standalone --nproc_per_node N`), stopped the way one process is.

    med train configs/coco_karpathy_base.yaml --processes 8

Why not torchrun alone: SIGTERM or SIGINT to the whole process group (`timeout`, Slurm, Kubernetes, Ctrl-C)
reaches torchrun too, which reports it as its own failure (a SignalException traceback, exit 1) even when every
training process finished its step, wrote the checkpoint and exited 0. Here the launcher runs in a session of its
own: a signal to this command, or to its group, is passed to the training processes only; they stop cleanly,
the launcher sees them succeed, and this command exits 0 with their resume line. A training process that fails
says why in its own line; the launcher then names it and its exit code in one more, instead of torchrun's report
(a traceback). If this command is killed outright, the launcher gets SIGTERM (Linux: the parent-death signal)
and stops the processes, which still checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import suppress


def inside_launcher() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch, this module)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def run(processes: int, train_args: list[str]) -> int:
    """Run `med train TRAIN_ARGS` in `processes` processes; their exit code (0: done, or stopped by a signal
    into a checkpoint)."""
    command = [sys.executable, "-m", "med_train.launch", "--standalone", "--nproc_per_node", str(processes),
               "-m", "med_train.cli", "train", *train_args]
    # one thread per process unless told otherwise (torchrun's own default, without its warning)
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    launcher = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_stop_with_parent)
    return _wait(launcher)


def _wait(launcher: subprocess.Popen) -> int:
    """Wait for the launcher, passing SIGTERM and SIGINT to the training processes (to the launcher itself where
    there are none yet: nothing is lost before the first step)."""
    import psutil

    def forward(signum, frame):
        try:
            workers = psutil.Process(launcher.pid).children()
        except psutil.NoSuchProcess:
            return
        for process in workers or [launcher]:
            with suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = launcher.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def _stop_with_parent() -> None:
    """In the launcher's process, before it starts: SIGTERM when this command dies (Linux), so that a killed
    command does not leave its training processes running in their own session."""
    if sys.platform.startswith("linux"):
        import ctypes

        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    """torchrun with `argv`, its failure report replaced by one line naming the process that failed."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the line below says it
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"error: training process {rank} failed with exit code {failure.exitcode}; its message is above",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
