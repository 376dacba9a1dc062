"""The refresh of a sharded gradient: two ways to compute the projector B (docs/DESIGN.md §10).

**Sketch** (G' sliced along the kept dimension k, randomized SVD): the single-process algorithm of
:func:`galore_kernels.projector.compute_projector` with every product over k split across processes and
summed by one all-reduce. Each process draws its own rows of the same Ω (rows are global column indices
of G', so Ω is the single-process one), and no process ever forms more than its slice of G.

==============================  =============================  =====================================
product                         all-reduced                    then, on every process alike
==============================  =============================  =====================================
Y = G'·Ω                        d × w (fp32)                   Householder QR → Q
Z = G'ᵀ·Q (local rows)          Gram ZᵀZ, w × w (fp64)         Cholesky-QR of Z (or all-gather Z and
                                                               Householder it, when the Gram is
                                                               ill-conditioned), per power iteration
Y = G'·Z                        d × w (fp32)                   Householder QR → Q, per power iteration
M = QᵀG' (two-block Q, w₂)      Gram MMᵀ, w₂ × w₂ (fp64)       eigh → top r left singular vectors
==============================  =============================  =====================================

**Gather**: the owner process (the parameter's seed modulo the world size, so owners go round-robin
over parameters) gathers G, runs the single-process refresh on it, and broadcasts B: bit-equal to one
process, exact SVD included, at the cost of the full gradient crossing once and sitting on the owner.

:func:`choose_refresh` picks per shape by the bytes each sends (see its docstring for the rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import projector as proj
from .. import reference, rng
from ..config import GaLoreConfig
from ..rng import sketch_seed
from ..state import compute_dtype
from .layout import ShardLayout

__all__ = [
    "REFRESH_METHODS",
    "choose_refresh",
    "sketch_refresh_elements",
    "gather_refresh_elements",
    "refresh_bytes",
    "preferred_refresh",
    "sketched_projector",
    "gathered_projector",
    "refresh_sharded_projector_",
]

REFRESH_METHODS = ("local", "sketch", "gather")
# "auto" takes the sketch unless the gather moves less than this fraction of its bytes. On 2 gloo CPU
# processes the sketch refreshed 1024 × 2816 and 2048 × 5632 (r = 128) 1.8× and 2.3× faster than the
# gather and held half its largest tensor (galore-kernels bench --only sharded_refresh, bench/RESULTS.md):
# it splits the products while the owner computes alone. Bytes alone would pick the gather for Llama-7B's
# 4096 × 4096 on 8 GPUs by 0.4%.
_GATHER_BYTES_FRACTION = 0.5
# Cholesky-QR of Z is used while Z's condition number (estimated from the Cholesky factor's diagonal) is
# below this: with the Gram in fp64 its orthonormality error is about κ²·1e-16, 1e-8 here; beyond it, or
# when the Gram is singular (a rank-deficient gradient), Z is all-gathered and Householder-orthonormalized.
_CHOLESKY_MAX_CONDITION = 1e4

Reduce = Callable[[torch.Tensor], None]  # in-place sum over the layout's processes


def _all_reduce(group: dist.ProcessGroup) -> Reduce:
    def reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=group)

    return reduce


def _sketch_width(rank: int, oversample: int, d: int, k: int) -> int:
    return min(rank + oversample, d, k)


def sketch_refresh_elements(d: int, k: int, config: GaLoreConfig) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of every all-reduce of one sketch refresh of a d × k G', in order (no fallback)."""
    r = proj.effective_rank(config.rank, (d, k))
    w = _sketch_width(r, config.svd_oversample, d, k)
    sizes: list[tuple[tuple[int, ...], torch.dtype]] = [((1,), torch.float32), ((d, w), torch.float32)]
    for _ in range(config.svd_power_iters):
        sizes += [((w, w), torch.float64), ((d, w), torch.float32)]
    w2 = min(2 * w, d) if config.svd_power_iters else w
    return sizes + [((w2, w2), torch.float64)]


