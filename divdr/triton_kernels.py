"""Triton kernels for the two kinds of memory-bound work a Layer16 training step spends the most launches on
beside convolutions and BatchNorm (issue #20; the kernel profile of a captured step on an H200 is in
docs/benchmarks.md): bilinear resizes, and the per-image weighting of a path's map.

Why not aten's: its channels_last bilinear kernels ran at ~10x under the memory bandwidth (a x2 up-sampling
writing 38 MB took 176 us where an add of that size takes 20 us), and its backward zero-fills the input's
gradient and adds into it with atomics; a product of a [B, C, H, W] map and a [B, 1, 1, 1] weight broadcasts
along the batch, so aten runs its non-vectorised kernel (49 us against 20 us for an add, measured there). Here:

- ``bilinear_forward`` / ``bilinear_backward``: ``F.interpolate(mode="bilinear", align_corners=False)`` and its
  gradient for any sizes, in NCHW or channels_last, in float32 arithmetic. The backward gathers: each input pixel
  sums the few output pixels that sampled it (recomputing their weights as the forward does), so it writes every
  element once, needs no zero fill and no atomics, and is deterministic. ``*_nhwc``: the same for channels_last
  maps in tiles of pixels x channels (what the network's bf16 maps are on a GPU).
- ``scaled_sum_forward`` / ``scaled_sum_backward``: ``w1[b] * x1 (+ w2[b] * x2)`` over maps whose images are each
  one dense block (NCHW or channels_last), and its gradients: the maps' (``w * g``) and the weights'
  (per-image sums of ``g * x``, reduced per block here and summed by the caller: deterministic, no atomics).
- ``residual_keep_forward`` / ``residual_keep_backward``: a cell's ReLU(op(x) + x), which all its paths read, and
  its keep path with the pass-through, in one kernel each way (aten: an add, a ReLU, two products and an
  ``addcmul`` forward; their backward five more).

Only ``divdr.fused`` calls these (it checks shapes, layouts and sizes, and allocates the outputs); this module
imports triton, which torch's CUDA builds bring along. With ``TRITON_INTERPRET=1`` set before it is imported, the
kernels run on CPU tensors in triton's interpreter: that is how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _output_coordinates(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, y, x) of the flat offsets ``offs`` into a dense [N, C, H, W] tensor in the given memory format."""
    if CHANNELS_LAST:
        c = offs % C
        rest = offs // C
        x = rest % W
        rest = rest // W
        y = rest % H
        n = rest // H
    else:
        x = offs % W
        rest = offs // W
        y = rest % H
        rest = rest // H
        c = rest % C
        n = rest // C
    return n, c, y, x


@triton.jit
def _source_index(out_index, ratio, in_size):
    """aten's ``area_pixel_compute_source_index`` (align_corners=False): the two source pixels an output pixel
    blends along one axis, and the weight of the second."""
    source = tl.maximum(ratio * (out_index.to(tl.float32) + 0.5) - 0.5, 0.0)
    first = source.to(tl.int32)  # floor: source >= 0
    weight = source - first.to(tl.float32)
    second = first + (first < in_size - 1).to(tl.int32)
    return first, second, weight


