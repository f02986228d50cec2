"""PCM-style phases of the single expert (schedule.phase_edges / schedule.phases): solver, config, one run."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from dcm_core.errors import DCMConfigError
from dcm_core.flow import flow_step
from dcm_core.train.config import load_config
from dcm_core.train.solver import PCMSolver


def _pair(solver: PCMSolver, k: torch.Tensor, seed: int = 0):
    """(draw, ŷ, x', y) of grid indices k with random x_t and velocities."""
    g = torch.Generator().manual_seed(seed)
    draw = solver.index_draw(k)
    shape = (k.numel(), 2, 4, 2, 2)
    x_t, v_s, v_t, v_tgt = (torch.randn(shape, generator=g) for _ in range(4))
    x_prev = solver.teacher_step(x_t, v_t, draw)
    return draw, solver.student_prediction(x_t, v_s, draw), x_prev, solver.target(x_prev, v_tgt, draw), (x_t, v_s, v_tgt)


def test_phase_boundaries_per_sample():
    s = PCMSolver("semantic", 0, phase_edges=[0, 10, 25])
    assert s.phased and s.index_range == (0, 50)
    k = torch.tensor([5, 10, 30, 49, 0, 24])
    draw, pred, x_prev, target, (x_t, v_s, v_tgt) = _pair(s, k)
    assert isinstance(draw.sigma_boundary, torch.Tensor) and draw.sigma_boundary.dtype == torch.float32
    assert draw.boundary_index.tolist() == [0, 10, 25, 25, 0, 10]
    expected = torch.stack([s.sigmas_prev[0], s.sigmas_prev[10], s.sigmas_prev[25], s.sigmas_prev[25], s.sigmas_prev[0], s.sigmas_prev[10]])
    assert torch.equal(draw.sigma_boundary, expected)
    assert s.phase_sigmas == [s.grid.sigmas_prev[e] for e in (0, 10, 25)]
    for i in range(k.numel()):  # each sample jumps to its own phase end
        sb = float(draw.sigma_boundary[i])
        torch.testing.assert_close(pred[i], x_t[i] + (sb - float(draw.sigma[i])) * v_s[i])
        torch.testing.assert_close(target[i], x_prev[i] + (sb - float(draw.sigma_prev[i])) * v_tgt[i])
    # boundary condition: k on an edge → the target is the teacher step x' exactly
    on_edge = (k == draw.boundary_index).nonzero().flatten().tolist()
    assert on_edge == [1, 4]
    for i in on_edge:
        assert torch.equal(target[i], x_prev[i])
    assert not torch.equal(target[0], x_prev[0])


def test_draws_stay_in_range_and_phase():
    s = PCMSolver("semantic", 20, phase_edges=[20, 30, 41])
    g = torch.Generator().manual_seed(3)
    draws = [s.draw(64, g) for _ in range(10)]
    k = torch.cat([d.index for d in draws])
    b = torch.cat([d.boundary_index for d in draws])
    assert int(k.min()) == 20 and int(k.max()) == 49
    edges = torch.tensor([20, 30, 41])
    assert torch.equal(b, edges[torch.searchsorted(edges, k, right=True) - 1])


def test_no_edges_is_bit_identical_to_the_single_phase():
    plain = PCMSolver("semantic", 35)
    empty = PCMSolver("semantic", 35, phase_edges=())
    assert not empty.phased and empty.phase_sigmas == []
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = plain.draw(8, g1), empty.draw(8, g2)
    assert isinstance(b.sigma_boundary, float) and b.sigma_boundary == a.sigma_boundary and b.boundary_index is None
    assert torch.equal(a.index, b.index) and torch.equal(a.sigma, b.sigma) and torch.equal(a.sigma_prev, b.sigma_prev)
    ra, rb = _pair(plain, a.index), _pair(empty, b.index)
    for x, y in zip(ra[1:4], rb[1:4]):
        assert torch.equal(x, y)
    # one edge at k0 is the same single phase, with a per-sample tensor: still bit-identical arithmetic
    one = PCMSolver("semantic", 35, phase_edges=[35])
    r1 = _pair(one, a.index)
    assert isinstance(r1[0].sigma_boundary, torch.Tensor)
    for x, y in zip(ra[1:4], r1[1:4]):
        assert torch.equal(x, y)
    torch.testing.assert_close(r1[1], flow_step(r1[4][0], r1[4][1], a.sigma, plain.sigma_boundary), rtol=0, atol=0)


def test_solver_refuses_bad_edges():
    with pytest.raises(ValueError, match="semantic stage only"):
        PCMSolver("detail", 35, phase_edges=[0, 10])
    with pytest.raises(ValueError, match="start at k0=0"):
        PCMSolver("semantic", 0, phase_edges=[0, 25, 10])
    with pytest.raises(ValueError, match="start at k0=5"):
        PCMSolver("semantic", 5, phase_edges=[0, 10])


def _cfg(*ov: str, stage: str = "semantic"):
    return load_config(None, list(ov), stage=stage).resolved("wan")


def test_config_phase_edges_and_phases():
    c = _cfg("schedule.k0=0", "schedule.phase_edges=[0,12,25,37]")
    assert (c.schedule.k0, c.schedule.phase_edges) == (0, [0, 12, 25, 37])
    # k0 empty: the first edge; a comma list from a shell is the same list
    c = _cfg("schedule.phase_edges=0,12,25,37")
    assert (c.schedule.k0, c.schedule.phase_edges) == (0, [0, 12, 25, 37])
    # N equal phases over [k0, grid_steps) (official spacing floor(linspace(0, 50 − k0, N, endpoint=False)))
    c = _cfg("schedule.k0=0", "schedule.phases=4")
    assert c.schedule.phase_edges == [0, 12, 25, 37]
    assert _cfg("schedule.phases=3").schedule.phase_edges == [35, 40, 45]  # Wan's default k0 = 35
    assert _cfg("schedule.k0=0", "schedule.phases=4").resolved("wan").schedule.phase_edges == [0, 12, 25, 37]  # idempotent
    # default: no phases
    c = _cfg()
    assert c.schedule.phase_edges == [] and c.schedule.phases == 0 and c.schedule.k0 == 35


@pytest.mark.parametrize(
    "overrides, stage, message",
    [
        (["schedule.k0=0", "schedule.phase_edges=[0,25,12]"], "semantic", r"phase_edges=\[0, 25, 12\]: must be sorted and unique"),
        (["schedule.k0=0", "schedule.phase_edges=[0,12,12]"], "semantic", r"must be sorted and unique, e.g. \[0, 12\]"),
        (["schedule.phase_edges=[0,12]"], "detail", r"phase_edges=\[0, 12\]: .*semantic stage only.*Drop schedule.phase_edges"),
        (["schedule.phases=4"], "detail", r"schedule.phases=4: .*semantic stage only"),
        (["schedule.k0=5", "schedule.phase_edges=[0,12]"], "semantic", r"first edge must be schedule.k0 = 5.*set schedule.k0=0"),
        (["schedule.phase_edges=[0,50]"], "semantic", r"grid indices in \[0, 49\]"),
        (["schedule.phase_edges=[0,x]"], "semantic", r"expected a list of integers"),
        (["schedule.k0=0", "schedule.phases=4", "schedule.phase_edges=[0,10]"], "semantic", r"disagrees with schedule.phases=4"),
        (["schedule.k0=45", "schedule.phases=6"], "semantic", r"has only 5 grid indices"),
        (["schedule.phases=-1"], "semantic", r"must be ≥ 0"),
    ],
)
def test_config_refuses_bad_phases(overrides, stage, message):
    with pytest.raises(DCMConfigError, match=message):
        _cfg(*overrides, stage=stage)


def test_phased_semantic_run_end_to_end(tmp_path, th, caplog):
    data = th.make_dataset(tmp_path / "data", "wan", n=2)
    cfg = th.tiny_config("wan", "semantic", data, tmp_path / "run", schedule__k0=0, schedule__phase_edges="[0,10,25]")
    from dcm_core.train.trainer import DCMTrainer

    with caplog.at_level(logging.INFO, logger="DCM.train"):
        tr = DCMTrainer(cfg)
    assert tr.solver.phase_edges == (0, 10, 25)
    assert "3 PCM phases" in caplog.text and "[25,50)→" in caplog.text
    res = tr.train()
    assert res.global_step == 2
    for rec in res.history:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["loss_cd"]) and "loss_tc" in rec
    # the export is the plain semantic model; the phases are recorded beside it
    from safetensors.torch import load_file

    sd = load_file(res.exported["transformer"])
    assert sd and not any("lora" in k or "base_layer" in k for k in sd)
    info = json.loads((tmp_path / "run" / "export" / "export_info.json").read_text())
    assert info["stage"] == "semantic" and info["phase_edges"] == [0, 10, 25]
    assert info["phase_sigmas"] == pytest.approx([float(tr.solver.sigmas_prev[e]) for e in (0, 10, 25)])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["schedule"]["phase_edges"] == [0, 10, 25]
