"""glibc malloc settings that let a training process reuse the memory of its large tensors.

PyTorch takes the memory of every CPU tensor from ``malloc``. glibc serves a request above
its mmap threshold (32 MiB at most) with a new memory mapping and unmaps it again on
``free``. A training step of a paper-size ConVAE frees and requests the gradients of its
largest linear layers: 55 MiB each for the generation-tuned size and 119 MiB for the
reconstruction-tuned size. So every step faults their pages in again, and the kernel zeroes
each page first. ``bench/training.py`` counts the page faults per step and times an epoch
with and without these settings, and ``bench/memory.py`` compares the peak memory.

A worker process therefore starts with :data:`TRAINING_MALLOC_ENV` in its environment, which
glibc reads at start-up:

- ``MALLOC_MMAP_MAX_=0``: no request gets its own mapping; every one comes from the heap;
- ``MALLOC_TRIM_THRESHOLD_``: freed memory at the top of the heap stays in the process;
- ``MALLOC_ARENA_MAX=1``: every thread allocates from the one heap. Ray runs the methods of
  an actor with concurrency groups, as jethpo's workers are, in threads of their own, and a
  thread's separate arena would map requests above 64 MiB anyway.

The one heap did not slow trials that train with two torch threads: the settings sped them
up as much as trials with one thread (``bench/memory.py --threads 2``, section 6 of
``bench/BENCHMARKS.md``). NOTE: more than two threads were not measured, because the
development machines have 2 cores.

The process then keeps the memory of its largest training step. :func:`release_freed_memory`
hands the free part back to the system after each trial. Other C libraries ignore the
variables, and the function does nothing there.

:func:`worker_env_vars` gives the variables that Ray sets in a worker: these, or a value of
the same variable in the environment of the jethpo command instead, or none at all when the
command runs with ``--no-keep-freed-memory`` (``JETHPO_KEEP_FREED_MEMORY=0``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Mapping

__all__ = ["TRAINING_MALLOC_ENV", "glibc", "release_freed_memory", "worker_env_vars"]

logger = logging.getLogger(__name__)

#: Environment of a process that trains, read by glibc's malloc when the process starts.
TRAINING_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    # 1 TiB, far more than a trial frees at once
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_ARENA_MAX": "1",
}


def worker_env_vars(keep_freed_memory: bool = True, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment variables that Ray sets in a worker process.

    Args:
        keep_freed_memory: Whether workers get :data:`TRAINING_MALLOC_ENV`. Without, Ray sets
            nothing, and workers start with the environment of their Ray node.
        environ: Environment of the jethpo command, ``os.environ`` by default. A variable of
            :data:`TRAINING_MALLOC_ENV` set there keeps its value.
    """
    if not keep_freed_memory:
        return {}
    environ = os.environ if environ is None else environ
    return {key: environ.get(key, value) for key, value in TRAINING_MALLOC_ENV.items()}


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """Return the C library of this process when it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the freed pages of this process's heap back to the system.

    Returns:
        Whether glibc returned memory (``malloc_trim(0)``). False with other C libraries.
    """
    libc = glibc()
    if libc is None:
        return False
    released = bool(libc.malloc_trim(0))
    logger.debug("malloc_trim(0) %s", "returned memory" if released else "found nothing to return")
    return released