@triton.jit
def bilinear_forward(x_ptr, out_ptr, total, C, in_h, in_w, out_h, out_w,
                     stride_n, stride_c, stride_h, stride_w, ratio_h, ratio_w,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    n, c, oy, ox = _output_coordinates(offs, C, out_h, out_w, CHANNELS_LAST)
    y0, y1, wy = _source_index(oy, ratio_h, in_h)
    x0, x1, wx = _source_index(ox, ratio_w, in_w)
    base = x_ptr + n * stride_n + c * stride_c
    v00 = tl.load(base + y0 * stride_h + x0 * stride_w, mask=inside, other=0.0).to(tl.float32)
    v01 = tl.load(base + y0 * stride_h + x1 * stride_w, mask=inside, other=0.0).to(tl.float32)
    v10 = tl.load(base + y1 * stride_h + x0 * stride_w, mask=inside, other=0.0).to(tl.float32)
    v11 = tl.load(base + y1 * stride_h + x1 * stride_w, mask=inside, other=0.0).to(tl.float32)
    # aten's order of the blend (its CUDA kernels), so float32 outputs match it to rounding
    value = (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _tap_weight(in_index, out_index, out_size, ratio, in_size):
    """The weight with which output pixel ``out_index`` sampled input pixel ``in_index`` along one axis (0 if it
    did not, or if ``out_index`` is outside the output)."""
    first, second, weight = _source_index(out_index, ratio, in_size)
    tap = tl.where(first == in_index, 1.0 - weight, 0.0) + tl.where(second == in_index, weight, 0.0)
    return tl.where((out_index >= 0) & (out_index < out_size), tap, 0.0)


START_SLACK = tl.constexpr(1e-3)  # an annotated global is refused when compiling (the interpreter takes it)


@triton.jit
def bilinear_backward(grad_ptr, grad_in_ptr, total, C, in_h, in_w, out_h, out_w,
                      stride_n, stride_c, stride_h, stride_w, ratio_h, ratio_w, inverse_h, inverse_w,
                      CHANNELS_LAST: tl.constexpr, TAPS_H: tl.constexpr, TAPS_W: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``grad_in`` (dense, in the given memory format) from ``grad`` (any strides). The output pixels that sample
    input pixel i along an axis are the integers of [(i - 0.5) / ratio - 0.5, (i + 1.5) / ratio - 0.5): TAPS of
    them from the first (``divdr.fused.gather_taps``). The start is rounded up from a hair below it, so that a
    start the float arithmetic puts just above a whole number still includes that output; a tap outside the
    interval has weight 0."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    n, c, iy, ix = _output_coordinates(offs, C, in_h, in_w, CHANNELS_LAST)
    first_y = tl.ceil((iy.to(tl.float32) - 0.5) * inverse_h - 0.5 - START_SLACK).to(tl.int32)
    first_x = tl.ceil((ix.to(tl.float32) - 0.5) * inverse_w - 0.5 - START_SLACK).to(tl.int32)
    base = grad_ptr + n * stride_n + c * stride_c
    total_grad = tl.zeros([BLOCK], dtype=tl.float32)
    for ty in tl.static_range(TAPS_H):
        oy = first_y + ty
        wy = _tap_weight(iy, oy, out_h, ratio_h, in_h)
        for tx in tl.static_range(TAPS_W):
            ox = first_x + tx
            weight = wy * _tap_weight(ix, ox, out_w, ratio_w, in_w)
            used = inside & (weight != 0.0)
            value = tl.load(base + oy * stride_h + ox * stride_w, mask=used, other=0.0).to(tl.float32)
            total_grad += weight * value
    tl.store(grad_in_ptr + offs, total_grad.to(grad_in_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _pixel_coordinates(pixels, H, W):
    """(n, y, x) of flat pixel indices over [N, H, W]."""
    x = pixels % W
    rest = pixels // W
    return rest // H, rest % H, x


@triton.jit
def bilinear_forward_nhwc(x_ptr, out_ptr, pixels, C, in_h, in_w, out_h, out_w, stride_n, stride_h, stride_w,
                          ratio_h, ratio_w, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``bilinear_forward`` for a channels_last input whose channels are adjacent (stride 1), in tiles of BLOCK_P
    output pixels x BLOCK_C channels: a pixel's taps and weights are computed once for all its channels, and a
    row of channels is one contiguous (vectorised) load per tap."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (p < pixels)[:, None] & (c < C)[None, :]
    n, oy, ox = _pixel_coordinates(p, out_h, out_w)
    y0, y1, wy = _source_index(oy, ratio_h, in_h)
    x0, x1, wx = _source_index(ox, ratio_w, in_w)
    base = x_ptr + n * stride_n
    channels = c[None, :]
    v00 = tl.load((base + y0 * stride_h + x0 * stride_w)[:, None] + channels, mask=inside, other=0.0).to(tl.float32)
    v01 = tl.load((base + y0 * stride_h + x1 * stride_w)[:, None] + channels, mask=inside, other=0.0).to(tl.float32)
    v10 = tl.load((base + y1 * stride_h + x0 * stride_w)[:, None] + channels, mask=inside, other=0.0).to(tl.float32)
    v11 = tl.load((base + y1 * stride_h + x1 * stride_w)[:, None] + channels, mask=inside, other=0.0).to(tl.float32)
    wy, wx = wy[:, None], wx[:, None]
    value = (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
    tl.store(out_ptr + p[:, None] * C + channels, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def bilinear_backward_nhwc(grad_ptr, grad_in_ptr, pixels, C, in_h, in_w, out_h, out_w, stride_n, stride_h,
                           stride_w, ratio_h, ratio_w, inverse_h, inverse_w, TAPS_H: tl.constexpr,
                           TAPS_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``bilinear_backward`` for a gradient whose channels are adjacent (stride 1), in tiles of BLOCK_P input
    pixels x BLOCK_C channels: each tap's weight once per pixel, its row of channels one contiguous load."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_inside = p < pixels
    channel_inside = (c < C)[None, :]
    n, iy, ix = _pixel_coordinates(p, in_h, in_w)
    first_y = tl.ceil((iy.to(tl.float32) - 0.5) * inverse_h - 0.5 - START_SLACK).to(tl.int32)
    first_x = tl.ceil((ix.to(tl.float32) - 0.5) * inverse_w - 0.5 - START_SLACK).to(tl.int32)
    base = grad_ptr + n * stride_n
    channels = c[None, :]
    total_grad = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for ty in tl.static_range(TAPS_H):
        oy = first_y + ty
        wy = _tap_weight(iy, oy, out_h, ratio_h, in_h)
        for tx in tl.static_range(TAPS_W):
            ox = first_x + tx
            weight = wy * _tap_weight(ix, ox, out_w, ratio_w, in_w)
            used = (pixel_inside & (weight != 0.0))[:, None] & channel_inside
            value = tl.load((base + oy * stride_h + ox * stride_w)[:, None] + channels, mask=used, other=0.0)
            total_grad += weight[:, None] * value.to(tl.float32)
    inside = pixel_inside[:, None] & channel_inside
    tl.store(grad_in_ptr + p[:, None] * C + channels, total_grad.to(grad_in_ptr.dtype.element_ty), mask=inside)


@triton.jit
def scaled_sum_forward(x1_ptr, w1_ptr, x2_ptr, w2_ptr, out_ptr, per_image, w1_stride, w2_stride,
                       TWO: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = w1[b] * x1[b] (+ w2[b] * x2[b]); grid (blocks of an image, images)."""
    image = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < per_image
    at = image * per_image + offs
    value = tl.load(w1_ptr + image * w1_stride).to(tl.float32) * tl.load(x1_ptr + at, mask=inside).to(tl.float32)
    if TWO:
        w2 = tl.load(w2_ptr + image * w2_stride).to(tl.float32)
        value += w2 * tl.load(x2_ptr + at, mask=inside).to(tl.float32)
    tl.store(out_ptr + at, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _term_backward(grad, image, block, at, inside, x_ptr, w_ptr, grad_x_ptr, partial_ptr, w_stride, blocks,
                   MAP_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    if MAP_GRAD:
        w = tl.load(w_ptr + image * w_stride).to(tl.float32)
        tl.store(grad_x_ptr + at, (w * grad).to(grad_x_ptr.dtype.element_ty), mask=inside)
    if WEIGHT_GRAD:
        x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
        tl.store(partial_ptr + image * blocks + block, tl.sum(grad * x, axis=0))


@triton.jit
def scaled_sum_backward(grad_ptr, x1_ptr, w1_ptr, grad_x1_ptr, partial1_ptr, x2_ptr, w2_ptr, grad_x2_ptr,
                        partial2_ptr, per_image, w1_stride, w2_stride, blocks,
                        MAP_GRAD1: tl.constexpr, WEIGHT_GRAD1: tl.constexpr, MAP_GRAD2: tl.constexpr,
                        WEIGHT_GRAD2: tl.constexpr, BLOCK: tl.constexpr):
    """The gradients of ``scaled_sum_forward``, the incoming gradient read once for both terms: per term
    grad_x[b] = w[b] * grad[b] (MAP_GRAD) and, per block, the partial sum of grad[b] * x[b] into
    partial[b, block] (WEIGHT_GRAD); grid (blocks of an image, images)."""
    image = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < per_image
    at = image * per_image + offs
    grad = tl.load(grad_ptr + at, mask=inside, other=0.0).to(tl.float32)
    _term_backward(grad, image, block, at, inside, x1_ptr, w1_ptr, grad_x1_ptr, partial1_ptr, w1_stride, blocks,
                   MAP_GRAD1, WEIGHT_GRAD1)
    _term_backward(grad, image, block, at, inside, x2_ptr, w2_ptr, grad_x2_ptr, partial2_ptr, w2_stride, blocks,
                   MAP_GRAD2, WEIGHT_GRAD2)


@triton.jit
def residual_keep_forward(h_ptr, x_ptr, w_ptr, p_ptr, activated_ptr, keep_ptr, per_image, w_stride, p_stride,
                          BLOCK: tl.constexpr):
    """activated = ReLU(h + x) and keep = w[b] * activated + p[b] * x (a cell's shared ReLU and its keep path with
    the pass-through); keep from the rounded ``activated`` that the other paths read. Grid (blocks, images)."""
    image = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < per_image
    at = image * per_image + offs
    x = tl.load(x_ptr + at, mask=inside).to(tl.float32)
    summed = tl.load(h_ptr + at, mask=inside).to(tl.float32) + x
    # aten rounds h + x to the maps' dtype before its ReLU: the same rounding here
    activated = tl.maximum(summed.to(activated_ptr.dtype.element_ty), 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(activated_ptr + at, activated, mask=inside)
    w = tl.load(w_ptr + image * w_stride).to(tl.float32)
    passthrough = tl.load(p_ptr + image * p_stride).to(tl.float32)
    keep = w * activated.to(tl.float32) + passthrough * x
    tl.store(keep_ptr + at, keep.to(keep_ptr.dtype.element_ty), mask=inside)


@triton.jit
def residual_keep_backward(grad_activated_ptr, grad_keep_ptr, activated_ptr, x_ptr, w_ptr, p_ptr, grad_h_ptr,
                           grad_x_ptr, partial_w_ptr, partial_p_ptr, per_image, w_stride, p_stride, blocks,
                           ACTIVATED_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, PASSTHROUGH_GRAD: tl.constexpr,
                           BLOCK: tl.constexpr):
    """The gradients of ``residual_keep_forward``: with g = grad_activated + w[b] * grad_keep where activated > 0
    (else 0), grad_h = g and grad_x = g + p[b] * grad_keep; per block the partial sums of grad_keep * activated (w's
    gradient) and grad_keep * x (p's). ACTIVATED_GRAD: the other paths used ``activated`` (else its gradient is 0)."""
    image = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < per_image
    at = image * per_image + offs
    grad_keep = tl.load(grad_keep_ptr + at, mask=inside, other=0.0).to(tl.float32)
    activated = tl.load(activated_ptr + at, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + image * w_stride).to(tl.float32)
    total = w * grad_keep
    if ACTIVATED_GRAD:
        total += tl.load(grad_activated_ptr + at, mask=inside, other=0.0).to(tl.float32)
    grad_h = tl.where(activated <= 0.0, 0.0, total)  # aten's threshold_backward (a NaN passes its gradient)
    tl.store(grad_h_ptr + at, grad_h.to(grad_h_ptr.dtype.element_ty), mask=inside)
    passthrough = tl.load(p_ptr + image * p_stride).to(tl.float32)
    tl.store(grad_x_ptr + at, (grad_h + passthrough * grad_keep).to(grad_x_ptr.dtype.element_ty), mask=inside)
    if WEIGHT_GRAD:
        tl.store(partial_w_ptr + image * blocks + block, tl.sum(grad_keep * activated, axis=0))
    if PASSTHROUGH_GRAD:
        x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
        tl.store(partial_p_ptr + image * blocks + block, tl.sum(grad_keep * x, axis=0))
