"""One FAISS index holding the vectors of one model version (or a forward-upgraded copy of them).

A segment is built from a FAISS factory string (``Flat``, ``IVF256,Flat``, ``HNSW32``, ``IVF64,PQ16``, …)
and addressed by 64-bit item ids: through an ``IndexIDMap2`` wrapper, or natively for IVF indexes. Indexes that need training
(IVF, PQ) start life as an exact ``Flat`` staging index and are trained on the segment's own vectors
once ``train_size`` of them have arrived, so search is correct from the first vector on. Scores are
"higher is better": inner product (cosine on normalised vectors) or minus the squared L2 distance.

This module holds no locks; the collection serialises mutations against searches.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import faiss
import numpy as np

from compatembed_index.errors import ConfigError
from compatembed_index.factory import check_factory, check_search_params
from compatembed_index.limits import Limits

_logger = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index inside an ``IndexIDMap``/``IndexIDMap2`` (the index itself otherwise)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


DEVICES = ("cpu", "gpu", "auto")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def resolve_device(device: str) -> str:
    """``cpu`` or ``gpu`` for a configured ``cpu``/``gpu``/``auto`` (auto: the GPU when faiss-gpu sees one).

    Raises:
        ConfigError: any other value.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "gpu" if _gpu_available() else "cpu"
    return device


