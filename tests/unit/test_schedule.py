"""Golden numbers of the grid, the presets, the PCM spacing and the routing (dcm-method.md §2-§4)."""

from __future__ import annotations

import math

import pytest

from dcm_core import schedule as S
from dcm_core.errors import DCMScheduleError

# dcm-method.md §2 table: k -> (sigmas[k], sigmas_prev[k])
GRID_TABLE = {
    0: (0.257576, 0.016732),
    9: (0.809524, 0.788660),
    17: (0.905325, 0.897516),
    18: (0.912429, 0.905325),
    25: (0.948498, 0.944444),
    34: (0.975410, 0.973064),
    35: (0.977636, 0.975410),
    37: (0.981763, 0.979751),
    38: (0.983680, 0.981763),
    43: (0.992042, 0.990515),
    49: (1.000000, 0.998801),
}


@pytest.mark.parametrize("k", sorted(GRID_TABLE))
def test_grid_matches_the_method_table(k):
    g = S.pcm_grid()
    sig, prev = GRID_TABLE[k]
    assert abs(g.sigmas[k] - sig) < 1e-6
    assert abs(g.sigmas_prev[k] - prev) < 1e-6


def test_grid_structure():
    g = S.pcm_grid()
    assert g.num_steps == 50 and g.shift == 17.0
    assert all(a < b for a, b in zip(g.sigmas, g.sigmas[1:]))  # ascending
    assert all(g.sigmas_prev[k] == g.sigmas[k - 1] for k in range(1, 50))  # one grid cell per step
    assert g.sigmas_prev[0] == pytest.approx(S.flow_shift(0.001))
    assert S.flow_shift(1.0) == 1.0 and S.flow_shift(0.0) == 0.0


def test_official_presets():
    assert S.build_sigmas("wan2.1-t2v-6step") == [1.0, 0.992, 0.982, 0.949, 0.905, 0.81, 0.0]
    assert S.build_sigmas("hunyuan-t2v-4step") == [1.0, 0.992, 0.9818, 0.9124, 0.0]


@pytest.mark.parametrize(
    "n, expected_t",
    [
        (2, [1000, 944.44]),
        (4, [1000, 981.76, 944.44, 856.59]),
        (6, [1000, 988.92, 973.06, 944.44, 897.52, 788.66]),
        (8, [1000, 992.04, 981.76, 967.97, 944.44, 912.43, 856.59, 734.57]),
    ],
)
def test_pcm_default_spacing(n, expected_t):
    s = S.build_sigmas("pcm-default", steps=n)
    assert s[-1] == 0.0 and len(s) == n + 1
    assert [round(1000 * x, 2) for x in s[:-1]] == expected_t


def test_routing_of_the_official_presets():
    wan = S.build_sigmas("wan2.1-t2v-6step")
    assert S.route(wan, 978) == ["semantic"] * 3 + ["detail"] * 3
    sem, det = S.split_sigmas(wan, 978)
    assert sem == [1.0, 0.992, 0.982, 0.949] and det == [0.949, 0.905, 0.81, 0.0]
    hy = S.build_sigmas("hunyuan-t2v-4step")
    assert S.route(hy, 981) == ["semantic"] * 2 + ["detail"] * 2
    sem, det = S.split_sigmas(hy, 981)
    assert sem == [1.0, 0.992, 0.9818] and det == [0.9818, 0.9124, 0.0]
    assert sem[-1] == det[0]


def test_routing_rule_uses_float32_timestep_floor():
    # 0.982 → t = 982.0 exactly in float32 (not 981.99999...): semantic at 978 and at 981
    assert S.timestep_of(0.982) == 982.0
    assert S.expert_for_sigma(0.982, 981) == "semantic"
    assert S.expert_for_sigma(0.9818, 981) == "detail"  # floor(981.8) = 981 ≤ 981
    # the semantic expert's lowest training point (977.64) goes to the detail expert at 978 (method §4.1)
    assert S.expert_for_sigma(0.977636, 978) == "detail"


def test_split_edge_cases():
    s = [1.0, 0.99, 0.5, 0.0]
    assert S.split_sigmas(s, 1) == (s, [0.0])  # no detail step
    assert S.split_sigmas(s, 999) == ([1.0, 0.99], [0.99, 0.5, 0.0])  # t=1000 > 999: one semantic step
    low = [0.9, 0.5, 0.0]
    assert S.split_sigmas(low, 978) == ([0.9], low)  # every step is detail
    with pytest.raises(DCMScheduleError, match=r"boundary_timestep=1000 is outside \(0, 1000\)"):
        S.split_sigmas(s, 1000)
    with pytest.raises(DCMScheduleError, match=r"boundary_timestep=0 is outside \(0, 1000\)"):
        S.route(s, 0)
    with pytest.raises(DCMScheduleError, match=r"boundary_timestep=nan is outside \(0, 1000\)"):
        S.route(s, math.nan)


