"""Dilated 2-D neighborhood attention behind one signature.

Backends:
  * ``natten``    -- NATTEN >= 0.20 ``na2d`` (fused kernels on CUDA; FlexAttention elsewhere). No RPB.
  * ``reference`` -- pure PyTorch: any odd kernel, any dilation, border clamping, optional RPB and
                     attention dropout. Also supplies the legacy ``natten2dqkrpb`` / ``natten2dav``
                     functions that transformers' DiNAT imports (see ``dinat.compat``).
  * ``auto``      -- resolved once per model: ``natten`` on CUDA, otherwise whichever measures
                     faster on CPU (``reference``, see benchmarks); ``reference`` whenever RPB is on.

Semantics (NATTEN's, also those of the published DiNAT): along each axis a position ``i`` belongs to
the dilation group ``i % d``; inside its group (coordinates ``i // d``) it attends to the ``k``
consecutive group members whose window is centred on it, shifted inwards at the borders. RPB is
indexed by the group-coordinate offset ``key - query + k - 1`` in ``[0, 2k - 2]``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "natten", "reference")


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return hasattr(natten, "na2d")


def natten_has_cuda_kernels() -> bool:
    """Whether NATTEN was built with libnatten (its fused CUDA kernels); without it na2d runs FlexAttention."""
    import natten

    return bool(getattr(natten, "HAS_LIBNATTEN", False))


@functools.cache
def _axis_index(length: int, kernel_size: int, dilation: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour indices and RPB indices along one axis.

    Returns ``(nbr, rpb_idx)``, both ``(length, kernel_size)`` int64: ``nbr[i, a]`` is the position of
    the a-th neighbour of ``i``; ``rpb_idx[i, a]`` its relative-position bias index.
    """
    pos = torch.arange(length)
    group, coord = pos % dilation, pos // dilation  # (L,)
    group_len = (length - group + dilation - 1) // dilation  # members of each position's group
    if int(group_len.min()) < kernel_size:
        raise ValueError(
            f"neighborhood attention needs each axis >= kernel_size * dilation; got length {length}, "
            f"kernel_size {kernel_size}, dilation {dilation}"
        )
    start = (coord - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, group_len - kernel_size)  # (L,)
    offs = torch.arange(kernel_size)
    nbr_coord = start[:, None] + offs[None, :]  # (L, K) in group coordinates
    nbr = nbr_coord * dilation + group[:, None]
    rpb_idx = nbr_coord - coord[:, None] + kernel_size - 1
    return nbr.to(device), rpb_idx.to(device)


