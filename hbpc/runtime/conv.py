"""Convolutions lowered to torch's convolution kernels.

The maps are the ones the rule's einsums over unfolded patches derive, Y[n, g, o, l] = Σ_{c,k} W[g, o, c, k]
X[n, g, c, k, l] (transposed: W[g, c, o, k]); the kernels compute them without materialising the patches.
A leading V on a weight or on a second operand is vectorised with torch.vmap.
"""
import torch

from .helpers import lead_shape


def conv_options(stride, padding, dilation, transposed, output_padding, groups):
    """The hyperparameters of ``torch.ops.aten.convolution``, as a tuple in its argument order."""
    return stride, padding, dilation, transposed, output_padding, groups


def _over_weights(function, W, dims):
    """Apply function(w) to each weight of W (*V, *θ) with torch.vmap: (*V, *result)."""
    lead = W.shape[: W.dim() - dims - 2]
    out = torch.vmap(function)(W.reshape(-1, *W.shape[len(lead):]))
    return out.reshape(*lead, *out.shape[1:])


def conv_apply(x, W, conv):
    """conv(x, W) without bias: (*lead, C, *s) -> (*lead, C', *s'); W (*V, *θ) gives (*V, *lead, C', *s')."""
    dims = len(conv[0])
    if W.dim() > dims + 2:
        return _over_weights(lambda w: conv_apply(x, w, conv), W, dims)
    lead = lead_shape(x, dims + 1)
    y = torch.ops.aten.convolution(x.reshape(-1, *x.shape[len(lead):]), W, None, *conv)
    return y.reshape(*lead, *y.shape[1:])


def conv_input_vjp(u, W, x_shape, conv):
    """Jᵀ u, the input gradient of conv(·, W): (*lead, C', *s') -> (*lead, *x_shape); W (*V, *θ) gives (*V, *lead, *x)."""
    dims = len(conv[0])
    if W.dim() > dims + 2:
        return _over_weights(lambda w: conv_input_vjp(u, w, x_shape, conv), W, dims)
    lead = lead_shape(u, dims + 1)
    flat = u.reshape(-1, *u.shape[len(lead):])
    shape_only = flat.new_empty(1).expand(flat.shape[0], *x_shape)  # convolution_backward reads only its shape
    grad = torch.ops.aten.convolution_backward(flat, shape_only, W, None, *conv, (True, False, False))[0]
    return grad.reshape(*lead, *x_shape)


def conv_weight_vjp(u, X, W_shape, conv):
    """J_θᵀ u summed over samples: u (*V, N, C', *s'), X (*V, N, C, *s), either without V -> (*V, *W_shape)."""
    sample_dims = len(conv[0]) + 2
    u_lead, X_lead = u.dim() > sample_dims, X.dim() > sample_dims
    if u_lead or X_lead:
        function = torch.vmap(lambda u, X: conv_weight_vjp(u, X, W_shape, conv), in_dims=(0 if u_lead else None,
                                                                                         0 if X_lead else None))
        lead = (u if u_lead else X).shape[:-sample_dims]
        out = function(u.reshape(-1, *u.shape[-sample_dims:]) if u_lead else u,
                       X.reshape(-1, *X.shape[-sample_dims:]) if X_lead else X)
        return out.reshape(*lead, *W_shape)
    shape_only = u.new_empty(1).expand(W_shape)  # convolution_backward reads only its shape
    return torch.ops.aten.convolution_backward(u, X, shape_only, None, *conv, (False, True, False))[1]
