"""The live-server soak (issue 15): one session run of tests/soak/soak.py, one test per property.

Short form in ``make test``; ``make soak`` (``DCM_SOAK_FULL=1``) runs the full one. Figures, the RSS
plot and both server logs: tests/_output/soak/.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _failures(res: dict, cat: str) -> str:
    items = res["failures"][cat]
    return f"{len(items)} failure(s) — see tests/_output/soak/soak-<short|full>.json:\n" + "\n".join(f"- {m}" for m in items[:15])


def test_bounded_and_large_enough(soak_result):
    cfg = soak_result["config"]
    assert soak_result["queue_prompts"] >= cfg["prompts"], f"only {soak_result['queue_prompts']} queue prompts ran"
    assert soak_result["interrupts_landed"] >= cfg["interrupts"], (
        f"only {soak_result['interrupts_landed']} of {soak_result['interrupts_sent']} interrupts landed"
    )
    assert soak_result["duration_s"] <= cfg["time_limit_s"], f"took {soak_result['duration_s']} s"


def test_long_queue_outputs_bit_identical_to_a_fresh_server(soak_result):
    assert not soak_result["failures"]["queue"], _failures(soak_result, "queue")
    assert soak_result["bit_identical_outputs"] >= soak_result["config"]["prompts"] // 2, (
        f"only {soak_result['bit_identical_outputs']} outputs were compared bit for bit"
    )


def test_interrupts_leave_no_patch_and_the_reference_prompt_identical(soak_result):
    assert not soak_result["failures"]["interrupts"], _failures(soak_result, "interrupts")
    assert soak_result["reference_checks"] >= soak_result["config"]["interrupts"]


def test_model_file_changes_under_the_server(soak_result):
    assert not soak_result["failures"]["swaps"], _failures(soak_result, "swaps")
    assert soak_result["swaps"] >= 5 * soak_result["config"]["swap_cycles"]


def test_two_clients_get_their_own_results_progress_and_previews(soak_result):
    assert not soak_result["failures"]["clients"], _failures(soak_result, "clients")
    assert all(n > 0 for n in soak_result["runs_per_client"].values()), soak_result["runs_per_client"]
    assert all(n > 0 for n in soak_result["previews_per_client"].values()), soak_result["previews_per_client"]


def test_server_rss_flat_after_warm_up(soak_result):
    assert not soak_result["failures"]["memory"], _failures(soak_result, "memory") + f"\n{soak_result['rss']}"


def test_bad_requests_refused_by_validation(soak_result):
    assert not soak_result["failures"]["bad_requests"], _failures(soak_result, "bad_requests")
    assert soak_result["bad_requests_refused_ok"] == soak_result["bad_requests"]


def test_no_traceback_from_pack_code_in_the_server_log(soak_result):
    assert not soak_result["failures"]["server_log"], _failures(soak_result, "server_log")
