"""The gallery on Milvus: the same routes and merge as the FAISS backend, vectors held by Milvus.

* :mod:`.spaces`: one Milvus collection per (gallery, version space) and per forward copy, searched
  like FAISS segments; moves between versions, locate, metadata, repair.
* :mod:`.collection`: :class:`~compatembed_index.routing.RoutedCollection` over those spaces.
* :mod:`.catalog`: versions, collection configs and aliases stored in Milvus, so every service
  replica that talks to one Milvus sees one gallery (the service itself keeps no state).

pymilvus (and milvus-lite for ``./gallery.db`` URIs) are optional: ``pip install 'compatembed[milvus]'``.
"""

from __future__ import annotations

from typing import Any

from compatembed_index.errors import ConfigError

STRONG = "Strong"
"""Every read and write names this consistency level: a read that follows an acknowledged write sees it."""


def connect(uri: str, *, token: str | None = None) -> Any:
    """A ``pymilvus.MilvusClient`` for ``uri`` (``./gallery.db``: milvus-lite in process; ``http://host:19530``).

    Raises:
        ConfigError: pymilvus (or milvus-lite for a ``.db`` URI) is not installed, or the server cannot be reached.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"a Milvus URI is needed (./gallery.db or http://host:19530), got {uri!r}")
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError("the Milvus backend needs pymilvus: pip install 'compatembed[milvus]'") from None
    if uri.endswith(".db"):
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise ConfigError(f"{uri}: a .db URI runs milvus-lite, which is not installed: "
                              "pip install 'compatembed[milvus]'") from None
    try:
        return MilvusClient(uri=uri, token=token or "")
    except Exception as exc:  # pymilvus raises its own MilvusException, or grpc errors
        raise ConfigError(f"cannot connect to Milvus at {uri}: {type(exc).__name__}: {exc}") from None
