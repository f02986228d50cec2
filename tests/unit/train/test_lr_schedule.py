"""The trainer's LR multipliers (optim.lr_scheduler / optim.lr_warmup_steps) against hand-computed values, and
against diffusers' schedulers of the same name (the semantics the config documents)."""

from __future__ import annotations

import math

import pytest
import torch

from dcm_core.train.trainer import lr_lambda_for

C = math.cos(math.pi / 4)
HAND = [
    # name, warmup, total, multipliers for steps 0, 1, 2, ...
    ("constant", 0, 6, [1.0] * 8),
    ("constant", 3, 6, [1.0] * 8),  # 'constant' has no warm-up (official recipe)
    ("constant_with_warmup", 4, 6, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 0, 4, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("linear", 2, 6, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("cosine", 0, 4, [1.0, 0.5 * (1 + C), 0.5, 0.5 * (1 - C), 0.0, 0.0]),
    ("cosine", 2, 6, [0.0, 0.5, 1.0, 0.5 * (1 + C), 0.5, 0.5 * (1 - C), 0.0, 0.0]),
    ("cosine", 1, 4, [0.0, 1.0, 0.75, 0.25, 0.0]),  # the schedule of the SIGKILL resume test
]


@pytest.mark.parametrize("name,warmup,total,want", HAND, ids=[f"{h[0]}-w{h[1]}-n{h[2]}" for h in HAND])
def test_multipliers_equal_hand_computed_values(name, warmup, total, want):
    fn = lr_lambda_for(name, warmup, total)
    assert [fn(s) for s in range(len(want))] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10)])
def test_multipliers_equal_diffusers(name, warmup, total):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
    fn = lr_lambda_for(name, warmup, total)
    # the multipliers of the run's steps 0 .. total-1 (after the last step, with warm-up == run length, diffusers'
    # linear gives 0 and this one 1; no step uses that value)
    assert [fn(s) for s in range(total)] == pytest.approx([ref(s) for s in range(total)], abs=1e-12)