def gather_refresh_elements(d: int, k: int, rank: int, world_size: int, *, kept: bool = True) -> int:
    """Elements the owner receives and sends in one gather refresh of a d × k G': the other processes'
    slices of G (along k when ``kept``, else along d), then B."""
    sliced, other = (k, d) if kept else (d, k)
    return (world_size - 1) * -(-sliced // world_size) * other + proj.effective_rank(rank, (d, k)) * d


def refresh_bytes(d: int, k: int, config: GaLoreConfig, world_size: int, *, kept: bool = True) -> dict[str, float]:
    """Bytes the busiest process sends and receives in one refresh of a d × k G', per method: the sketch's
    all-reduces (a ring all-reduce moves 2·(P − 1)/P of its buffer per process; only when ``kept``) and
    the owner's share of the gather (fp32 slices of G, then B)."""
    costs = {"gather": 4.0 * gather_refresh_elements(d, k, config.rank, world_size, kept=kept)}
    if kept:
        sizes = sketch_refresh_elements(d, k, config)
        total = sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for shape, dtype in sizes)
        costs["sketch"] = 2.0 * (world_size - 1) / world_size * total
    return costs


def choose_refresh(layout: ShardLayout, side: str, config: GaLoreConfig) -> str:
    """"local", "sketch" or "gather" for a parameter of ``layout`` projected on ``side``.

    Not sliced: "local" (every process has G). The sketch needs the randomized SVD and G' sliced along k;
    otherwise "gather". The group's ``sharded_refresh`` can ask for either; with "auto", where both run,
    :func:`preferred_refresh` decides. For Llama-7B at r = 512 on 8 GPUs that is the sketch for every
    projected weight (4096 × 11008: 67.4 MB against the gather's 166.2 MB; 4096 × 4096: 67.4 MB against
    67.1 MB); the table is in docs/distributed.md.
    """
    if layout.matrix_dim is None:
        return "local"
    if config.svd != "randomized" or not layout.shards_kept_dimension(side) or config.sharded_refresh == "gather":
        return "gather"
    if config.sharded_refresh == "sketch":
        return "sketch"
    m, n = layout.matrix_shape
    d, k = (m, n) if side == "left" else (n, m)
    return preferred_refresh(refresh_bytes(d, k, config, layout.world_size))


def preferred_refresh(costs: dict[str, float]) -> str:
    """"sketch" or "gather" from :func:`refresh_bytes`: the sketch unless it cannot run (no "sketch" entry)
    or the gather moves less than half its bytes (the measurement behind the half is at the top of
    this module)."""
    if "sketch" in costs and costs["gather"] >= _GATHER_BYTES_FRACTION * costs["sketch"]:
        return "sketch"
    return "gather"


