"""Process-wide runtime settings: the allocator that keeps freed memory for the next tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

#: A training step's pattern: two large tensors (above glibc's largest mapping threshold, 32 MiB) made, written and
#: freed; the page faults of two steps after six (the heap reaches its steady size within a few steps).
FAULTS = """
import json, resource, sys
import torch
from rlhf_core import runtime
tuned = runtime.tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    logits, grad = torch.empty(64 * 2**20), torch.empty(32 * 2**20)
    logits.fill_(1.0), grad.fill_(1.0)
for _ in range(6):
    step()
before = faults()
step(), step()
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""


def run_faults(allocator: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RLHF_ALLOCATOR"}
    if allocator:
        env["RLHF_ALLOCATOR"] = allocator
    done = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_tuned_allocator_reuses_freed_memory_without_page_faults():
    pages = 2 * 384 * 2**20 // 4096  # two steps of 384 MiB in 4 KiB pages
    system, tuned = run_faults("system"), run_faults(None)
    assert system["tuned"] is False and tuned["tuned"] is True
    assert system["faults"] > pages // 2  # each large tensor is a fresh mapping, faulted in page by page
    assert tuned["faults"] < pages // 20  # the heap keeps the block: the next tensor reuses it


def test_the_cli_tunes_the_allocator_before_any_stage(work_env, monkeypatch):
    from rlhf_core import cli, runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append(True) or True)
    assert cli.main(["check-params", "--params", str(work_env / "params.yaml")]) == 0
    assert calls == [True]
