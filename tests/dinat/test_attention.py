"""The reference backend against NATTEN: forward directly, gradients and RPB through a dense oracle whose
neighbourhoods NATTEN itself defines."""

import natten
import pytest
import torch

from dinat.attention import na2d_natten, na2d_reference, natten2dav, natten2dqkrpb, resolve_backend
from tests.conftest import requires_cuda

# (H, W, kernel, dilation): square, non-square, non-divisible by the dilation, kernels 3-13, dilations 1-8
FORWARD_CASES = [
    (8, 8, 3, 1),
    (24, 24, 3, 8),
    (13, 31, 3, 4),
    (20, 17, 5, 3),
    (14, 14, 7, 1),
    (56, 56, 7, 8),
    (29, 35, 7, 4),
    (23, 18, 9, 2),
    (11, 30, 11, 1),
    (27, 40, 11, 2),
    (13, 13, 13, 1),
    (26, 39, 13, 2),
    (45, 50, 5, 7),
    (30, 33, 5, 6),
    (37, 19, 3, 5),
]
GRAD_CASES = [(9, 9, 3, 3), (24, 25, 3, 8), (13, 20, 5, 2), (14, 15, 7, 2), (11, 12, 11, 1), (13, 16, 13, 1)]


def qkv(B, H, W, heads, D, grad=False):
    return [torch.randn(B, H, W, heads, D, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("H,W,K,d", FORWARD_CASES)
def test_reference_matches_natten_forward(H, W, K, d):
    q, k, v = qkv(2, H, W, 2, 16)
    ref = na2d_reference(q, k, v, K, d)
    fused = natten.na2d(q, k, v, K, dilation=d)
    torch.testing.assert_close(ref, fused, atol=1e-5, rtol=1e-5)


def natten_neighbourhoods(H, W, K, d):
    """(H*W, H*W) bool: which keys each query attends to, according to NATTEN.

    With q = k = 0 the weights are uniform over the neighbourhood; values that are one-hot key positions
    (spread over the batch, 16 columns each) turn NATTEN's output into that weight matrix.
    """
    N = H * W
    C = -(-N // 16)
    eye = torch.zeros(N, C * 16)
    eye[:, :N] = torch.eye(N)
    v = eye.reshape(H, W, C, 16).permute(2, 0, 1, 3).unsqueeze(3)  # (C, H, W, 1, 16)
    q = torch.zeros_like(v)
    with torch.no_grad():
        out = natten.na2d(q, q, v, K, dilation=d)
    return out.squeeze(3).permute(1, 2, 0, 3).reshape(N, C * 16)[:, :N] > 0


def dense_attention(q, k, v, mask, scale, bias=None):
    """Plain softmax attention over all positions, restricted by ``mask``; (B, H, W, heads, D)."""
    B, H, W, heads, D = q.shape
    qf, kf, vf = (t.reshape(B, H * W, heads, D).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, D)
    scores = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).reshape(B, H, W, heads, D)


def dense_rpb_bias(rpb, H, W, K, d, mask):
    """Bias[h, i, j] = rpb[h, (j_y - i_y) / d + K - 1, (j_x - i_x) / d + K - 1] where ``mask`` holds."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[None, :] - ys[:, None]) // d + K - 1
    dx = (xs[None, :] - xs[:, None]) // d + K - 1
    valid = mask & (dy >= 0) & (dy < 2 * K - 1) & (dx >= 0) & (dx < 2 * K - 1)
    assert bool((valid == mask).all()), "a neighbour lies outside the RPB table"
    return rpb[:, dy.clamp(0, 2 * K - 2), dx.clamp(0, 2 * K - 2)]  # (heads, N, N)


@pytest.mark.parametrize("H,W,K,d", GRAD_CASES)
def test_reference_matches_natten_neighbourhoods_forward_and_gradients(H, W, K, d):
    mask = natten_neighbourhoods(H, W, K, d)
    assert int(mask.sum(1).min()) == int(mask.sum(1).max()) == K * K
    q, k, v = qkv(2, H, W, 2, 8, grad=True)
    scale = 8**-0.5
    ref = na2d_reference(q, k, v, K, d)
    dense = dense_attention(q, k, v, mask, scale)
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        dense.detach(), natten.na2d(q.detach(), k.detach(), v.detach(), K, dilation=d), atol=1e-5, rtol=1e-5
    )
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,W,K,d", [(9, 9, 3, 3), (13, 20, 5, 2), (14, 15, 7, 2), (13, 16, 13, 1)])
def test_reference_rpb_matches_dense_oracle(H, W, K, d):
    mask = natten_neighbourhoods(H, W, K, d)
    q, k, v = qkv(1, H, W, 3, 8, grad=True)
    rpb = torch.randn(3, 2 * K - 1, 2 * K - 1, requires_grad=True)
    scale = 8**-0.5
    ref = na2d_reference(q, k, v, K, d, rpb=rpb)
    dense = dense_attention(q, k, v, mask, scale, dense_rpb_bias(rpb, H, W, K, d, mask))
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v, rpb), g), torch.autograd.grad(dense, (q, k, v, rpb), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_legacy_layout_functions_compose_to_na2d():
    q, k, v = qkv(2, 10, 12, 2, 8)
    rpb = torch.randn(2, 9, 9)
    scale = 8**-0.5
    to_legacy = lambda t: t.permute(0, 3, 1, 2, 4)  # (B, heads, H, W, D)
    attn = natten2dqkrpb(to_legacy(q) * scale, to_legacy(k), rpb, 5, 2)
    assert attn.shape == (2, 2, 10, 12, 25)
    out = natten2dav(attn.softmax(-1), to_legacy(v), 5, 2).permute(0, 2, 3, 1, 4)
    torch.testing.assert_close(out, na2d_reference(q, k, v, 5, 2, rpb=rpb))


def test_reference_attention_dropout_only_in_training():
    q, k, v = qkv(1, 8, 8, 1, 8)
    base = na2d_reference(q, k, v, 3, 1)
    torch.testing.assert_close(na2d_reference(q, k, v, 3, 1, attn_drop=0.5, training=False), base)
    assert not torch.allclose(na2d_reference(q, k, v, 3, 1, attn_drop=0.5, training=True), base)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda q: na2d_reference(q, q, q, 4, 1), "kernel_size must be an odd number"),
        (lambda q: na2d_reference(q, q, q, 3, 0), "dilation must be >= 1"),
        (lambda q: na2d_reference(q, q, q, 5, 2), "each axis >= kernel_size \\* dilation; got length 8"),
        (lambda q: na2d_natten(q, q, q, 3, 1, rpb=torch.zeros(1, 5, 5)), "no relative positional bias"),
    ],
)
def test_bad_attention_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 8, 8, 1, 8))


def test_natten_backend_refuses_cpu_backward():
    q = torch.randn(1, 8, 8, 1, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        na2d_natten(q, q, q, 3, 1)


def test_resolve_backend():
    assert resolve_backend("auto", use_rpb=False, device="cpu") == "reference"
    assert resolve_backend("auto", use_rpb=True, device="cuda") == "reference"
    assert resolve_backend("natten", use_rpb=False) == "natten"
    with pytest.raises(ValueError, match="cannot run relative positional bias"):
        resolve_backend("natten", use_rpb=True)
    with pytest.raises(ValueError, match="no attention dropout"):
        resolve_backend("natten", use_rpb=False, attn_drop=0.1)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_backend("flash", use_rpb=False)


@pytest.mark.parametrize("backend", ["auto", "natten"])
def test_natten_without_cuda_kernels_is_reported_on_cuda(backend, caplog):
    """A NATTEN built without libnatten (as on this CPU machine) still runs on a GPU, through FlexAttention,
    far slower: choosing it for CUDA must say so and name the fix."""
    with caplog.at_level("WARNING", logger="dinat.attention"):
        assert resolve_backend(backend, use_rpb=False, device="cuda") == "natten"
    assert ("built without its CUDA kernels" in caplog.text) == (not natten.HAS_LIBNATTEN)
    assert ("launch/natten_wheel.sh" in caplog.text) == (not natten.HAS_LIBNATTEN)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinat.attention"):
        resolve_backend("natten", use_rpb=False, device="cpu")  # CPU runs FlexAttention anyway
    assert "built without its CUDA kernels" not in caplog.text


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("H,W,K,d", [(56, 56, 7, 8), (28, 28, 7, 4), (14, 14, 7, 2), (7, 7, 7, 1), (20, 33, 5, 3)])
def test_fused_matches_reference_on_cuda(H, W, K, d, dtype, tol):
    q, k, v = (torch.randn(2, H, W, 4, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    fused = na2d_natten(q, k, v, K, d)
    ref = na2d_reference(*(t.float() for t in (q, k, v)), K, d)
    torch.testing.assert_close(fused.float(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    gf = torch.autograd.grad(fused, (q, k, v), g.to(dtype))
    gr = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 5, rtol=tol * 5)
