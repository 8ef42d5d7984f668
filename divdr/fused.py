"""Fused GPU kernels for the bilinear resizes, the per-image path weighting and each cell's ReLU with its keep path
(``train.fused_kernels``).

Off by default. When on (``set_fused_kernels(True)``), ``divdr.ops.bilinear`` and the cells' weighted paths run
the Triton kernels of ``divdr.triton_kernels`` for CUDA tensors, with autograd functions of their own; everything
else, and every call they do not cover (CPU tensors, sizes past int32 offsets, up-sampling by more than 4, maps
whose images are not dense blocks, mixed dtypes, inside ``torch.compile``, which fuses on its own), runs the aten
operations it always did. The outputs are those of the aten operations up to float32 rounding: the kernels
compute in float32 and round once (a weighted sum of two bf16 maps is rounded once, not after each product;
the weights' gradients are summed in float32). See docs/benchmarks.md for what they measured.

A process-wide switch, like ``torch.backends.cudnn.benchmark``: the kernels change no parameter or buffer, so a
network trained with them is the same network without them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch

_enabled = False

BLOCK = 1024  # elements per program: 4 warps, 8 per thread
MAX_ELEMENTS = 2**31  # the kernels index in int32
MAX_UP_FACTOR = 4  # beyond, the backward's gather window (2 * factor taps per axis and more) grows too large


def set_fused_kernels(enabled: bool = True) -> None:
    """Use the fused kernels from now on in this process (CUDA tensors only); raises if triton is missing."""
    global _enabled
    if enabled:
        problem = unavailable()
        if problem:
            raise RuntimeError(f"fused kernels (train.fused_kernels) need triton: {problem}")
    _enabled = bool(enabled)


def fused_kernels_enabled() -> bool:
    return _enabled


@functools.cache
def unavailable() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    try:
        import divdr.triton_kernels  # noqa: F401
    except ImportError as error:
        return f"{error} (torch's CUDA wheels bring triton along; otherwise pip install triton)"
    return None


def _interpreting() -> bool:
    # triton's interpreter runs the kernels on CPU tensors (the tests); it must be on before triton is imported
    return os.environ.get("TRITON_INTERPRET") == "1"


def _applies(x: torch.Tensor) -> bool:
    return (_enabled and (x.is_cuda or _interpreting()) and not torch.compiler.is_compiling()
            and 0 < x.numel() < MAX_ELEMENTS)


def _kernels():
    import divdr.triton_kernels as kernels

    return kernels


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels write in: channels_last where ``x`` is (strictly), else contiguous, as
    F.interpolate's ``suggest_memory_format``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---- bilinear resize ---------------------------------------------------------------------------------------

def resize(x: torch.Tensor, size: tuple[int, int] | None, scale_factor: float | None) -> torch.Tensor | None:
    """``F.interpolate(x, size, scale_factor, mode="bilinear", align_corners=False)`` with the fused kernels, or
    None where they do not apply (the caller runs F.interpolate)."""
    if not _applies(x) or x.dim() != 4:
        return None
    in_h, in_w = x.shape[-2:]
    if size is not None:
        out_h, out_w = int(size[0]), int(size[1])
        ratio_h, ratio_w = in_h / out_h, in_w / out_w
    elif scale_factor is not None:
        # F.interpolate's output size, and aten's coordinates with the scale passed on: 1 / scale_factor
        out_h, out_w = math.floor(in_h * scale_factor), math.floor(in_w * scale_factor)
        ratio_h = ratio_w = 1.0 / scale_factor
    else:
        return None
    if min(out_h, out_w) < 1 or max(1 / ratio_h, 1 / ratio_w) > MAX_UP_FACTOR:
        return None
    if x.shape[0] * x.shape[1] * out_h * out_w >= MAX_ELEMENTS:
        return None
    return _Bilinear.apply(x, (out_h, out_w), (ratio_h, ratio_w))


class _Bilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_size: tuple[int, int], ratios: tuple[float, float]) -> torch.Tensor:
        fmt = _memory_format(x)
        n, c, in_h, in_w = x.shape
        out = torch.empty((n, c, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
        kernels = _kernels()
        if fmt == torch.channels_last:  # x strictly channels_last: its channels adjacent
            pixels, (block_p, block_c) = n * out_size[0] * out_size[1], _tile(c)
            kernels.bilinear_forward_nhwc[(_blocks(pixels, block_p), _blocks(c, block_c))](
                x, out, pixels, c, in_h, in_w, *out_size, x.stride(0), x.stride(2), x.stride(3), *ratios,
                BLOCK_P=block_p, BLOCK_C=block_c)
        else:
            total = out.numel()
            kernels.bilinear_forward[(_blocks(total),)](
                x, out, total, c, in_h, in_w, *out_size, *x.stride(), *ratios, CHANNELS_LAST=False, BLOCK=BLOCK)
        ctx.in_shape, ctx.fmt, ctx.out_size, ctx.ratios = tuple(x.shape), fmt, out_size, ratios
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        n, c, in_h, in_w = ctx.in_shape
        ratio_h, ratio_w = ctx.ratios
        grad_in = torch.empty(ctx.in_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.fmt)
        windows = {"TAPS_H": gather_taps(ratio_h), "TAPS_W": gather_taps(ratio_w)}
        kernels = _kernels()
        if ctx.fmt == torch.channels_last and grad.stride(1) == 1:
            pixels, (block_p, block_c) = n * in_h * in_w, _tile(c)
            kernels.bilinear_backward_nhwc[(_blocks(pixels, block_p), _blocks(c, block_c))](
                grad, grad_in, pixels, c, in_h, in_w, *ctx.out_size, grad.stride(0), grad.stride(2), grad.stride(3),
                ratio_h, ratio_w, 1.0 / ratio_h, 1.0 / ratio_w, **windows, BLOCK_P=block_p, BLOCK_C=block_c)
        else:  # any layout of the incoming gradient
            total = grad_in.numel()
            kernels.bilinear_backward[(_blocks(total),)](
                grad, grad_in, total, c, in_h, in_w, *ctx.out_size, *grad.stride(), ratio_h, ratio_w,
                1.0 / ratio_h, 1.0 / ratio_w, CHANNELS_LAST=ctx.fmt == torch.channels_last, **windows, BLOCK=BLOCK)
        return grad_in, None, None


def _tile(channels: int) -> tuple[int, int]:
    """(pixels, channels) of a channels_last kernel's tile: up to 128 channels (a power of two), BLOCK elements."""
    from triton import next_power_of_2

    block_c = min(128, next_power_of_2(channels))
    return max(1, BLOCK // block_c), block_c


def gather_taps(ratio: float) -> int:
    """Output pixels the backward visits per input pixel along an axis (ratio = input size / output size): those
    that sampled it are the integers of an interval 2 / ratio long, so at most ceil(2 / ratio) from its first -
    for a power-of-two ratio (x2, x4, /4: the network's), whose interval starts half-way between whole numbers.
    Otherwise the start may be rounded down by one (``bilinear_backward``'s slack): one more. x2 visits 4 x 4
    output pixels per input pixel, /4 one."""
    # a power of two up to 256: the start is at least 1/512 from a whole number, past the slack (1e-3)
    exact = math.log2(ratio).is_integer() and ratio <= 256
    return math.ceil(2.0 / ratio) + (0 if exact else 1)


def _blocks(total: int, block: int = BLOCK) -> int:
    from triton import cdiv  # triton's own; imported here, as this module must import without triton

    return cdiv(total, block)


# ---- per-image weighted sums ---------------------------------------------------------------------------------

def scaled_sum(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor | None = None,
               w2: torch.Tensor | None = None) -> torch.Tensor:
    """``w1 * x1`` (``+ w2 * x2``) for maps [B, ...] and per-image weights [B, 1, 1, 1]: a path's weighting, and the
    cell's keep path with its pass-through. The fused kernel where it applies, else the aten operations (those
    the cells always ran, so CPU results are unchanged)."""
    if _fusable(x1, w1, x2, w2):
        return _ScaledSum.apply(x1, w1, x2, w2)
    if x2 is None:
        return w1 * x1
    return torch.addcmul(w1 * x1, w2, x2)


def _fusable(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor | None, w2: torch.Tensor | None) -> bool:
    if not _applies(x1) or not _dense_images(x1) or not _per_image(w1, x1):
        return False
    return x2 is None or (w2 is not None and _alike(x2, x1) and _per_image(w2, x1))


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape, dtype, device and order in memory: one offset addresses both."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and _order(a) == _order(b)


def _dense_images(x: torch.Tensor) -> bool:
    # every image one dense block of numel / B elements at b * numel / B: contiguous or channels_last
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _order(x: torch.Tensor) -> tuple[int, ...]:
    # the order of the elements in memory: the strides of the dimensions longer than 1
    return tuple(stride for stride, size in zip(x.stride(), x.shape, strict=True) if size != 1)


def _per_image(w: torch.Tensor, x: torch.Tensor) -> bool:
    return (w.dim() >= 1 and w.shape[0] == x.shape[0] and w.numel() == x.shape[0] and w.dtype == x.dtype
            and w.device == x.device)


class _ScaledSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor | None,
                w2: torch.Tensor | None) -> torch.Tensor:
        batch = x1.shape[0]
        per_image = x1.numel() // batch
        out = torch.empty_like(x1)
        two = x2 is not None
        _kernels().scaled_sum_forward[(_blocks(per_image), batch)](
            x1, w1, x2 if two else x1, w2 if two else w1, out, per_image, w1.stride(0),
            (w2 if two else w1).stride(0), TWO=two, BLOCK=BLOCK)
        ctx.two = two
        ctx.save_for_backward(x1, w1, x2, w2)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x1, w1, x2, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if _order(grad) != _order(x1):  # the kernel reads the gradient in the maps' layout
            grad = grad.contiguous(memory_format=_memory_format(x1))
        batch = x1.shape[0]
        per_image = x1.numel() // batch
        blocks = _blocks(per_image)

        grad_x1 = torch.empty_like(x1) if needs[0] else None
        grad_x2 = torch.empty_like(x2) if ctx.two and needs[2] else None
        partial1 = _partials(needs[1], batch, blocks, grad.device)
        partial2 = _partials(ctx.two and needs[3], batch, blocks, grad.device)
        unused = grad  # a pointer for the arguments a flag leaves unread
        _kernels().scaled_sum_backward[(blocks, batch)](
            grad, x1, w1, _or(grad_x1, unused), _or(partial1, unused),
            _or(x2, unused), _or(w2, w1), _or(grad_x2, unused), _or(partial2, unused),
            per_image, w1.stride(0), _or(w2, w1).stride(0), blocks,
            MAP_GRAD1=grad_x1 is not None, WEIGHT_GRAD1=partial1 is not None,
            MAP_GRAD2=grad_x2 is not None, WEIGHT_GRAD2=partial2 is not None, BLOCK=BLOCK)
        return grad_x1, _weight_grad(partial1, w1), grad_x2, _weight_grad(partial2, w2)


