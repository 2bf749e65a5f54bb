"""A Milvus server process on 127.0.0.1 for tests and benchmarks: the real thing, not milvus-lite in process.

First the standalone server of the ``milvus`` package on PyPI (Milvus itself, with embedded etcd and
local storage; Linux x86-64), else ``milvus-lite server`` (milvus-lite behind gRPC). Both listen on
free ports and keep their data and logs under the directory given.

    with running_milvus_server(Path("/tmp/m")) as uri:   # e.g. http://127.0.0.1:19530
        IndexService(None, backend="milvus", milvus_uri=uri)

    python -m tools.milvus_server --data /tmp/m          # serve until Ctrl-C (prints the URI)
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class NoMilvusServer(RuntimeError):
    """Neither server could be started; the message says why for each."""


def reachable(uri: str, deadline: float, proc: Any = None) -> bool:
    """Whether a Milvus server answers at ``uri`` before ``deadline`` (``time.monotonic``; False early if
    the server process ``proc`` exits)."""
    from pymilvus import MilvusClient

    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            client = MilvusClient(uri=uri, timeout=5)
            client.list_collections()
            client.close()
            return True
        except Exception:
            time.sleep(1.0)
    return False


@contextmanager
def running_milvus_server(root: Path, timeout_s: float = 240.0) -> Iterator[str]:
    """Start a Milvus server with its data under ``root``, yield its URI, stop it; raises :class:`NoMilvusServer`."""
    reasons = []
    try:
        from milvus import MilvusServer  # type: ignore[import-not-found]
    except ImportError:
        reasons.append("the milvus package (Milvus standalone) is not installed")
    else:
        server = MilvusServer(wait_for_started=False)
        server.set_base_dir(str(root / "standalone"))
        started = False
        try:
            server.start()
            server.wait_started(timeout=timeout_s * 1000)
            started = reachable(f"http://127.0.0.1:{server.listen_port}", time.monotonic() + 60)
            if not started:
                reasons.append("Milvus standalone reported healthy but took no connection")
        except Exception as exc:  # a missing shared library, a port in use, a timeout: say which
            reasons.append(f"Milvus standalone did not start ({type(exc).__name__}: {exc}; logs under {root})")
        if started:
            try:
                yield f"http://127.0.0.1:{server.listen_port}"
            finally:
                server.stop()
            return
        server.stop()
    exe = shutil.which("milvus-lite") or str(Path(sys.executable).with_name("milvus-lite"))
    if not Path(exe).exists():
        raise NoMilvusServer("no Milvus server could be started: " + "; ".join([*reasons, "milvus-lite is not installed"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (root / "lite").mkdir(parents=True, exist_ok=True)
    with open(root / "lite-server.log", "wb") as log:
        proc = subprocess.Popen([exe, "server", "--data-dir", str(root / "lite"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        if not reachable(uri, time.monotonic() + 60, proc):
            reasons.append(f"milvus-lite server did not answer (log: {root / 'lite-server.log'})")
            raise NoMilvusServer("no Milvus server could be started: " + "; ".join(reasons))
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="directory for the server's data and logs")
    args = parser.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    try:
        with running_milvus_server(args.data) as uri:
            print(uri, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    except NoMilvusServer as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
