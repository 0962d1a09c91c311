"""A `bentoml serve` worker that outlives its arbiter exits.

BentoML's arbiter (circus) starts each worker in a session of its own, so when the arbiter
is killed outright (kill -9, an OOM kill of the arbiter alone, outside a container) nothing
stops the worker: it keeps the listening socket and, with job workers on, keeps taking jobs
from Redis, invisible to whoever restarts the service. The worker watches its parent: when
the parent process changes (the worker was re-parented to init or a subreaper), it stops
itself the way the arbiter would have, with SIGTERM (in-flight requests finish, a running
job is handed back to the queue), and exits outright if that has not worked within
GRACE_S. Polling getppid() is the portable, race-free check: PR_SET_PDEATHSIG would have to
be set by the forking thread before exec, which circus does not do, and is lost on a parent
thread's exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("bentoml.service.bank_churn")

POLL_S = 1.0
GRACE_S = 20.0
_started = False


def exit_with_parent(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Start (once per process) the thread that stops this process when its parent is gone."""
    global _started
    if _started:
        return
    _started = True
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="parent-watchdog", daemon=True).start()


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    logger.warning(
        "the bentoml serve process (pid %d) that started this worker is gone: stopping (SIGTERM), "
        "exiting in at most %.0f s",
        parent,
        grace_s,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    logger.error("still running %.0f s after losing the bentoml serve process: exiting now", grace_s)
    os._exit(1)
