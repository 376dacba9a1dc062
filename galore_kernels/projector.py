"""Projector side, rank and refresh schedule, and the two ways to compute the projector (docs/DESIGN.md §3).

Everything here works on tensors: the canonical projector is B (r × d) with orthonormal rows, applied
as S = B · G' where G' = G for the left side and Gᵀ for the right side. A stack of matrices (experts ×
m × n) gets a stack of projectors (experts × r × d) from the same batched computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import rng
from .config import GaLoreConfig

__all__ = [
    "PROJ_TYPES",
    "SVD_METHODS",
    "resolve_side",
    "effective_rank",
    "is_refresh_step",
    "oriented",
    "compute_projector",
    "compute_full_projectors",
    "canonical_signs",
    "align_projector",
    "gaussian_sketch",
    "sketch_drawing_from",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
ALIGNMENTS = ("procrustes", "signs", "none")
SIDES = ("left", "right")


def resolve_side(proj_type: str, shape: tuple[int, int]) -> str:
    """The side a 2-D gradient of ``shape`` is projected on: "left", "right" or "full".

    "std" projects the smaller dimension (m ≥ n → right), "reverse_std" the larger one.

    >>> resolve_side("std", (4096, 11008)), resolve_side("reverse_std", (4096, 11008))
    ('left', 'right')
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def effective_rank(rank: int, shape: tuple[int, int]) -> int:
    """The rank actually used: ``min(rank, m, n)``."""
    return min(int(rank), *shape)


