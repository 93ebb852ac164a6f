"""The LoRA soak's short slice: 4 threads of requests with random mixes while LoRAs come and go."""

from __future__ import annotations

from ltx2_tools.lora_soak import main, run


def test_a_short_slice_ends_clean_with_every_thread_done() -> None:
    result = run(requests=24, threads=4, seed=3, policy="merge")
    assert result.finished and not result.errors, result.errors
    assert result.served + result.refused_unknown == 24 and result.served > 0
    assert result.drift_checks >= 1 and result.drifted == 0
    host = result.cache["host"]
    assert host["bytes"] <= host["budget_bytes"]
    assert result.cache["device"]["slots_used"] <= result.cache["device"]["slots"] == 2
    assert result.ok


def test_the_command_line_checks_its_arguments(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit):
        main(["--requests", "0"])
    assert "at least 1" in capsys.readouterr().err
