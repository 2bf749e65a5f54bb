"""Service settings: constructor arguments, ``COMPATEMBED_INDEX_*`` environment variables, CLI flags.

Unknown keys are refused (``extra="forbid"``), and so are unknown ``COMPATEMBED_INDEX_*`` environment
variables (pydantic-settings ignores those by itself), so a typo fails loudly instead of leaving a
default in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class IndexSettings(BaseSettings):
    """Settings of the index service (env prefix ``COMPATEMBED_INDEX_``).

    Attributes:
        data_dir: store + snapshots directory; None runs in memory (nothing survives a restart).
        host: bind address; loopback unless told otherwise. ``serve`` refuses any other address without
            an ``api_key`` unless ``insecure`` is set.
        port: TCP port.
        api_key: when set, every write (and version registration) needs ``X-API-Key`` or a Bearer token.
            An empty or blank key is refused (it would silently turn authentication off).
        insecure: allow ``serve`` to bind a non-loopback address without an API key (it warns).
        max_k: largest k per search.
        max_batch: largest number of vectors, queries or ids per request.
        max_result_slots: largest ``queries × k`` of one search or calibration; above it, 413.
        max_response_bytes: largest estimated search response (hits with their metadata); above it, 413.
        max_body_bytes: largest request body; larger ones get 413.
        body_timeout_seconds: time allowed to receive a whole request body; a slower or missing body gets 408.
        keep_alive_seconds: how long an idle keep-alive connection is held open (uvicorn's ``timeout_keep_alive``).
        max_metadata_bytes: largest JSON encoding of one item's metadata.
        max_metadata_depth: deepest nesting (objects and lists) of one item's metadata.
        max_nlist: most IVF/IMI inverted lists in a factory string.
        max_hnsw_m: largest HNSW M in a factory string.
        max_pq_m: most PQ/OPQ sub-quantisers in a factory string.
        max_pq_nbits: most bits per PQ code in a factory string.
        max_search_param: largest value of a search parameter (nprobe, efSearch, ...).
        max_index_bytes: largest estimated memory of one segment (fixed structures plus its training set).
        read_threads: worker threads that searches and other reads may hold at once.
        write_threads: worker threads that writes may hold at once; reads and writes queue for their
            threads apart, so a crowd of searches never keeps a write from starting.
        batch_searches: concurrent searches of one collection with the same query version and options
            run as one FAISS call (natural micro-batching: no added latency when idle).
        mmap: load snapshot indexes memory-mapped where FAISS allows it.
        keep_snapshots: snapshots kept per collection.
        snapshot_on_shutdown: snapshot every collection at a clean shutdown (shorter replay at restart).
        image_root: the directory the web page's thumbnails come from (``/ui/image?path=...``): an item's
            ``metadata["image"]`` names a file under it. Only image files under it are served (no ``..``,
            no absolute path, no symlink that leads outside it); None serves no images.
        report_dir: a compatibility report directory (``report.md`` and its PNG plots, as written by
            ``compatembed-report``) that the web page shows; None shows none.
        max_image_bytes: largest image or report file the web page's routes serve (413 above it).
        log_level: uvicorn and service log level.
        backend: ``faiss`` (FAISS segments over SQLite in ``data_dir``) or ``milvus`` (Milvus at ``milvus_uri``).
        milvus_uri: ``./gallery.db`` (milvus-lite, embedded) or ``http://host:19530`` (standalone or cluster).
        milvus_prefix: prefix of the Milvus collections this deployment owns.
        move_grace_seconds: Milvus: wait between a moved item's insert and its delete; a search pass whose
            reads span longer is run again (see ``compatembed_index.milvus.spaces``).
        catalog_ttl_seconds: Milvus: how often a replica re-reads versions, collections and aliases.
        access_log: one log line per request (uvicorn's access log). Off saves formatting and writing
            it, a visible share of the server's CPU on small searches; ``/metrics`` still counts every request.
    """

    model_config = SettingsConfigDict(env_prefix="COMPATEMBED_INDEX_", extra="forbid")

    data_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: SecretStr | None = None
    insecure: bool = False
    max_k: int = Field(1000, ge=1)
    max_batch: int = Field(10_000, ge=1)
    max_result_slots: int = Field(100_000, ge=1)
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    body_timeout_seconds: float = Field(30.0, gt=0)
    keep_alive_seconds: int = Field(5, ge=1)
    max_metadata_bytes: int = Field(64 * 1024, ge=2)
    max_metadata_depth: int = Field(32, ge=1, le=64)  # deeper breaks the response encoder
    max_nlist: int = Field(65_536, ge=1)
    max_hnsw_m: int = Field(128, ge=2)
    max_pq_m: int = Field(256, ge=1)
    max_pq_nbits: int = Field(12, ge=1, le=16)
    max_search_param: int = Field(65_536, ge=1)
    max_index_bytes: int = Field(4 * 1024**3, ge=1024**2)
    read_threads: int = Field(32, ge=1, le=1024)
    write_threads: int = Field(4, ge=1, le=64)
    batch_searches: bool = True
    mmap: bool = False
    keep_snapshots: int = Field(2, ge=1)
    snapshot_on_shutdown: bool = True
    image_root: Path | None = None
    report_dir: Path | None = None
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    access_log: bool = True
    backend: str = Field("faiss", pattern="^(faiss|milvus)$")
    milvus_uri: str | None = None
    milvus_prefix: str = Field("ce_", pattern="^[A-Za-z_][A-Za-z0-9_]{0,31}$")
    move_grace_seconds: float = Field(0.5, ge=0, le=60)
    catalog_ttl_seconds: float = Field(1.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _milvus_needs_uri(self) -> IndexSettings:
        if self.backend == "milvus" and not (self.milvus_uri or "").strip():
            raise ValueError("backend milvus needs milvus_uri (./gallery.db for milvus-lite, http://host:19530)")
        return self

    @field_validator("api_key")
    @classmethod
    def _no_blank_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("api_key is empty or blank, which would turn authentication off: give a real key, "
                             "or leave it unset")
        return v

    @field_validator("image_root", "report_dir")
    @classmethod
    def _existing_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        return v

    @model_validator(mode="after")
    def _no_unknown_env(self) -> IndexSettings:
        prefix = "COMPATEMBED_INDEX_"
        known = {prefix + name.upper() for name in type(self).model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} (known: {sorted(known)})")
        return self

    @property
    def loopback(self) -> bool:
        """Whether ``host`` is a loopback address (only this machine can connect)."""
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1); anything else may be reachable from outside."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False
