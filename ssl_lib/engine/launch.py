"""``python -m ssl_lib train --nproc-per-node K``: one run on K processes of this machine, started by
torchrun's own engine (``torch.distributed.run``) once the config has been checked here.

``torchrun --standalone --nproc-per-node K -m ssl_lib train ...`` trains the same run (and
``--nnodes`` with a rendezvous endpoint spans machines); this front end only adds that bad input is
refused before any process starts, with one line and exit status 2, and that a failed run ends with
its processes' own one-line message and exit status rather than torchrun's report.

A SIGTERM to this front end (a scheduler stopping the job) goes to the processes through torchrun's
agent: they save a checkpoint at the current step and the front end exits with
:data:`~ssl_lib.engine.preempt.EXIT_REQUEUE`, as a one-process run does. SIGUSR1 is ignored here
(the agent would die of it) and handled by the processes, which receive it from the scheduler too.
"""

from __future__ import annotations

import logging


def launch_train(nproc: int, train_argv: list[str]) -> int:
    """Run ``python -m ssl_lib train TRAIN_ARGV`` on ``nproc`` local processes; their exit status."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .preempt import EXIT_REQUEUE

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # the processes say what failed
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "ssl_lib", "train", *train_argv])
    try:
        run(args)
    except SignalException:  # stopped by a scheduler: the agent passed the signal on, the processes saved
        return EXIT_REQUEUE
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return max((c for c in codes if c > 0), default=1)  # a process's own status, not a signal's
    return 0
