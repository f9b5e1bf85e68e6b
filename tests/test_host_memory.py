"""The malloc settings of training processes: large tensors reuse their pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpo.host_memory import TRAINING_MALLOC_ENV, worker_env_vars

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

# Allocates, fills and frees a 64 MiB tensor 30 times in a thread other than the main one, as
# a Ray actor's method runs. Prints the page faults of each round, and the resident memory
# before and after release_freed_memory.
_ROUNDS = """
import json, resource, threading
import psutil, torch
from hpo.host_memory import release_freed_memory

torch.set_num_threads(1)
faults = []
def rounds():
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
kept_mib = psutil.Process().memory_info().rss / 2**20
released = release_freed_memory()
print(json.dumps({
    "faults": faults,
    "kept_mib": kept_mib,
    "after_release_mib": psutil.Process().memory_info().rss / 2**20,
    "released": released,
}))
"""

_TENSOR_PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _rounds(env: dict[str, str]) -> dict:
    base = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    finished = subprocess.run(
        [sys.executable, "-c", _ROUNDS], env=base | env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_default_malloc_faults_in_every_tensor():
    faults = _rounds({})["faults"]

    assert all(count >= _TENSOR_PAGES / 2 for count in faults[-10:]), faults


def test_training_env_reuses_pages():
    faults = _rounds(TRAINING_MALLOC_ENV)["faults"]

    # the first rounds grow the heap until a freed tensor's place fits the next one
    assert sum(faults[-10:]) < _TENSOR_PAGES / 10, faults


def test_release_returns_kept_memory():
    readings = _rounds(TRAINING_MALLOC_ENV)

    assert readings["released"]
    assert readings["after_release_mib"] < readings["kept_mib"] - 48, readings


def test_worker_env_vars_default():
    assert worker_env_vars(True, {}) == TRAINING_MALLOC_ENV


def test_worker_env_vars_keep_user_values():
    env = worker_env_vars(True, {"MALLOC_ARENA_MAX": "4", "PATH": "/usr/bin"})

    assert env["MALLOC_ARENA_MAX"] == "4"
    assert env["MALLOC_MMAP_MAX_"] == TRAINING_MALLOC_ENV["MALLOC_MMAP_MAX_"]
    assert "PATH" not in env


def test_worker_env_vars_off():
    assert worker_env_vars(False, {"MALLOC_ARENA_MAX": "4"}) == {}