def _check_kernel(kernel_size: int, dilation: int) -> None:
    if kernel_size < 2 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd number >= 3, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def _gather_neighbours(x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(B, heads, H, W, D) -> (B, heads, H, W, K*K, D): each query's neighbourhood, row-major."""
    B, N, H, W, D = x.shape
    nbr_h, _ = _axis_index(H, kernel_size, dilation, str(x.device))
    nbr_w, _ = _axis_index(W, kernel_size, dilation, str(x.device))
    flat = nbr_h[:, None, :, None] * W + nbr_w[None, :, None, :]  # (H, W, K, K)
    return x.reshape(B, N, H * W, D)[:, :, flat.reshape(-1)].reshape(B, N, H, W, kernel_size**2, D)


def _rpb_bias(rpb: torch.Tensor, H: int, W: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """rpb (heads, 2K-1, 2K-1) -> bias (heads, H, W, K*K)."""
    _, idx_h = _axis_index(H, kernel_size, dilation, str(rpb.device))
    _, idx_w = _axis_index(W, kernel_size, dilation, str(rpb.device))
    flat = idx_h[:, None, :, None] * (2 * kernel_size - 1) + idx_w[None, :, None, :]  # (H, W, K, K)
    return rpb.flatten(1)[:, flat.reshape(-1)].reshape(rpb.shape[0], H, W, kernel_size**2)


def natten2dqkrpb(
    query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int, dilation: int
) -> torch.Tensor:
    """Legacy NATTEN layout: query/key (B, heads, H, W, D) -> scores (B, heads, H, W, K*K), RPB added.

    ``query`` must already be scaled.
    """
    _check_kernel(kernel_size, dilation)
    keys = _gather_neighbours(key, kernel_size, dilation)
    scores = torch.einsum("bnhwd,bnhwkd->bnhwk", query, keys)
    if rpb is not None:
        scores = scores + _rpb_bias(rpb, query.shape[2], query.shape[3], kernel_size, dilation).to(scores.dtype)
    return scores


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Legacy NATTEN layout: attn (B, heads, H, W, K*K), value (B, heads, H, W, D) -> (B, heads, H, W, D)."""
    _check_kernel(kernel_size, dilation)
    values = _gather_neighbours(value, kernel_size, dilation)
    return torch.einsum("bnhwk,bnhwkd->bnhwd", attn, values)


def na2d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    attn_drop: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch neighborhood attention. q, k, v: (B, H, W, heads, D) -> (B, H, W, heads, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))  # (B, heads, H, W, D)
    attn = natten2dqkrpb(q * scale, k, rpb, kernel_size, dilation).softmax(dim=-1)
    if attn_drop > 0.0:
        attn = F.dropout(attn, attn_drop, training)
    return natten2dav(attn, v, kernel_size, dilation).permute(0, 2, 3, 1, 4)


def na2d_natten(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    attn_drop: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """NATTEN's ``na2d``; same signature as :func:`na2d_reference`. No RPB, no attention dropout."""
    import natten

    if rpb is not None:
        raise ValueError(
            "the 'natten' attention backend has no relative positional bias (NATTEN >= 0.20); "
            "use attention_backend='reference' for checkpoints with RPB"
        )
    if attn_drop > 0.0 and training:
        raise ValueError("the 'natten' attention backend has no attention dropout; set attention_probs_dropout_prob=0")
    _check_kernel(kernel_size, dilation)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "NATTEN's CPU path (FlexAttention) has no backward; train on CPU with "
            "attention_backend='reference' (or 'auto')"
        )
    return natten.na2d(q, k, v, kernel_size=kernel_size, dilation=dilation, scale=scale)


_IMPLS = {"natten": na2d_natten, "reference": na2d_reference}


def resolve_backend(name: str, use_rpb: bool, attn_drop: float = 0.0, device: torch.device | str = "cpu") -> str:
    """Pick a concrete backend for a model, once. ``auto`` logs its choice; impossible requests raise."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "natten":
        if not natten_available():
            raise ValueError("attention_backend='natten' but NATTEN (>= 0.20, with natten.na2d) is not installed")
        if use_rpb:
            raise ValueError(
                "attention_backend='natten' cannot run relative positional bias (use_rpb=True): "
                "NATTEN's fused kernels dropped RPB in 0.20; use 'reference' or use_rpb=False"
            )
        if attn_drop > 0.0:
            raise ValueError(
                "attention_backend='natten' has no attention dropout; "
                f"attention_probs_dropout_prob={attn_drop} needs 'reference'"
            )
        _warn_without_cuda_kernels(torch.device(device))
        return name
    if name == "reference":
        return name
    device = torch.device(device)
    if use_rpb or attn_drop > 0.0 or not natten_available():
        chosen, why = "reference", "RPB/attention dropout on" if (use_rpb or attn_drop > 0.0) else "NATTEN missing"
    elif device.type == "cuda":
        chosen, why = "natten", "CUDA device"
    else:
        # On CPU NATTEN runs uncompiled FlexAttention, which has no backward and is slower than the
        # reference at DiNAT's large maps (python -m dinat.benchmark attention).
        chosen, why = "reference", f"{device.type} device"
    logger.info("attention_backend=auto -> %s (%s)", chosen, why)
    if chosen == "natten":
        _warn_without_cuda_kernels(device)
    return chosen


def _warn_without_cuda_kernels(device: torch.device) -> None:
    if device.type == "cuda" and not natten_has_cuda_kernels():
        logger.warning(
            "NATTEN was built without its CUDA kernels (no libnatten): na2d falls back to FlexAttention. "
            "Build a wheel for this GPU with launch/natten_wheel.sh and install it with NATTEN_SPEC"
        )


def get_attention_fn(backend: str):
    """The na2d function for a concrete backend name."""
    if backend not in _IMPLS:
        raise ValueError(f"not a concrete attention backend: {backend!r} (resolve 'auto' first)")
    return _IMPLS[backend]