def test_per_expert_uniform_reproduces_the_hunyuan_preset():
    s = S.per_expert_uniform_sigmas(2, 2, 981)
    official = S.OFFICIAL_PRESETS["hunyuan-t2v-4step"]
    assert [round(x, 4) for x in s] == list(official)
    assert S.route(s, 981) == ["semantic", "semantic", "detail", "detail"]


@pytest.mark.parametrize("family", S.FAMILIES)
@pytest.mark.parametrize("n, m", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 6)])
def test_per_expert_uniform_rule(family, n, m):
    b = S.DEFAULT_BOUNDARY_TIMESTEP[family]
    s = S.per_expert_uniform_sigmas(n, m, b)
    assert len(s) == n + m + 1 and s[0] == 1.0 and s[-1] == 0.0
    assert S.route(s, b) == ["semantic"] * n + ["detail"] * m  # every step goes where it was placed
    g = S.pcm_grid()
    on_grid = set(g.sigmas)
    assert all(x in on_grid for x in s[:-1])
    # the detail sub-trajectory starts at its top grid point (the first point at/below the boundary)
    top_detail = max(x for x in g.sigmas if math.floor(S.timestep_of(x)) <= b)
    assert s[n] == top_detail


def test_per_expert_uniform_limits():
    with pytest.raises(DCMScheduleError, match="semantic_steps=20"):
        S.per_expert_uniform_sigmas(20, 2, 978)
    with pytest.raises(DCMScheduleError, match="at least one step|must both be"):
        S.per_expert_uniform_sigmas(0, 2, 978)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.0, 0.992, 0.982", [1.0, 0.992, 0.982, 0.0]),
        ("1 0.9 0.5 0", [1.0, 0.9, 0.5, 0.0]),
        ("0.9\n0.5", [0.9, 0.5, 0.0]),
    ],
)
def test_custom_sigmas(text, expected):
    assert S.build_sigmas("custom", custom_sigmas=text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1.0, 0.5, 0.7", "strictly descending"),
        ("1.0, 1.0, 0.5", "strictly descending"),
        ("1.2, 0.5", "outside"),
        ("1.0, -0.1", "outside"),
        ("1.0, abc", "not a number"),
        ("0", "only a 0"),
        ("nan, 0.5", "outside"),
    ],
)
def test_custom_sigmas_errors_name_the_value(text, match):
    with pytest.raises(DCMScheduleError, match=match):
        S.parse_custom_sigmas(text)


def test_unknown_preset():
    with pytest.raises(DCMScheduleError, match="Choose one of"):
        S.build_sigmas("lcm-8step")


def test_preset_names_are_the_contract():
    assert S.PRESET_NAMES == ("wan2.1-t2v-6step", "hunyuan-t2v-4step", "per-expert-uniform", "pcm-default", "custom")


@pytest.mark.parametrize("values,match", [
    ([1.0, 0.5, 0.75, 0.0], r"DCM Timestep Split: sigmas must be strictly descending, but sigma #1 = 0\.5 is followed by #2 = 0\.75"),
    ([1.0, 0.5, 0.5, 0.0], r"DCM Timestep Split: sigmas must be strictly descending, but sigma #1 = 0\.5 is followed by #2 = 0\.5"),
    ([1.0, float("nan"), 0.0], r"DCM Timestep Split: sigma #1 = nan is outside \[0, 1\]"),
    ([1.5, 0.5, 0.0], r"DCM Timestep Split: sigma #0 = 1\.5 is outside \[0, 1\]"),
])
def test_timestep_split_refuses_what_it_cannot_split(values, match):
    """Regression: DCM Timestep Split used to check only the length, and split a non-descending list
    at the first detail step (wrong segments). It now runs the pack's one sigma validator."""
    import torch

    from dcm_core.comfy_adapter.schedules import split_at_boundary

    with pytest.raises(S.DCMScheduleError, match=match):
        split_at_boundary(torch.tensor(values), 978.0)


def test_one_sigma_validator_serves_presets_custom_lists_and_sockets():
    """Full schedules need the terminal 0; a SIGMAS socket (a split segment) does not; same messages."""
    assert S.validate_sigmas([1.0, 0.949], source="x", terminal_zero=False) == [1.0, 0.949]
    with pytest.raises(S.DCMScheduleError, match=r"^x: the last sigma must be 0 \(got 0\.949\)"):
        S.validate_sigmas([1.0, 0.949], source="x")
    with pytest.raises(S.DCMScheduleError, match=r"^custom_sigmas: sigma #1 = 1\.5 is outside \[0, 1\]"):
        S.parse_custom_sigmas("1.0, 1.5")
