"""FAISS factory strings, parsed and bounded before FAISS builds anything.

``faiss.index_factory`` allocates while it parses, and it trusts its numbers: ``IVF100000000,Flat``
asks for 10^8 inverted lists (gigabytes before the first vector), ``HNSW100000`` links every vector to
200,000 neighbours, and some small values crash the process outright (``HNSW1`` segfaults on the first
add, ``PQ4x0`` dies of SIGFPE, a small ``NSG`` hangs). So a factory string is parsed here against the
grammar the service supports, every count is checked against :class:`~compatembed_index.limits.Limits`,
and the memory of the index is estimated, all before ``index_factory`` runs::

    [IDMap|IDMap2,] [transform,]* (IVF<nlist>[_HNSW<M>] | IMI2x<bits>) , <encoding>   # inverted file
    [IDMap|IDMap2,] [transform,]* HNSW<M>[_<encoding> | ,<encoding>]                  # graph
    [IDMap|IDMap2,] [transform,]* <encoding>                                           # flat codes
    ... [,RFlat | ,Refine(<encoding>)]                                                 # exact re-ranking

    transform: PCA<d> PCAW<d> PCAR<d> PCAWR<d> OPQ<M>[_<d>] RR<d> L2norm
    encoding:  Flat SQ4 SQ6 SQ8 SQfp16 SQbf16 PQ<M>[x<nbits>][np|fs|fsr]

Other FAISS components (NSG, LSH, residual and additive quantisers, ...) are refused: their memory is
not estimated here, and some of them hang or crash on small parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from compatembed_index.errors import ConfigError
from compatembed_index.limits import Limits

MAX_FACTORY_CHARS = 200
MAX_TRANSFORM_DIM = 65_536  # output dimension of a PCA/OPQ/RR transform
PRECOMPUTED_TABLE_MAX_BYTES = 2 << 30  # FAISS's own cap on IVFPQ precomputed tables

_ENCODING = re.compile(r"Flat|SQ(?P<sq>[468])|SQ(?:fp16|bf16)|PQ(?P<m>\d+)(?:x(?P<nbits>\d+))?(?P<pqk>np|fsr|fs)?",
                       re.ASCII)
_TRANSFORM = re.compile(r"(?P<kind>PCAWR|PCAW|PCAR|PCA|RR)(?P<d>\d+)|OPQ(?P<m>\d+)(?:_(?P<od>\d+))?|L2norm", re.ASCII)


@dataclass
class FactorySpec:
    """What a factory string asks for, as far as memory and training go.

    Attributes:
        factory: the string.
        nlist: inverted lists (0: not an IVF/IMI index).
        trainable: whether the index needs training (so the segment stages ``train_size`` vectors first).
        parts: per component, (name, bytes allocated before the first vector, bytes per stored vector).
    """

    factory: str
    nlist: int = 0
    trainable: bool = False
    parts: list[tuple[str, int, int]] = field(default_factory=list)

    def default_train_size(self) -> int:
        """The training-set size a segment uses when none is configured (as :class:`Segment` computes it)."""
        size = 256
        if self.nlist:
            size = max(size, 39 * self.nlist)
        if "PQ" in self.factory.upper():
            size = max(size, 9984)
        return size


class _Parser:
    def __init__(self, factory: str, limits: Limits, dim: int) -> None:
        self.factory, self.limits = factory, limits
        self.dim = dim  # current dimension (transforms change it)
        self.spec = FactorySpec(factory)

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"invalid FAISS factory string {self.factory!r}: {message}")

    def bound(self, value: int, low: int, high: int, what: str, limit: str | None) -> int:
        if value < low:
            raise self.fail(f"{what} must be at least {low}, got {value}")
        if value > high:
            named = f"the limit {limit}={high}" if limit else f"the limit of {high}"
            raise self.fail(f"{what} {value} is above {named}")
        return value

    def part(self, what: str, fixed: float, per_vector: float) -> None:
        self.spec.parts.append((what, int(fixed), int(per_vector)))

    # -- components ------------------------------------------------------------------------------
    def transform(self, comp: str) -> bool:
        m = _TRANSFORM.fullmatch(comp)
        if m is None:
            return False
        if comp == "L2norm":
            return True
        d_in = self.dim
        if m["m"] is not None:
            self.bound(int(m["m"]), 1, self.limits.max_pq_m, "OPQ M", "max_pq_m")
            d_out = int(m["od"]) if m["od"] is not None else d_in
        else:
            d_out = int(m["d"])
        self.bound(d_out, 1, MAX_TRANSFORM_DIM, f"{comp}: output dimension", None)
        self.part(comp, 4.0 * d_in * d_out + 8.0 * max(d_in, d_out), 0)
        self.spec.trainable = True
        self.dim = d_out
        return True

    def encoding(self, comp: str, *, under_ivf: bool = False) -> bool:
        m = _ENCODING.fullmatch(comp)
        if m is None:
            return False
        d = self.dim
        if comp == "Flat":
            self.part(comp, 0, 4.0 * d)
        elif m["sq"] is not None:
            self.part(comp, 8.0 * d, math.ceil(d * int(m["sq"]) / 8))
            self.spec.trainable = True
        elif comp.startswith("SQ"):
            self.part(comp, 0, 2.0 * d)
        else:
            pq_m = self.bound(int(m["m"]), 1, self.limits.max_pq_m, "PQ M", "max_pq_m")
            default_bits = 4 if m["pqk"] in ("fs", "fsr") else 8
            nbits = int(m["nbits"]) if m["nbits"] is not None else default_bits
            self.bound(nbits, 1, self.limits.max_pq_nbits, "PQ nbits", "max_pq_nbits")
            fixed = 4.0 * (2**nbits) * d  # M codebooks of 2**nbits centroids of d/M floats
            if under_ivf:  # IVFPQ's precomputed tables (FAISS caps them)
                fixed += min(4.0 * self.spec.nlist * pq_m * 2**nbits, PRECOMPUTED_TABLE_MAX_BYTES)
            self.part(comp, fixed, math.ceil(pq_m * nbits / 8))
            self.spec.trainable = True
        return True

    def hnsw_m(self, text: str, what: str) -> int:
        return self.bound(int(text), 2, self.limits.max_hnsw_m, what, "max_hnsw_m")

    def parse(self) -> FactorySpec:
        f = self.factory
        if not isinstance(f, str) or not f.strip():
            raise ConfigError("factory must be a non-empty FAISS factory string such as 'Flat' or 'IVF256,Flat'")
        if len(f) > MAX_FACTORY_CHARS:
            raise ConfigError(f"factory string has {len(f)} characters, above the limit of {MAX_FACTORY_CHARS}")
        comps = [c.strip() for c in f.split(",")]
        i = 0
        if comps[0] in ("IDMap", "IDMap2"):
            i += 1
        while i < len(comps) and self.transform(comps[i]):
            i += 1
        if i >= len(comps):
            raise self.fail("no index after the transforms (e.g. Flat, HNSW32, IVF256,Flat)")
        d_in_vectors = self.dim
        comp = comps[i]
        ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", comp, re.ASCII)
        imi = re.fullmatch(r"IMI2x(\d+)", comp, re.ASCII)
        hnsw = re.fullmatch(r"HNSW(\d+)(?:_(.+))?", comp, re.ASCII)
        if ivf or imi:
            if ivf:
                nlist = self.bound(int(ivf[1]), 1, self.limits.max_nlist, "IVF nlist", "max_nlist")
                fixed = nlist * (4.0 * self.dim + 48)
                if ivf[2] is not None:
                    m = self.hnsw_m(ivf[2], "HNSW M of the IVF quantiser")
                    fixed += nlist * (8.0 * m + 16)
            else:
                bits = int(imi[1])  # type: ignore[index]
                if bits < 1 or bits > 31 or 4**bits > self.limits.max_nlist:
                    nl = 4**bits if 1 <= bits <= 31 else f"4^{bits}"
                    raise self.fail(f"IMI nlist {nl} (IMI2x{bits}) is outside [4, max_nlist={self.limits.max_nlist}]")
                nlist = 4**bits
                fixed = 4.0 * 2**bits * self.dim + 48.0 * nlist
            self.spec.nlist = nlist
            self.spec.trainable = True
            self.part(comp, fixed, 8)
            i += 1
            if i >= len(comps) or not self.encoding(comps[i], under_ivf=True):
                got = comps[i] if i < len(comps) else "nothing"
                raise self.fail(f"{comp} must be followed by an encoding (Flat, SQ8, PQ<M>, ...), got {got}")
            i += 1
        elif hnsw:
            m = self.hnsw_m(hnsw[1], "HNSW M")
            self.part(comp, 0, 8.0 * m + 16 + 48)  # links, levels, and the IDMap2 wrapper
            i += 1
            if hnsw[2] is not None:
                if not self.encoding(hnsw[2]):
                    raise self.fail(f"unsupported HNSW encoding {hnsw[2]!r}")
            elif i < len(comps) and self.encoding(comps[i]):
                i += 1
            else:
                self.part("Flat", 0, 4.0 * self.dim)
        elif self.encoding(comp):
            self.part("IDMap2", 0, 48)
            i += 1
        else:
            raise self.fail(
                f"unsupported component {comp!r} (supported: Flat, SQ4/6/8/fp16/bf16, PQ<M>[x<nbits>], "
                "IVF<nlist>[_HNSW<M>], IMI2x<bits>, HNSW<M>, transforms PCA/OPQ/RR/L2norm, RFlat/Refine(...))"
            )
        if i < len(comps):
            comp = comps[i]
            refine = re.fullmatch(r"Refine\((.+)\)", comp, re.ASCII)
            if comp == "RFlat" or (refine and _ENCODING.fullmatch(refine[1])):
                saved, self.dim = self.dim, d_in_vectors
                self.encoding("Flat" if comp == "RFlat" else refine[1])  # type: ignore[index]
                self.dim = saved
                i += 1
        if i < len(comps):
            raise self.fail(f"unexpected component {comps[i]!r} after the index")
        return self.spec


def parse_factory(factory: str, limits: Limits, dim: int = 1536) -> FactorySpec:
    """Parse ``factory`` and check every count against ``limits``; nothing is built.

    Raises:
        ConfigError: an unsupported component, or a count (nlist, HNSW M, PQ M or nbits, a transform's
            dimension) outside its bounds; the message names the parameter and the limit.
    """
    return _Parser(factory, limits, dim).parse()


def estimate_bytes(spec: FactorySpec, dim: int, train_size: int | None) -> tuple[int, int]:
    """(bytes before the first vector, bytes of the training stage) of a segment of dimension ``dim``.

    ``spec`` comes from :func:`parse_factory` with the same ``dim``. The training stage holds
    ``train_size`` raw vectors in the exact staging index, a copy of them handed to FAISS's training,
    and their codes in the trained index.
    """
    fixed = sum(p[1] for p in spec.parts)
    per_vector = sum(p[2] for p in spec.parts)
    training = 0
    if spec.trainable:
        n = int(train_size) if train_size else spec.default_train_size()
        training = n * (8 * dim + per_vector)
    return fixed, training


def check_factory(factory: str, limits: Limits, *, dim: int | None = None, train_size: int | None = None,
                  what: str = "") -> None:
    """Refuse a factory string whose counts or (when ``dim`` is given) estimated memory exceed ``limits``.

    Raises:
        ConfigError: naming the parameter and the limit it exceeds.
    """
    spec = parse_factory(factory, limits, dim or 1536)
    if dim is None:
        return
    fixed, training = estimate_bytes(spec, dim, train_size)
    total = fixed + training
    if total > limits.max_index_bytes:
        where = f" for {what}" if what else ""
        detail = f"{_gib(fixed)} before the first vector"
        if training:
            n = train_size or spec.default_train_size()
            detail += f" + {_gib(training)} to stage and train on {n} vectors"
        raise ConfigError(
            f"factory {factory!r} at dim {dim}{where}: estimated memory {_gib(total)} ({detail}) is above the "
            f"limit max_index_bytes={limits.max_index_bytes}; lower nlist, the PQ size or train_size"
        )


def check_search_params(search_params: str, limits: Limits) -> None:
    """Every ``name=value`` of a ParameterSpace string must be at most ``max_search_param``.

    ``efSearch=10**9`` would make every HNSW search allocate a gigabyte-sized candidate heap.
    """
    if not isinstance(search_params, str):
        return  # the segment refuses the type itself
    for part in filter(None, (p.strip() for p in search_params.split(","))):
        name, _, value = part.partition("=")
        try:
            v = float(value)
        except ValueError:
            continue  # the segment refuses it with its own message
        if v > limits.max_search_param:
            raise ConfigError(
                f"search parameter {name.strip()}={value.strip()} is above the limit max_search_param="
                f"{limits.max_search_param}"
            )


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
