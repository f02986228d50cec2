"""The suite's own guards work: the resource bounds catch a big allocation, the no-unpickling guard
catches every door, and the oracle rejects a non-DCM exception and an error that does not name the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import rel_hostile as H
import torch

from dcm_core.errors import DCMFormatError


def test_address_space_cap_stops_a_lying_allocation():
    with H.bounded("big"):
        with pytest.raises(RuntimeError, match="allocate"):
            torch.empty(2**33, dtype=torch.uint8)  # what a lying header could make a naive reader do
    x = torch.empty(2**33 // 64, dtype=torch.uint8)  # the cap is lifted afterwards
    del x


def test_python_heap_and_cpu_bounds():
    with pytest.raises(AssertionError, match="Python heap peak"):
        with H.bounded("heap", py_heap=8 * 2**20):
            b = bytes(16 * 2**20)
            del b
    with pytest.raises(AssertionError, match="CPU"):
        with H.bounded("cpu", cpu_s=0.05):
            sum(i * i for i in range(3_000_000))


def test_no_unpickling_guard():
    with H.no_unpickling():
        for door in (lambda: pickle.loads(b"\x80\x04K\x01."), lambda: torch.load("x")):
            with pytest.raises(H.Unpickled):
                door()
    assert pickle.loads(pickle.dumps(1)) == 1


def test_oracle_rejects_bad_errors(tmp_path):
    p = tmp_path / "some_file.safetensors"
    H.check_message(p, DCMFormatError(f"{p}: the header is garbled beyond repair"), "x")
    with pytest.raises(AssertionError, match="does not name the file"):
        H.check_message(p, DCMFormatError("the header is garbled beyond repair"), "x")
    with pytest.raises(AssertionError, match="not the problem"):
        H.check_message(p, DCMFormatError(f"{p}: bad"), "x")
    assert isinstance(p, Path)
