"""FLOP counting primitives (the official ``cal_op_flops.py`` convention): one multiply-add = 1 FLOP.

Shared by the network's cost table (``divdr.flops``) and every gate family's own cost (``divdr.gates``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Convention:
    """Ops counted per output element for the layers that are not multiply-adds.

    ``OFFICIAL`` is cal_op_flops.py (affine BN = 2, ReLU = 1, pooling = 1 per element);
    ``CONVS_ONLY`` counts multiply-adds alone, the quantity torch's FlopCounterMode measures
    (it reports 2 FLOPs per multiply-add and ignores BN, ReLU, pooling and interpolation).
    """

    bn: int = 2
    relu: int = 1
    pool: int = 1


OFFICIAL = Convention()
CONVS_ONLY = Convention(bn=0, relu=0, pool=0)


def strided(n: int, stride: int) -> int:
    """Output side of a padded convolution: ceil(n / stride). The official code floors, which is
    the same on the padded sizes of a four-scale space; Layer17's 1/64 maps can be odd-sized."""
    return -(-n // stride)


def conv(h: int, w: int, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> int:
    """Multiply-adds of a bias-free convolution."""
    return k * k * (c_in // groups) * c_out * strided(h, stride) * strided(w, stride)


def conv_bn_relu(h: int, w: int, c_in: int, c_out: int, k: int, cv: Convention, stride: int = 1) -> int:
    out_elements = strided(h, stride) * strided(w, stride) * c_out
    return conv(h, w, c_in, c_out, k, stride) + (cv.bn + cv.relu) * out_elements