# ---- a cell's shared ReLU and its keep path ----------------------------------------------------------------------

def residual_keep(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, passthrough: torch.Tensor,
                  relu: Callable[[torch.Tensor], torch.Tensor] = torch.relu) -> tuple[torch.Tensor, torch.Tensor]:
    """(activated, keep) = (ReLU(h + x), w * activated + passthrough * x) for a cell's operation output ``h``, its
    input ``x`` and per-image weights [B, 1, 1, 1]: one kernel each way where they apply, else ``relu(h + x)`` and
    ``scaled_sum`` (what the cells always ran: CPU results are unchanged)."""
    if (_applies(h) and _dense_images(h) and _alike(x, h) and _per_image(w, h)
            and _per_image(passthrough, h)):
        return _ResidualKeep.apply(h, x, w, passthrough)
    activated = relu(h + x)
    return activated, scaled_sum(activated, w, x, passthrough)


class _ResidualKeep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                passthrough: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = h.shape[0]
        per_image = h.numel() // batch
        activated, keep = torch.empty_like(h), torch.empty_like(h)
        _kernels().residual_keep_forward[(_blocks(per_image), batch)](
            h, x, w, passthrough, activated, keep, per_image, w.stride(0), passthrough.stride(0), BLOCK=BLOCK)
        ctx.set_materialize_grads(False)  # no gradient for ``activated`` where no path read it: no zeros made
        ctx.save_for_backward(activated, x, w, passthrough)
        return activated, keep

    @staticmethod
    def backward(ctx, grad_activated: torch.Tensor | None, grad_keep: torch.Tensor | None):
        activated, x, w, passthrough = ctx.saved_tensors
        if grad_keep is None:  # only ``activated`` was used: the ReLU's own backward
            grad_h = None if grad_activated is None else grad_activated.masked_fill(activated <= 0, 0)
            return grad_h, grad_h, None, None
        needs = ctx.needs_input_grad
        layout = _memory_format(activated)
        if _order(grad_keep) != _order(activated):
            grad_keep = grad_keep.contiguous(memory_format=layout)
        if grad_activated is not None and _order(grad_activated) != _order(activated):
            grad_activated = grad_activated.contiguous(memory_format=layout)
        batch = activated.shape[0]
        per_image = activated.numel() // batch
        blocks = _blocks(per_image)
        grad_h, grad_x = torch.empty_like(activated), torch.empty_like(activated)
        partial_w = _partials(needs[2], batch, blocks, x.device)
        partial_p = _partials(needs[3], batch, blocks, x.device)
        _kernels().residual_keep_backward[(blocks, batch)](
            _or(grad_activated, grad_keep), grad_keep, activated, x, w, passthrough, grad_h, grad_x,
            _or(partial_w, grad_h), _or(partial_p, grad_h), per_image, w.stride(0), passthrough.stride(0), blocks,
            ACTIVATED_GRAD=grad_activated is not None, WEIGHT_GRAD=partial_w is not None,
            PASSTHROUGH_GRAD=partial_p is not None, BLOCK=BLOCK)
        return grad_h, grad_x, _weight_grad(partial_w, w), _weight_grad(partial_p, passthrough)


def _partials(needed: bool, batch: int, blocks: int, device: torch.device) -> torch.Tensor | None:
    """Where a kernel writes a per-image weight's gradient as one float32 partial sum per block (None: not needed)."""
    return torch.empty((batch, blocks), dtype=torch.float32, device=device) if needed else None


def _weight_grad(partial: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's gradient from its partial sums, in its dtype and shape."""
    return None if partial is None else partial.sum(1).to(weight.dtype).reshape(weight.shape)


def _or(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if tensor is None else tensor
