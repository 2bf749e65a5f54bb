"""The CLI through ``main(argv)``, the settings, and the torch-free import of the service package."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pydantic import ValidationError

from compatembed_index.cli import build_parser, main
from compatembed_index.settings import IndexSettings

from index_helpers import Chain


def test_cli_end_to_end(tmp_path, capsys):
    chain = Chain(tmp_path / "versions")
    d = ["--data-dir", str(tmp_path / "data")]
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x1.npy", rng.normal(size=(40, 16)).astype(np.float32))
    np.save(tmp_path / "ids1.npy", np.arange(40))
    np.save(tmp_path / "x3.npy", rng.normal(size=(5, 32)).astype(np.float32))
    np.save(tmp_path / "ids3.npy", np.arange(5))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"n": i}) for i in range(40)))

    def run(*argv):
        capsys.readouterr()
        code = main([*d, *argv])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if code == 0 and out.out.strip() else None), out.err

    assert run("register", *(str(chain.dirs[v]) for v in ("v1", "v2", "v3")))[1] == ["v1", "v2", "v3"]
    assert run("create", "g", "--factory", "Flat", "--factory-for", "v3=HNSW8")[0] == 0
    assert run("add", "g", "--version", "v1", "--vectors", str(tmp_path / "x1.npy"), "--ids",
               str(tmp_path / "ids1.npy"), "--metadata", str(tmp_path / "m.jsonl"))[1]["add"] == 40
    assert run("upgrade", "g", "--version", "v3", "--vectors", str(tmp_path / "x3.npy"), "--ids",
               str(tmp_path / "ids3.npy"))[1]["upgrade"] == 5
    np.save(tmp_path / "probe.npy", np.array([3, 4, 5, 99]))
    assert run("locate", "g", "--ids", str(tmp_path / "probe.npy"))[1] == {
        "counts": {"v3": 2, "v1": 1, "absent": 1}, "versions": ["v3", "v3", "v1", None]}
    code, out, _ = run("locate", "g", "--ids", str(tmp_path / "ids1.npy"), "--out", str(tmp_path / "where.json"))
    assert out["counts"] == {"v3": 5, "v1": 35}
    where = json.loads((tmp_path / "where.json").read_text())
    assert where["ids"] == list(range(40)) and where["versions"] == ["v3"] * 5 + ["v1"] * 35
    code, out, _ = run("search", "g", "--version", "v3", "--queries", str(tmp_path / "x3.npy"), "-k", "3")
    assert code == 0 and [r[0]["id"] for r in out["results"]] == [0, 1, 2, 3, 4]
    assert out["routes"] == {"v1": "query:v3>v2>v1", "v3": "direct"}
    code, out, _ = run("calibrate", "g", "--query-version", "v3", "--segment-version", "v1", "--queries",
                       str(tmp_path / "x3.npy"), "--query-ids", str(tmp_path / "ids3.npy"), "-k", "2")
    assert code == 0 and out["route"] == "v3|v1" and out["scale"] > 0
    assert run("stats", "g")[1]["calibration"] == {"v3|v1": [out["scale"], out["shift"]]}
    assert run("materialise", "g", "--source", "v1", "--target", "v3")[1]["vectors"] == 35
    assert len(run("snapshot", "g")[1]["snapshots"]) == 1
    assert run("alias", "live", "g")[0] == 0
    st = run("stats", "live")[1]
    assert st["items"] == 40 and st["segments"]["v3"]["factory"] == "HNSW8"
    code, _, err = run("search", "g", "--version", "v1", "--queries", str(tmp_path / "x1.npy"))
    assert code == 2 and err.startswith("error: no route from version v1 to segment v3")
    code, _, err = run("add", "g", "--version", "v1", "--vectors", str(tmp_path / "nope.npy"), "--ids",
                       str(tmp_path / "ids1.npy"))
    assert code == 2 and "vectors file not found" in err


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("register", "create", "add", "search", "upgrade", "locate", "materialise", "calibrate", "snapshot",
                "stats", "serve"):
        assert cmd in text


def test_serve_binds_loopback_by_default(monkeypatch):
    monkeypatch.delenv("COMPATEMBED_INDEX_HOST", raising=False)
    args = build_parser().parse_args(["serve"])
    from compatembed_index.cli import _settings

    s = _settings(args)
    assert s.host == "127.0.0.1" and s.api_key is None and s.access_log
    assert not _settings(build_parser().parse_args(["serve", "--no-access-log"])).access_log


def test_api_key_from_env_and_unknown_settings_are_refused(monkeypatch):
    monkeypatch.setenv("COMPATEMBED_INDEX_API_KEY", "k")
    assert IndexSettings().api_key.get_secret_value() == "k"
    monkeypatch.setenv("COMPATEMBED_INDEX_MAX_KK", "3")
    with pytest.raises(ValidationError, match="unknown setting.*COMPATEMBED_INDEX_MAX_KK"):
        IndexSettings()
    monkeypatch.delenv("COMPATEMBED_INDEX_MAX_KK")
    with pytest.raises(ValidationError, match="max_kk"):
        IndexSettings(max_kk=3)


def test_service_imports_without_torch_or_compatembed():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "compatembed", "torchvision", "timm", "open_clip"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import compatembed_index.api, compatembed_index.server, compatembed_index.cli, compatembed_index.client
        from compatembed_index.api import IndexService
        import numpy as np
        svc = IndexService(None)
        assert not any(m.split(".")[0] in ("torch", "compatembed") for m in sys.modules)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
