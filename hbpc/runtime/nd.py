"""Patches for 3D convolution and pooling and for transposed convolution, and their adjoints."""
import torch

from .helpers import lead_shape, numel, patches, patches_adjoint


def patches_nd(x, kernel_size, stride, padding, dilation):
    """unfold for any number of spatial dims: (*lead, C, *s) -> (*lead, C*K, L), K kernel offsets, L output locations."""
    dims = len(kernel_size)
    x = torch.nn.functional.pad(x, [side for pad in reversed(padding) for side in (pad, pad)])
    for k, s, d in zip(kernel_size, stride, dilation):
        x = x.unfold(-dims, d * (k - 1) + 1, s)  # the next spatial axis is always dims from the end
    x = x[(..., *(slice(None, None, d) for d in dilation))]
    channel = x.dim() - 2 * dims - 1
    locations = numel(x.shape[channel + 1: channel + 1 + dims])
    x = x.movedim(tuple(range(x.dim() - dims, x.dim())), tuple(range(channel + 1, channel + 1 + dims)))
    return x.reshape(*x.shape[:channel], -1, locations)


def patches_nd_adjoint(p, x_shape, kernel_size, stride, padding, dilation):
    """The adjoint of ``patches_nd``: (*lead, C*K, L) -> (*lead, *x_shape), by an index map and index_add."""
    dims, lead = len(kernel_size), lead_shape(p, 2)
    padded = [size + 2 * pad for size, pad in zip(x_shape[1:], padding)]
    positions = torch.arange(numel(padded), device=p.device).reshape(1, *padded)
    index = patches_nd(positions, kernel_size, stride, (0,) * dims, dilation).flatten()  # (K*L,)
    flat = p.reshape(*lead, x_shape[0], -1)
    out = flat.new_zeros(*lead, x_shape[0], numel(padded)).index_add(-1, index, flat).reshape(*lead, x_shape[0], *padded)
    return out[(..., *(slice(pad, pad + size) for pad, size in zip(padding, x_shape[1:])))]


def _transposed_pads(kernel_size, padding, output_padding, dilation):
    """(before, after) zero padding per spatial dim of the zero-inserted input (negative: crop)."""
    return [(d * (k - 1) - p, d * (k - 1) - p + op)
            for k, p, op, d in zip(kernel_size, padding, output_padding, dilation)]


def transposed_patches(x, kernel_size, stride, padding, output_padding, dilation):
    """A transposed convolution's input as an ordinary convolution's patches: (*lead, C, *s) -> (*lead, C*K, L).

    stride - 1 zeros go between neighbouring entries, dilation·(k−1) − padding zeros around them (output_padding
    more after), and the kernel offsets are reversed, so that conv_transpose(x, W) = Σ_{c,k} W[c, o, k] X[c, k, l].
    """
    dims = len(kernel_size)
    lead = lead_shape(x, dims + 1)
    channels, kernel = x.shape[-dims - 1], numel(kernel_size)
    z = x.new_zeros(*lead, channels, *((size - 1) * s + 1 for size, s in zip(x.shape[-dims:], stride)))
    z[(..., *(slice(None, None, s) for s in stride))] = x
    pads = _transposed_pads(kernel_size, padding, output_padding, dilation)
    z = torch.nn.functional.pad(z, [side for pad in reversed(pads) for side in pad])
    unit, zero = (1,) * dims, (0,) * dims
    p = (patches if dims == 2 else patches_nd)(z, kernel_size, unit, zero, dilation)
    return p.reshape(*lead, channels, kernel, -1).flip(-2).reshape(p.shape)


def transposed_patches_adjoint(p, x_shape, kernel_size, stride, padding, output_padding, dilation):
    """The adjoint of ``transposed_patches``: (*lead, C*K, L) -> (*lead, *x_shape)."""
    dims, lead = len(kernel_size), lead_shape(p, 2)
    channels, kernel = x_shape[0], numel(kernel_size)
    p = p.reshape(*lead, channels, kernel, -1).flip(-2).reshape(p.shape)
    pads = _transposed_pads(kernel_size, padding, output_padding, dilation)
    inserted = [(size - 1) * s + 1 for size, s in zip(x_shape[1:], stride)]
    padded = (channels, *(size + before + after for size, (before, after) in zip(inserted, pads)))
    unit, zero = (1,) * dims, (0,) * dims
    z = (patches_adjoint if dims == 2 else patches_nd_adjoint)(p, padded, kernel_size, unit, zero, dilation)
    z = torch.nn.functional.pad(z, [-side for pad in reversed(pads) for side in pad])
    return z[(..., *(slice(None, None, s) for s in stride))]
