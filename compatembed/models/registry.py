"""Backbone registry: backbones are named in config and looked up here, never switched on.

A backbone factory is registered with :func:`register_backbone` and built with
:func:`create_backbone`. Every factory returns a module that honours one contract, so heads, methods
and the model-version loader never care which library a backbone comes from:

- ``forward(x)`` maps images ``(N, C, H, W)`` to pooled, unnormalised features ``(N, num_features)``;
- ``num_features: int`` is that feature width;
- ``preprocessing: compatembed.data.Preprocessing`` says how images must be prepared;
- the factory accepts ``weights: str | None = None``, a *local* weights file (never a download).

The module also holds the two checkpoint helpers the factories share (:func:`read_state_dict`,
:func:`load_state_dict_strict`) so every backbone reports a bad checkpoint the same way.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from compatembed.errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_backbone(name: str) -> Callable[[F], F]:
    """Register a backbone factory under ``name``.

    Args:
        name: The name configs use (``create_backbone(name, ...)``).

    Returns:
        A decorator that records the factory and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered (two modules claiming one name is a bug).

    Example:
        >>> @register_backbone("my_net")  # doctest: +SKIP
        ... def my_net(*, weights: str | None = None) -> nn.Module: ...
    """

    def decorator(factory: F) -> F:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered (by {_BACKBONES[name]!r})")
        _BACKBONES[name] = factory
        return factory

    return decorator


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of registered backbones matching a shell-style wildcard, sorted.

    Args:
        pattern: An :mod:`fnmatch` pattern such as ``"cifar_resnet*"``.

    Returns:
        The matching names in alphabetical order.
    """
    return sorted(n for n in _BACKBONES if fnmatch.fnmatchcase(n, pattern))


def _to_plain(value: Any) -> Any:
    """Turn OmegaConf containers (what Hydra passes) into plain lists and dicts."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: A registered name (see :func:`list_backbones`).
        **kwargs: Arguments of that backbone's factory, e.g. ``depth=20, weights=None``.

    Returns:
        A module mapping ``(N, C, H, W)`` images to ``(N, num_features)`` pooled features, with the
        attributes ``num_features`` and ``preprocessing``.

    Raises:
        ConfigError: Unknown name, or arguments the factory does not accept.
        CheckpointError: A weights file is missing or does not fit the architecture.
    """
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    factory = _BACKBONES[name]
    kwargs = {k: _to_plain(v) for k, v in kwargs.items()}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    model = factory(**kwargs)
    missing = [a for a in ("num_features", "preprocessing") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"backbone factory {name!r} returned a module without {missing}")
    _logger.debug("created backbone %s (%d features)", name, model.num_features)
    return model


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a local weights file into a flat state dict.

    Accepts a safetensors file, or a torch file holding either a bare state dict or one wrapped
    under ``"state_dict"`` / ``"model"`` (the common training-checkpoint layouts). A ``module.``
    prefix left by ``DataParallel`` is stripped, so third-party checkpoints load unchanged.

    Args:
        path: The file. Never a URL: weights are never downloaded.

    Returns:
        Parameter and buffer name to tensor.

    Raises:
        CheckpointError: The file is absent, unreadable, or holds no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the file is not usable weights
        raise CheckpointError(f"cannot read weights file {p}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {p} does not hold a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, expected: str
) -> None:
    """Load ``state_dict`` into ``module`` exactly, or explain on one line why it does not fit.

    Args:
        module: The module to fill.
        state_dict: Its weights (keys without any ``module.`` prefix).
        source: Where the weights came from (a path), for the message.
        expected: A human name of the architecture, e.g. ``"cifar_resnet depth 20"``.

    Raises:
        CheckpointError: Missing or unexpected keys, or shape mismatches; the message names the
            file, the expected architecture and the first offending keys. Only BatchNorm
            ``num_batches_tracked`` counters may be absent (old checkpoints lack them).
    """
    own = module.state_dict()
    # BatchNorm step counters are not weights; checkpoints from before torch 0.4.1 lack them.
    state_dict = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}, **state_dict}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"weights {source} do not fit {expected}: {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=True)
