"""A drop-in ``conv_general_dilated`` whose gradients stay fast inside ``lax.scan`` on CPU.

XLA's CPU backend rewrites convolutions into the one layout its fast kernels take
(NHWC x HWIO -> NHWC) only outside loops. Inside the while loop that ``lax.scan`` becomes,
the gradient convolutions JAX emits (weight gradient: f01b_i01o->01bf; input gradient: a
kernel in OI order) stay in other layouts and run in XLA's naive emitter: a reference-CNN
step measured ~20 s inside a scan against ~0.7 s outside. Here the two gradients are written
as explicit transposes around NHWC x HWIO -> NHWC convolutions, so every convolution of the
step is in the fast layout wherever it runs. The weight gradient is one matmul of the input's
patches instead (as a convolution XLA:CPU ran it at ~28 GFLOP/s). This is a CPU workaround:
on accelerators (cuDNN), and for other cases (strides, dilation, groups, other layouts), the
convolution is ``lax.conv_general_dilated`` with JAX's own gradients.
"""

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Pads = Tuple[Tuple[int, int], ...]
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated``, with a scan-friendly gradient for stride-1 NHWC convs on
    the CPU."""
    ones = (1,) * (lhs.ndim - 2)
    simple = (jax.default_backend() == "cpu" and lhs.ndim == 4 and tuple(window_strides) == ones
              and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
              and feature_group_count == 1 and batch_group_count == 1 and precision is None
              and preferred_element_type is None
              and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
              == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if min(min(pair) for pair in padding) < 0:  # cropping: lax's own gradients
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        dimension_numbers=dimension_numbers)
    return _conv(lhs, rhs, padding)


def _nhwc_conv(x: jax.Array, w: jax.Array, padding: Sequence[Tuple[int, int]]) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, padding: Pads) -> jax.Array:
    return _nhwc_conv(x, w, padding)


def _conv_fwd(x, w, padding):
    return _nhwc_conv(x, w, padding), (x, w)


def _conv_bwd(padding, residuals, g):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    # dW[i, j, c, o] = sum_{n, h, w} x_pad[n, h + i, w + j, c] * g[n, h, w, o]: one matmul of
    # the input's patches, laid out channel-major (kh*kw*cin, n*ho*wo), with g as (n*ho*wo,
    # cout). (As a convolution with g for kernel, XLA:CPU ran it at ~28 GFLOP/s.)
    _, ho, wo, _ = g.shape
    xc = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), *padding))  # c n h w
    patches = jnp.stack([xc[:, :, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)])
    dw = (patches.reshape(kh * kw * cin, -1) @ g.reshape(-1, cout)).reshape(kh, kw, cin, cout)
    # dX = g convolved with the spatially flipped kernel, in and out channels swapped.
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    (pt, pb), (pl, pr) = padding
    dx = _nhwc_conv(g, flipped, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)
