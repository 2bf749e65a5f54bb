"""The method registry: every module of compatembed/methods is found, whatever methods/__init__.py imports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import compatembed.methods as package
from compatembed.errors import ConfigError
from compatembed.methods.base import METHODS, list_methods, method_class

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_every_method_has_its_config_and_every_config_its_method():
    assert list_methods() == sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    for name in list_methods():
        assert method_class(name).name == name


def test_a_module_nobody_imports_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "probe_method.py").write_text(
        "from compatembed.methods.base import Method\n\n\nclass Probe(Method):\n    name = 'probe_registry'\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        assert "probe_registry" in list_methods()
        assert method_class("probe_registry").__module__ == "compatembed.methods.probe_method"
    finally:
        monkeypatch.undo()
        METHODS.pop("probe_registry", None)
        sys.modules.pop("compatembed.methods.probe_method", None)
    assert "probe_registry" not in list_methods()


def test_an_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown method 'nope'; known: bct, bt2"):
        method_class("nope")
