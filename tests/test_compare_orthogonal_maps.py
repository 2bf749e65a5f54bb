"""The orthogonal-maps comparison tool: bad maps refused before training, measured costs, the table."""

from __future__ import annotations

import pytest

from tools.compare_orthogonal_maps import form_cost, main, render


@pytest.mark.parametrize("bad", ["qr", "givens:0", "householder_chain:3"])
def test_bad_map_is_refused_before_any_training(bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--runs", str(tmp_path), "--maps", "givens", bad])
    assert exc.value.code == 2 and "orthogonal_map" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_form_cost_counts_the_trainable_parameters():
    assert form_cost("givens", 8, repeats=2)["trainable_parameters"] == 8 * 7 // 2
    assert form_cost("householder_chain:2", 8, repeats=2)["trainable_parameters"] == 16
    cost = form_cost("matrix_exp", 8, repeats=3)
    assert cost["trainable_parameters"] == 64 and cost["form_q_ms"] > 0


def test_table_shows_every_row_and_failure():
    row = {"method": "oca", "orthogonal_map": "givens", "run": "r", "new/new": {"top1": 0.6, "mAP": 0.5},
           "new/old": {"top1": 0.4, "mAP": 0.3}, "orthogonality_error": 2e-6, "trainable_parameters": 12720,
           "form_q_ms": 3.5, "step_time_s": 0.2, "wall_s": 600.0}
    text = render({"command": "python -m tools.compare_orthogonal_maps", "protocol": "p",
                   "machine": {"cpu_count": 2, "torch": "2.14.1", "cuda": None},
                   "rows": [row], "failed": {"oca butterfly": "exit status 1"}, "old/old": {"top1": 0.38, "mAP": 0.29}})
    assert "| oca | `givens` | 60.0 | 50.0 | 40.0 | 30.0 | 2.0e-06 | 12720 | 3.50 | 0.200 | 600 |" in text
    assert "oca butterfly failed" in text and "top-1 38.0" in text
    assert "Machine: 2 CPUs, torch 2.14.1, CUDA device: none. Protocol: p." in text