class Segment:
    """A FAISS index over one embedding space, addressed by int64 ids.

    Args:
        dim: vector dimension.
        factory: FAISS factory string (an ``IDMap``/``IDMap2`` prefix is accepted and kept).
        metric: ``ip`` or ``l2``.
        train_size: number of vectors to collect before training an index that needs it (None: a
            default from the factory: 39 × nlist for IVF, 9984 with PQ, at least 256).
        search_params: FAISS ParameterSpace string applied at search time, e.g. ``nprobe=16`` or
            ``efSearch=64``.
        device: ``cpu``, ``gpu`` (the trained index is moved to GPU 0; needs faiss-gpu and a GPU) or
            ``auto`` (``gpu`` where faiss-gpu sees a GPU, else ``cpu``; :attr:`device` holds the choice).
        limits: when given, the factory string is parsed and its counts and estimated memory are
            checked against them (:mod:`compatembed_index.factory`) before FAISS builds anything, and
            so are the search parameters. None trusts the caller (snapshots and rebuilds of segments
            that were checked when they were first made).

    Raises:
        ConfigError: the factory string, metric, search parameters or device cannot be used, or the
            factory exceeds ``limits``.
    """

    def __init__(
        self,
        dim: int,
        factory: str,
        metric: str,
        *,
        train_size: int | None = None,
        search_params: str = "",
        device: str = "cpu",
        limits: Limits | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
        if limits is not None:
            check_factory(factory, limits, dim=int(dim), train_size=train_size)
            check_search_params(search_params, limits)
        device = resolve_device(device)
        if device == "gpu" and not _gpu_available():
            raise ConfigError("device 'gpu' requested but this faiss build has no GPU support or sees no GPU")
        self.dim = int(dim)
        self.factory = factory
        self.metric = metric
        self.search_params = search_params
        self.device = device
        target = self._make_target()
        self._gpu_res = None
        self.train_error: str | None = None  # why the last training attempt failed (staging keeps serving)
        self._next_train_at = 0
        if target.is_trained:
            self.train_size = 0
        else:
            self.train_size = int(train_size) if train_size else self._default_train_size(target)
            minimum = self._min_train_size(target)
            if self.train_size < minimum:
                raise ConfigError(
                    f"train_size {self.train_size} is too small for factory {self.factory!r}: training it needs "
                    f"at least {minimum} vectors (one per IVF list and per PQ centroid)"
                )
            self._next_train_at = self.train_size
        self._check_search_params()
        self._apply_search_params(target)
        self.supports_remove = self._probe_remove(target)
        self._target: faiss.Index | None = target
        self._staging: faiss.Index | None = None
        if target.is_trained:
            self._index = self._to_device(target)
            self._target = None
        else:
            self._staging = faiss.IndexIDMap2(self._flat())
            self._index = self._staging

    # -- construction helpers -------------------------------------------------------------------
    def _make_target(self) -> faiss.Index:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ConfigError("factory must be a non-empty FAISS factory string such as 'Flat' or 'IVF256,Flat'")
        if self.factory.strip() in ("Flat", "IDMap2,Flat"):
            # index_factory gives a generic IndexFlat here, measurably slower (~30% on this CPU) than
            # the metric-specific IndexFlatIP / IndexFlatL2, which hold the same data in the same format
            return faiss.IndexIDMap2(self._flat())
        try:
            index = faiss.index_factory(self.dim, self.factory, METRICS[self.metric])
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            raise ConfigError(f"invalid FAISS factory string {self.factory!r} for dim {self.dim}: {msg}") from None
        # IVF indexes store 64-bit ids in their inverted lists natively. Wrapping them in an IDMap would
        # break removal (IndexIDMap compacts its id table, IVF does not renumber), so only the others
        # get an IndexIDMap2. Keep the proxy that owns the C++ object: a downcast proxy does not own
        # it, and wrapping one would leave the wrapper pointing at freed memory.
        is_idmap = isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))
        if faiss.try_extract_index_ivf(_unwrap(index)) is not None:
            if is_idmap:
                raise ConfigError(
                    f"factory {self.factory!r}: IVF indexes keep ids natively; drop the IDMap prefix "
                    "(an IDMap around an IVF index corrupts ids on removal)"
                )
            return index
        if not is_idmap:
            index = faiss.IndexIDMap2(index)
        return index

    def _flat(self) -> faiss.Index:
        return faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)

    def _default_train_size(self, target: faiss.Index) -> int:
        ivf = faiss.try_extract_index_ivf(_unwrap(target))
        size = 256
        if ivf is not None:
            size = max(size, 39 * int(ivf.nlist))
        if "PQ" in self.factory.upper():  # as FactorySpec.default_train_size
            size = max(size, 9984)
        return size

    @staticmethod
    def _min_train_size(target: faiss.Index) -> int:
        """Fewest vectors FAISS can train ``target`` on: k-means needs a point per IVF list and per PQ centroid."""
        inner = _unwrap(target)
        ivf = faiss.try_extract_index_ivf(inner)
        minimum = int(ivf.nlist) if ivf is not None else 1
        for owner in (ivf, inner):
            pq = getattr(faiss.downcast_index(owner), "pq", None) if owner is not None else None
            if pq is not None:
                minimum = max(minimum, int(pq.ksub))
        return minimum

    def _check_search_params(self) -> None:
        """Every ParameterSpace value must be a positive number (``nprobe=0`` makes FAISS fail every search)."""
        if not isinstance(self.search_params, str):
            raise ConfigError(f"search parameters must be a string such as 'nprobe=16', got {self.search_params!r}")
        for part in filter(None, (p.strip() for p in self.search_params.split(","))):
            name, sep, value = part.partition("=")
            try:
                ok = bool(sep) and _PARAM_NAME.fullmatch(name.strip()) is not None and float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"search parameter {part!r} must be name=<positive number>, e.g. nprobe=16")

    def _apply_search_params(self, index: faiss.Index) -> None:
        if not self.search_params:
            return
        try:
            faiss.ParameterSpace().set_index_parameters(_unwrap(index), self.search_params)
        except RuntimeError:
            raise ConfigError(
                f"search parameters {self.search_params!r} do not apply to factory {self.factory!r}"
            ) from None

    @staticmethod
    def _probe_remove(index: faiss.Index) -> bool:
        try:
            index.remove_ids(np.array([-12345], dtype=np.int64))
            return True
        except RuntimeError:
            return False

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if self.device != "gpu":
            return index
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            return faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        except RuntimeError as exc:
            raise ConfigError(f"factory {self.factory!r} cannot run on the GPU: {exc}") from None

    def _to_cpu(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_gpu_to_cpu(index) if self.device == "gpu" else index

    # -- state --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of vectors in the segment."""
        return int(self._index.ntotal)

    @property
    def trained(self) -> bool:
        """False while vectors are held in the exact staging index awaiting training."""
        return self._staging is None

    def ids(self) -> np.ndarray:
        """All ids in the segment, (N,) int64 (order unspecified)."""
        cpu = self._to_cpu(self._index)  # keep the owner alive while the downcast view is used
        view = faiss.downcast_index(cpu)
        if isinstance(view, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.vector_to_array(view.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(cpu)
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(ivf.nlist) if inv.list_size(lst)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    # -- mutations ----------------------------------------------------------------------------
    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Add vectors ``x`` (N, D) float32 under ``ids`` (N,) int64 (the caller guarantees new ids)."""
        if len(ids) == 0:
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._index.add_with_ids(x, ids)
        if self._staging is not None and self._staging.ntotal >= self._next_train_at:
            try:
                self._train_from_staging()
            except (RuntimeError, ConfigError) as exc:
                # The vectors are in the exact staging index and the write that brought them is durable:
                # failing here would leave the caller's state behind the store. Keep serving exactly and
                # try again once the staging index has doubled.
                self.train_error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                self._next_train_at = 2 * int(self._staging.ntotal)
                _logger.warning("training %s failed (%s); searches stay exact on %d staged vectors, next try at %d",
                                self.factory, self.train_error, self._staging.ntotal, self._next_train_at)

    def _train_from_staging(self) -> None:
        assert self._staging is not None and self._target is not None
        n = int(self._staging.ntotal)
        flat = faiss.downcast_index(self._staging.index)
        x = flat.reconstruct_n(0, n)
        ids = faiss.vector_to_array(self._staging.id_map).astype(np.int64)
        _logger.info("training %s on %d vectors", self.factory, n)
        self._target.reset()  # a failed earlier attempt may have left vectors in it
        self._target.train(x)
        self._target.add_with_ids(x, ids)
        self._index = self._to_device(self._target)
        self._staging = None
        self._target = None
        self.train_error = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ids are ignored); returns how many were removed.

        Raises:
            RuntimeError: the index type cannot remove (HNSW); the caller rebuilds instead.
        """
        if len(ids) == 0 or self.ntotal == 0:
            return 0
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not self.trained:
            return int(self._index.remove_ids(ids))
        if not self.supports_remove:
            raise RuntimeError(f"{self.factory} does not support removal; rebuild the segment")
        if self.device == "gpu":
            # FAISS's GPU indexes cannot remove: remove on a CPU copy and move it back
            cpu = self._to_cpu(self._index)
            n = int(cpu.remove_ids(ids))
            self._index = self._to_device(cpu)
            return n
        return int(self._index.remove_ids(ids))

    def rebuild(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Replace the whole content by ``ids`` (N,) and ``x`` (N, D) (training again if needed)."""
        fresh = Segment(
            self.dim,
            self.factory,
            self.metric,
            train_size=self.train_size or None,
            search_params=self.search_params,
            device=self.device,
        )
        fresh.add(ids, x)
        self.__dict__.update(fresh.__dict__)

    # -- search -------------------------------------------------------------------------------
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``q`` (Q, D): scores (Q, k) float32, higher is better, and ids (Q, k) int64 (−1 = none)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.ntotal == 0:
            return (np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64))
        d, i = self._index.search(q, k)
        if self.metric == "l2":
            d = -d
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
        return d, i

    # -- persistence --------------------------------------------------------------------------
    def write(self, path: Path) -> None:
        """Write the index (staging or trained, moved to CPU) to ``path`` with FAISS's format."""
        faiss.write_index(self._to_cpu(self._index), str(path))

    @classmethod
    def read(
        cls,
        path: Path,
        *,
        dim: int,
        factory: str,
        metric: str,
        trained: bool,
        train_size: int | None = None,
        search_params: str = "",
        device: str = "cpu",
        mmap: bool = False,
    ) -> Segment:
        """Load a segment written by :meth:`write` (the caller has verified its checksum).

        With ``mmap`` the file is memory-mapped (FAISS copies a buffer into memory when it is first
        modified). IVF indexes are always read into memory: their memory-mapped inverted lists are
        read-only in FAISS.
        """
        seg = cls(dim, factory, metric, train_size=train_size, search_params=search_params, device=device)
        fresh = seg._target if seg._target is not None else seg._index
        is_ivf = faiss.try_extract_index_ivf(_unwrap(fresh)) is not None
        flags = faiss.IO_FLAG_MMAP if (mmap and (not trained or not is_ivf)) else 0
        index = faiss.read_index(str(path), flags)  # the owning proxy (see _make_target)
        if index.d != dim:
            raise ValueError(f"{path}: index dim {index.d} != segment dim {dim}")
        if not isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)) and (
            faiss.try_extract_index_ivf(index) is None
        ):
            raise ValueError(f"{path}: not an index with 64-bit ids (IDMap or IVF)")
        if trained:
            seg._apply_search_params(index)
            seg._index = seg._to_device(index)
            seg._staging = None
            seg._target = None
        else:
            seg._staging = index
            seg._index = index
        return seg
