"""Service settings: constructor arguments, ``COMPATEMBED_INDEX_*`` environment variables, CLI flags.

Unknown keys are refused (``extra="forbid"``), and so are unknown ``COMPATEMBED_INDEX_*`` environment
variables (pydantic-settings ignores those by itself), so a typo fails loudly instead of leaving a
default in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class IndexSettings(BaseSettings):
    """Settings of the index service (env prefix ``COMPATEMBED_INDEX_``).

    Attributes:
        data_dir: store + snapshots directory; None runs in memory (nothing survives a restart).
        host: bind address; loopback unless told otherwise.
        port: TCP port.
        api_key: when set, every write (and version registration) needs ``X-API-Key`` or a Bearer token.
        max_k: largest k per search.
        max_batch: largest number of vectors, queries or ids per request.
        max_body_bytes: largest request body; larger ones get 413.
        mmap: load snapshot indexes memory-mapped where FAISS allows it.
        keep_snapshots: snapshots kept per collection.
        snapshot_on_shutdown: snapshot every collection at a clean shutdown (shorter replay at restart).
        log_level: uvicorn and service log level.
        access_log: one log line per request (uvicorn's access log). Off saves formatting and writing
            it, a visible share of the server's CPU on small searches; ``/metrics`` still counts every request.
    """

    model_config = SettingsConfigDict(env_prefix="COMPATEMBED_INDEX_", extra="forbid")

    data_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: SecretStr | None = None
    max_k: int = Field(1000, ge=1)
    max_batch: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    mmap: bool = False
    keep_snapshots: int = Field(2, ge=1)
    snapshot_on_shutdown: bool = True
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    access_log: bool = True

    @model_validator(mode="after")
    def _no_unknown_env(self) -> IndexSettings:
        prefix = "COMPATEMBED_INDEX_"
        known = {prefix + name.upper() for name in type(self).model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} (known: {sorted(known)})")
        return self
