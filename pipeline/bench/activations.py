"""Activation memory of a DiNAT training step, derived from the model's structure.

What autograd keeps from the forward for the backward (``DinatLayer.forward``, the two attention backends,
stem, downsamplers, head), per image, in bytes. Per DinatLayer on an (H, W) map of C channels: N = H*W,
Np = the map the attention runs at (zero-padded to kernel_size * dilation), h heads, K = kernel size,
r = MLP ratio, b = bytes per activation element (2 bf16/fp16, 4 fp32); LayerNorm mean/rstd are fp32:

    every layer   b * (C*N*(3 + 2r) + C*Np) + 16*N    input, LN2 in/out, MLP hidden before/after GELU, the
                                                      q/k/v projections' input (padded); LN statistics
    reference     + b * (C*Np*(2 + 2K^2) + h*K^2*Np)  scaled q (einsum copy), gathered keys and values,
                                                      softmax output, attention output
                  + 16 * K^2 * Np per layer           neighbour indices (int64), not per image
    natten        + b * 4*C*Np + 4*h*Np               q, k, v, output, logsumexp (NATTEN's save_for_backward)
    layer scale   + b * 2*C*N                         the two scaled branches
    drop path     + b * 2                             the per-image masks

A checkpointed layer keeps only its input (b*C*N) and rebuilds the rest in backward, one layer at a time.
The peak is simulated over the layers in order (forward, then backward in reverse), adding each layer's
working set beyond what it keeps (``fwd_transient``, ``bwd_transient``: the reference backend's gathered
neighbourhoods and their gradients; NATTEN's permuted copies and q/k/v gradients). The reference terms are
checked against ``saved_tensors_hooks`` and ``PeakTensorMemory`` on CPU (tests/pipeline/test_memory_plan.py);
the NATTEN terms follow NATTEN 0.21's autograd functions and have not been measured on a GPU here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dinat import DinatConfig

STATS = 4  # bytes of a LayerNorm mean / rstd element (fp32 for every input dtype)


@dataclass(frozen=True)
class Segment:
    """One part of the network in forward order; byte counts per image unless named ``fixed``."""

    name: str
    saved: float  # kept from forward to backward without checkpointing
    boundary: float = 0.0  # kept when checkpointed (the input)
    fwd_transient: float = 0.0  # working set beyond ``saved`` while its forward runs
    bwd_transient: float = 0.0  # working set beyond ``saved`` while its backward runs
    fixed: float = 0.0  # batch-independent bytes kept for backward
    checkpointed: bool = False

    def kept(self, batch: int) -> float:
        return batch * (self.boundary if self.checkpointed else self.saved) + (0.0 if self.checkpointed else self.fixed)

    def live(self, batch: int, transient: float) -> float:
        return batch * (self.saved + transient) + self.fixed


def _half(n: int) -> int:
    return (n - 1) // 2 + 1


def layer_segment(
    config: DinatConfig, level: int, dilation: int, hw: tuple[int, int], backend: str, b: int, drop_path: float
) -> Segment:
    """The :class:`Segment` of one DinatLayer on an ``hw`` map (see the module docstring for the terms)."""
    c, h, k2, r = config.embed_dim * 2**level, config.num_heads[level], config.kernel_size**2, config.mlp_ratio
    window = config.kernel_size * dilation
    n = hw[0] * hw[1]
    n_pad = max(hw[0], window) * max(hw[1], window)
    hidden = int(r * c)
    saved = b * (c * n * 3 + 2 * hidden * n + c * n_pad) + 4 * STATS * n
    if config.layer_scale_init_value > 0:
        saved += b * 2 * c * n
    if drop_path > 0:
        saved += b * 2
    # The attention's working set peaks while the MLP's saved tensors (LN2 in/out, hidden before/after GELU)
    # do not exist yet (forward) or no longer (backward); the MLP's backward needs gradients of the same size.
    mlp = b * (2 * hidden * n + 2 * c * n)
    fixed = 0.0
    if backend == "reference":
        saved += b * (c * n_pad * (2 + 2 * k2) + h * k2 * n_pad)
        fixed = 2 * 8 * k2 * n_pad
        fwd = b * (k2 * c * n_pad + 3 * c * n_pad) - mlp  # the gathered keys before einsum's copy, q/k/v
        bwd = b * (k2 * c * n_pad + h * k2 * n_pad + 3 * c * n_pad) - mlp  # a neighbourhood's gradient
    elif backend == "natten":
        saved += b * 4 * c * n_pad + STATS * h * n_pad
        fwd = b * 4 * c * n_pad - mlp  # token-permuted copies of q, k, v and the output (hopper-fna)
        bwd = b * 8 * c * n_pad - mlp  # dq, dk, dv, d_out and their permuted copies
    else:
        raise ValueError(f"not a concrete attention backend: {backend!r}")
    return Segment(f"level{level}.d{dilation}", saved, b * c * n, max(fwd, 0.0), max(bwd, mlp), fixed)


def segments(config: DinatConfig, image_size: int | tuple[int, int], backend: str, act_bytes: int) -> list[Segment]:
    """The network as :class:`Segment` s in forward order: stem, layers and downsamplers, head."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    b, c0 = act_bytes, config.embed_dim
    h2, w2 = _half(h), _half(w)
    h, w = _half(h2), _half(w2)
    stem_out = c0 * h * w
    out = [Segment("stem", b * (c0 // 2 * h2 * w2 + stem_out) + 2 * STATS * h * w, bwd_transient=2 * b * stem_out)]
    every = config.checkpoint_every
    drop_paths = _drop_paths(config)
    j = 0
    for level, dilations in enumerate(config.dilations):
        for d in dilations:
            seg = layer_segment(config, level, d, (h, w), backend, b, drop_paths[j])
            out.append(replace(seg, checkpointed=every > 0 and j % every == 0))
            j += 1
        c = config.embed_dim * 2**level
        if level < len(config.depths) - 1:
            n_in = c * h * w
            h, w = _half(h), _half(w)
            n_out = 2 * c * h * w
            out.append(Segment(f"downsample{level}", b * (n_in + n_out) + 2 * STATS * h * w, bwd_transient=b * n_in))
    c = config.num_features
    # final LN, classifier input, fp32 log-softmax, int64 label (cross-entropy also keeps a 4-byte weight total)
    head = b * (c * h * w + c) + 2 * STATS * h * w + 4 * config.n_labels + 8
    out.append(Segment("head", head, bwd_transient=b * c * h * w + 4 * config.n_labels, fixed=4))
    return out


def _drop_paths(config: DinatConfig) -> list[float]:
    """Per-layer drop path rates, as ``DinatEncoder`` spaces them (torch.linspace)."""
    n = sum(config.depths)
    return [config.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def activation_memory(
    config: DinatConfig, image_size: int | tuple[int, int], batch_size: int, backend: str, act_bytes: int
) -> dict[str, float]:
    """Activation bytes of one training step of ``batch_size`` images.

    Returns ``saved`` (kept at the end of the forward), ``peak`` (the most live at any point of forward and
    backward, parameter gradients not included), ``input`` (the batch itself, 3 channels) and ``per_image``
    (``saved`` without the batch-independent part, divided by the batch).
    """
    segs = segments(config, image_size, backend, act_bytes)
    kept = [s.kept(batch_size) for s in segs]
    peak = 0.0
    for i, s in enumerate(segs):  # forward: earlier segments' kept bytes plus this one's working set
        peak = max(peak, sum(kept[:i]) + s.live(batch_size, s.fwd_transient))
    for i in reversed(range(len(segs))):  # backward: later segments are freed; a checkpointed one is rebuilt
        s = segs[i]
        transient = max(s.bwd_transient, s.fwd_transient) if s.checkpointed else s.bwd_transient
        peak = max(peak, sum(kept[:i]) + s.live(batch_size, transient))
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return {
        "saved": sum(kept),
        "peak": peak,
        "input": float(batch_size * act_bytes * config.num_channels * h * w),
        "per_image": sum(s.boundary if s.checkpointed else s.saved for s in segs),
    }