def _check_refresh_args(grad_2d: torch.Tensor, rank: int, oversample: int, power_iters: int) -> None:
    if grad_2d.dim() < 2:
        raise ValueError(f"expected a 2-D gradient or a stack of them, got shape {tuple(grad_2d.shape)}")
    for name, value, minimum in (("rank", rank, 1), ("oversample", oversample, 0), ("power_iters", power_iters, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def is_refresh_step(step: int, update_proj_gap: int, offset: int = 0) -> bool:
    """Whether the projector is recomputed before projecting the gradient of step ``step`` (0-based).

    Step 0 always refreshes (there is no projector yet); after it, steps ``offset``, ``offset + T``, …
    do. An offset in [0, T) staggers parameters' refreshes so that they do not all fall on one step,
    and no interval exceeds T.

    >>> [t for t in range(12) if is_refresh_step(t, 4, offset=3)]
    [0, 3, 7, 11]
    """
    return step == 0 or (step >= offset and (step - offset) % update_proj_gap == 0)


def oriented(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """G' of docs/DESIGN.md §3: the matrix itself for the left side, its transpose (a view) for the right;
    the last two dimensions of a stack."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return matrix if side == "left" else matrix.mT


def _orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    # Householder QR returns orthonormal columns even for zero or rank-deficient input (a zero column
    # gets a unit reflector), which is what keeps B free of NaN when the gradient vanishes.
    return torch.linalg.qr(y, mode="reduced").Q


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` with each column's sign chosen so that its entry of largest magnitude is positive.

    A singular vector is defined up to sign, and which sign an SVD or eigh returns depends on rounding;
    fixing it lets a refresh computed another way (sharded across processes, docs/DESIGN.md §10) give the
    same projector rows, so the moments kept across refreshes mean the same thing on every path.
    """
    return basis * _max_entry_signs(basis)


def _max_entry_signs(basis: torch.Tensor) -> torch.Tensor:
    index = basis.abs().argmax(dim=-2, keepdim=True)
    return torch.where(basis.gather(-2, index) < 0, -1.0, 1.0).to(basis.dtype)


def align_projector(new: torch.Tensor, previous: torch.Tensor, mode: str) -> torch.Tensor:
    """``new`` (r × d, or a stack) with its rows matched to ``previous``'s, spanning the same subspace.

    The moments kept across a refresh are coordinates in the previous basis; a randomized refresh of
    nearly the same subspace can return rows permuted, sign-flipped or rotated, which scrambles them, and
    which rows come back depends on rounding: an MLP trained layer-wise with 4 accumulated micro-batches
    ended 1.4e-5 (relative) from the plain run with 8-bit moments, and 1.1e-7 with "procrustes" (1.0e-7
    with "signs"; fp32 moments 1.1e-7 either way; tests/test_layerwise.py, 20 steps over 3 refreshes).

    "procrustes" applies R = U·Vᵀ from the SVD of C = previous·newᵀ (the orthogonal R minimizing
    ‖R·new − previous‖), "signs" flips each row whose inner product with its predecessor is negative,
    "none" returns ``new``. A matrix whose previous projector is all zeros (never refreshed) is
    left as it is.

    >>> b = torch.linalg.qr(torch.randn(16, 4)).Q.T
    >>> bool(torch.allclose(align_projector(-b.flip(0), b, "procrustes"), b, atol=1e-5))
    True
    """
    if mode not in ALIGNMENTS:
        raise ValueError(f"mode must be one of {ALIGNMENTS}, got {mode!r}")
    if mode == "none":
        return new
    new32, previous32 = new.float(), previous.float()
    c = previous32 @ new32.mT  # r × r
    if mode == "signs":
        aligned = new32 * torch.where(c.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-1)
    else:
        u, _, vh = torch.linalg.svd(c.double())
        aligned = (u @ vh).to(new32.dtype) @ new32
    had_projector = previous32.flatten(-2).abs().amax(dim=-1) > 0
    return torch.where(had_projector[..., None, None], aligned, new32).to(new.dtype)


Sketch = Callable[[torch.Tensor, int, int], torch.Tensor]


def gaussian_sketch(
    g: torch.Tensor, seed: int, width: int, *, source: rng.GaussianSource = rng.randn_range
) -> torch.Tensor:
    """Y = g·Ω (d × width, fp32) with Ω[i, j] = rng.randn(seed, i·width + j), materialized, its numbers
    drawn by ``source`` (the native CPU library passes its own).

    A stack of matrices shares one Ω: a Gaussian sketch needs only to be independent of the matrix it
    sketches. The Triton backend passes its own function computing the same Y without materializing Ω.
    """
    k = g.shape[-1]
    return g.float() @ source(seed, 0, k * width, g.device).reshape(k, width)


def sketch_drawing_from(source: rng.GaussianSource) -> Sketch:
    """:func:`gaussian_sketch` with its Ω drawn by ``source`` (the native library's, say)."""
    return functools.partial(gaussian_sketch, source=source)


def _randomized_basis(
    g: torch.Tensor, rank: int, *, seed: int, oversample: int, power_iters: int, sketch: Sketch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomized refresh's orthonormal basis Q (d × w or 2w) of g (d × k, or a stack) and M = Qᵀ·g, fp32."""
    d, k = g.shape[-2:]
    width = min(rank + oversample, d, k)
    q = _orthonormal_columns(sketch(g, seed, width))
    g = g.float()
    previous = None
    for _ in range(power_iters):
        previous = q
        z = _orthonormal_columns(g.mT @ q)
        q = _orthonormal_columns(g @ z)
    if previous is not None:
        # Keep the last two iterates (a two-block Krylov space) instead of the last one: on the slowly
        # decaying spectrum of the tests (1024×2816, σ_i ∝ i^-0.5, r = 128, p = 8, q = 2) the captured
        # top-r energy rises from 0.990 to 0.997 for one extra QR and a 2×-wide final step (measured again
        # at 2048×5632 and 4096×11008: 0.990/0.991 with one block, 0.9965/0.9970 with two).
        q = _orthonormal_columns(torch.cat([previous, q], dim=-1))
    return q, q.mT @ g


def _randomized_left(
    g: torch.Tensor, rank: int, *, seed: int, oversample: int, power_iters: int, sketch: Sketch
) -> torch.Tensor:
    """Approximate top-r left singular vectors U_r (d × r, fp32) of g (d × k, or a stack), canonical signs.

    The final step takes the eigenvectors of the fp64 Gram M·Mᵀ (2w × 2w) instead of an SVD of M (2w × k):
    the same vectors, and 1.9× faster at 4096×11008, r = 512 (2833 vs 5489 ms on 2 CPU cores; 202 vs
    203 ms at 2048×5632, r = 128), as the sharded sketch already does (docs/DESIGN.md §10). fp64 keeps
    the squared spectrum resolved: no NaN or loss of orthonormality on zero or rank-deficient gradients.
    """
    q, m = _randomized_basis(g, rank, seed=seed, oversample=oversample, power_iters=power_iters, sketch=sketch)
    m64 = m.double()
    _, vectors = torch.linalg.eigh(m64 @ m64.mT)  # ascending: the top r are the last columns
    return canonical_signs(q @ vectors[..., -rank:].flip(-1).to(q.dtype))


def _randomized_range(
    g: torch.Tensor, rank: int, *, seed: int, oversample: int, power_iters: int, sketch: Sketch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top singular vectors of g (d × k, or a stack): returns (U_r (d × r), Vh_r (r × k)), fp32,
    for ``proj_type="full"``, which needs both sides (so the final step is an SVD of M)."""
    q, m = _randomized_basis(g, rank, seed=seed, oversample=oversample, power_iters=power_iters, sketch=sketch)
    small_u, _, small_vh = torch.linalg.svd(m, full_matrices=False)
    u_r = q @ small_u[..., :rank]
    signs = _max_entry_signs(u_r)  # 1 × r: the pair (u_i, v_i) flips together
    return u_r * signs, small_vh[..., :rank, :] * signs.mT


def compute_projector(
    grad_2d: torch.Tensor,
    rank: int,
    side: str,
    *,
    method: str = GaLoreConfig.svd,
    seed: int = 0,
    oversample: int = GaLoreConfig.svd_oversample,
    power_iters: int = GaLoreConfig.svd_power_iters,
    sketch: Sketch = gaussian_sketch,
) -> torch.Tensor:
    """The canonical projector B (r × d, fp32, orthonormal rows) of a 2-D gradient, r = min(rank, m, n); a
    stack of gradients (E × m × n) gives a stack of projectors (E × r × d), each its matrix's own.

    ``method="exact"`` takes the top singular vectors from ``torch.linalg.svd`` of the gradient itself, as
    galore-torch does (Uᵀ rows for left, Vh rows for right), so signs match it. ``method="randomized"``
    sketches G' with a Gaussian Ω of width r + ``oversample`` drawn from ``seed`` (see :mod:`.rng`), runs
    ``power_iters`` subspace iterations re-orthonormalizing after every multiply, joins the last two
    iterates into one basis Q, and keeps the top r left singular vectors of Qᵀ·G' (eigenvectors of its
    fp64 Gram), mapped back by Q, with canonical signs. The rest of the arithmetic is fp32.

    >>> g = torch.randn(64, 32)
    >>> b = compute_projector(g, 8, "right", seed=3)
    >>> b.shape, bool(torch.allclose(b @ b.T, torch.eye(8), atol=1e-5))
    (torch.Size([8, 32]), True)
    """
    _check_refresh_args(grad_2d, rank, oversample, power_iters)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    r = effective_rank(rank, tuple(grad_2d.shape[-2:]))
    if method == "exact":
        u, _, vh = torch.linalg.svd(grad_2d.float(), full_matrices=False)
        return (u[..., :r].mT if side == "left" else vh[..., :r, :]).contiguous()
    if method == "randomized":
        u_r = _randomized_left(
            oriented(grad_2d, side), r, seed=seed, oversample=oversample, power_iters=power_iters, sketch=sketch
        )
        return u_r.mT.contiguous()
    raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")


def compute_full_projectors(
    grad_2d: torch.Tensor,
    rank: int,
    *,
    method: str = GaLoreConfig.svd,
    seed: int = 0,
    oversample: int = GaLoreConfig.svd_oversample,
    power_iters: int = GaLoreConfig.svd_power_iters,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both projectors of ``proj_type="full"``: (B_left (r × m), B_right (r × n)), S = B_left·G·B_rightᵀ.

    Both come from one (exact or randomized) SVD of G, so they are consistent with each other.
    """
    _check_refresh_args(grad_2d, rank, oversample, power_iters)
    r = effective_rank(rank, tuple(grad_2d.shape))
    g = grad_2d.float()
    if method == "exact":
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u[:, :r].T.contiguous(), vh[:r].contiguous()
    if method == "randomized":
        u_r, vh_r = _randomized_range(
            g, r, seed=seed, oversample=oversample, power_iters=power_iters, sketch=gaussian_sketch
        )
        return u_r.T.contiguous(), vh_r.contiguous()
    raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