def _householder(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _gather_rows(x: torch.Tensor, layout: ShardLayout, total: int) -> torch.Tensor:
    """All processes' row slices of a (total × c) matrix, stacked in order (slices padded to one length)."""
    padded = x.new_zeros((layout.chunk, x.shape[1]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
    dist.all_gather(parts, padded, group=layout.group)
    return torch.cat(parts)[:total]


def _orthonormal_rows_slice(z: torch.Tensor, layout: ShardLayout, total: int, reduce: Reduce) -> torch.Tensor:
    """Orthonormal columns spanning a row-sliced Z (this process's rows of total × w), as local rows."""
    gram = z.double().mT @ z.double()
    reduce(gram)
    factor, info = torch.linalg.cholesky_ex(gram)
    diagonal = factor.diagonal()
    if int(info) == 0 and float(diagonal.max()) < _CHOLESKY_MAX_CONDITION * float(diagonal.min()):
        return torch.linalg.solve_triangular(factor, z.double().mT, upper=False).mT.to(z.dtype)
    full = _householder(_gather_rows(z, layout, total))
    return full[layout.offset : layout.offset + layout.length]


def sketched_projector(
    g_local: torch.Tensor,
    layout: ShardLayout,
    side: str,
    config: GaLoreConfig,
    *,
    seed: int,
    reduce: Reduce | None = None,
    source: rng.GaussianSource = rng.randn_range,
) -> torch.Tensor:
    """B (r × d, fp32) from this process's slice of G (kept dimension sliced), by the sketch of the module
    docstring: the single-process randomized projector up to fp32 rounding of the split sums, its rows
    of Ω drawn by ``source`` as one process draws them. ``reduce`` replaces the all-reduce (tests record
    what crosses)."""
    reduce = reduce or _all_reduce(layout.group)
    g = proj.oriented(g_local, side).float()  # d × k_local
    m, n = layout.matrix_shape
    d, k = (m, n) if side == "left" else (n, m)
    r = proj.effective_rank(config.rank, (m, n))
    w = _sketch_width(r, config.svd_oversample, d, k)
    y = g @ source(seed, layout.offset * w, layout.length * w, g.device).reshape(layout.length, w)
    reduce(y)
    q = _householder(y)
    previous = None
    for _ in range(config.svd_power_iters):
        previous = q
        z = _orthonormal_rows_slice(g.mT @ q, layout, k, reduce)
        y = g @ z
        reduce(y)
        q = _householder(y)
    if previous is not None:
        q = _householder(torch.cat([previous, q], dim=-1))
    m_local = (q.mT @ g).double()
    gram = m_local @ m_local.mT
    reduce(gram)
    _, vectors = torch.linalg.eigh(gram)  # ascending: the top r are the last columns
    top = vectors[:, -r:].flip(-1).to(q.dtype)
    return proj.canonical_signs(q @ top).mT.contiguous()


def gathered_projector(
    g_local: torch.Tensor,
    layout: ShardLayout,
    side: str,
    config: GaLoreConfig,
    *,
    seed: int,
    owner: int,
    source: rng.GaussianSource = rng.randn_range,
) -> torch.Tensor:
    """B from the whole G, computed by process ``owner`` (of the layout's group) exactly as one process
    would (Ω from ``source``), then broadcast: the owner alone holds G, once, for this call."""
    m, n = layout.matrix_shape
    rows = g_local if layout.matrix_dim == 0 else g_local.mT  # slices along dimension 0 of this view
    padded = rows.new_zeros((layout.chunk, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    owner_global = dist.get_global_rank(layout.group, owner)
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)] if layout.rank == owner else None
    dist.gather(padded, parts, dst=owner_global, group=layout.group)
    r = proj.effective_rank(config.rank, (m, n))
    d = m if side == "left" else n
    b = torch.empty((r, d), dtype=torch.float32, device=g_local.device)
    if layout.rank == owner:
        whole = torch.cat(parts)[: m if layout.matrix_dim == 0 else n]
        g = (whole if layout.matrix_dim == 0 else whole.mT).reshape(m, n)
        b = proj.compute_projector(
            g, config.rank, side, method=config.svd, seed=seed, oversample=config.svd_oversample,
            power_iters=config.svd_power_iters, sketch=proj.sketch_drawing_from(source),
        )
    dist.broadcast(b, src=owner_global, group=layout.group)
    return b


def refresh_sharded_projector_(
    state: dict[str, Any],
    g_local: torch.Tensor,
    layout: ShardLayout,
    side: str,
    config: GaLoreConfig,
    *,
    method: str | None = None,
    reduce: Reduce | None = None,
    source: rng.GaussianSource = rng.randn_range,
) -> str:
    """:func:`galore_kernels.reference.refresh_projector_` for a sharded gradient (local ``state`` from
    :func:`galore_kernels.sharded.state.local_view`), Ω drawn by ``source``; returns the method used.
    Whether G can define a subspace is decided on its global norm, so every process keeps or replaces B
    alike."""
    method = method or choose_refresh(layout, side, config)
    if method not in REFRESH_METHODS:
        raise ValueError(f"method must be one of {REFRESH_METHODS}, got {method!r}")
    seed = sketch_seed(state["seed"], state["step"])
    square = torch.linalg.vector_norm(g_local, dtype=compute_dtype(g_local.dtype)).square().float().reshape(1)
    if method != "local":
        (reduce or _all_reduce(layout.group))(square)
    m, n = layout.matrix_shape
    usable = bool(square.sqrt() > torch.finfo(torch.float32).tiny * math.sqrt(m * n))
    state["pending_refresh"] = 0 if usable else 1
    if not usable:
        return method
    if method == "local":
        b = proj.compute_projector(
            g_local.reshape(m, n), config.rank, side, method=config.svd, seed=seed,
            oversample=config.svd_oversample, power_iters=config.svd_power_iters,
            sketch=proj.sketch_drawing_from(source),
        )
    elif method == "sketch":
        b = sketched_projector(g_local, layout, side, config, seed=seed, reduce=reduce, source=source)
    else:
        owner = state["seed"] % layout.world_size
        b = gathered_projector(g_local, layout, side, config, seed=seed, owner=owner, source=source)
    # Every process holds the whole B, so each aligns it alike, as one process does.
    state["projector"].copy_(reference.aligned_projector(b, state["projector"], config))
    return method
