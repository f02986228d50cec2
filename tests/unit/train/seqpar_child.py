"""Child process of test_seqpar.py: ``python -m dcm_core`` on this CPU-only machine.

diffusers' context parallelism (0.42) computes ``rank % torch.accelerator.device_count()`` for a device
index that context parallelism never reads; on a CPU-only torch that count is 0 (a division by zero), and
the trainer refuses sequence parallelism there. This test child — and nothing in the product — reports one
device so the real diffusers path (mesh, split / gather hooks, Ulysses all-to-all over gloo) runs on CPU.
"""

from __future__ import annotations

import runpy

import torch

if torch.accelerator.device_count() == 0:
    torch.accelerator.device_count = lambda: 1

runpy.run_module("dcm_core", run_name="__main__", alter_sys=True)
