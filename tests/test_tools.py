"""Argument handling of the evidence tools (their full runs are the evidence, not tests)."""

from __future__ import annotations

import pytest

from tools.run_cifar10_methods import _slug, main


def test_variant_directory_names_are_distinct_and_safe():
    assert _slug(["method.influence_scale=10"]) == "influence_scale-10"
    assert _slug(["method.pull_weight=1", "trainer.epochs=8"]) == "pull_weight-1__epochs-8"
    assert _slug(["model.name=a/b c"]) == "name-a-b-c"  # no path separators or spaces
    assert _slug(["method.influence_scale=10"]) != _slug(["method.influence_scale=1"])


@pytest.mark.parametrize("variant", ["oca", "nope method.x=1", "oca not_an_override"])
def test_bad_variant_is_refused_before_any_training(variant, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--runs", str(tmp_path), "--variant", variant])
    assert exc.value.code == 2 and "--variant" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
