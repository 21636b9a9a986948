"""Maps linear in their input, in index notation, and structural selections.

``X`` is the input seen through ``input_view``: ``"reshape"`` (the input itself),
``"patches"`` (``unfold``: ``X[n, g, c, k, l]`` is input channel ``c`` of group
``g`` at kernel offset ``k`` of output location ``l``), ``"transposed_patches"`` (the same for a
transposed convolution: the patches of the zero-inserted, padded input, kernel offsets reversed) or ``"standardize"``
(eval-mode normalisation with the running statistics: ``X = (x − μ_c) / sqrt(σ²_c + ε)``) or ``"one_hot"`` (integer ids
as one-hot rows: an embedding's input, which has no curvature).

``SHAPE_OPS`` are parameter-free linear maps (and GroupNorm's per-channel affine map) that hbpc/export/chains.py
lowers shape ops, uneven pooling and GroupNorm onto; ``crop`` is ``pad`` with negative padding.
"""
from math import prod

from .spec import Selection, Structured, K, P, W, X, b, c, g, i, k, l, n, o, Σ


def _linear_views(h, x_shape, y_shape):
    return {"X": x_shape, "Y": y_shape, "W": (y_shape[0], x_shape[0]), "b": (y_shape[0],)}


def _shared_linear_views(h, x_shape, y_shape):
    """X (L, D) -> Y (L, O): the positions ``l`` of an (N, *S, D) input flattened, W (O, D) shared by all of them."""
    positions = prod(x_shape[:-1])
    return {"X": (positions, x_shape[-1]), "Y": (positions, y_shape[-1]), "W": (y_shape[-1], x_shape[-1]),
            "b": (y_shape[-1],)}


def _embedding_views(h, x_shape, y_shape):
    """X (L, V): the one-hot rows of the L = numel(x) token ids, V = num_embeddings; W (V, D); Y (L, D)."""
    positions, vocabulary = prod(x_shape), h["num_embeddings"]
    return {"X": (positions, vocabulary), "Y": (positions, y_shape[-1]), "W": (vocabulary, y_shape[-1])}


def _conv_views(h, x_shape, y_shape):
    groups, kernel = h["groups"], prod(h["kernel_size"])
    locations = prod(y_shape[1:])
    c_in, c_out = x_shape[0] // groups, y_shape[0] // groups
    return {
        "X": (groups, c_in, kernel, locations),
        "Y": (groups, c_out, locations),
        "W": (groups, c_out, c_in, kernel),
        "b": (groups, c_out),
    }


def _conv_transpose_views(h, x_shape, y_shape):
    groups, kernel, locations = h["groups"], prod(h["kernel_size"]), prod(y_shape[1:])
    c_in, c_out = x_shape[0] // groups, y_shape[0] // groups
    return {
        "X": (groups, c_in, kernel, locations),
        "Y": (groups, c_out, locations),
        "W": (groups, c_in, c_out, kernel),
        "b": (groups, c_out),
    }


def _pool_views(h, x_shape, y_shape):
    kernel, locations = prod(h["kernel_size"]), prod(y_shape[1:])
    return {"X": (x_shape[0], kernel, locations), "Y": (y_shape[0], locations)}


def _axis_split(shape, axes):
    """Sizes of ``shape`` grouped around ``axes`` (increasing): (before, axes[0], between, axes[1], ..., after)."""
    sizes, start = [], 0
    for axis in axes:
        sizes += [prod(shape[start:axis]), shape[axis]]
        start = axis + 1
    return (*sizes, prod(shape[start:]))


def _transpose_views(h, x_shape, y_shape):
    """X (A, I, B, J, C) -> Y (A, J, B, I, C): per-sample axes ``h["dims"]`` (counted with the batch) swapped."""
    a, i, b, j, c = _axis_split(x_shape, sorted(d - 1 for d in h["dims"]))
    return {"X": (a, i, b, j, c), "Y": (a, j, b, i, c)}


def _reduce_views(h, x_shape, y_shape):
    """X (A, K, B) -> Y (A, B): the per-sample axis ``h["dim"]`` (counted with the batch) summed."""
    a, k, b = _axis_split(x_shape, (h["dim"] - 1,))
    return {"X": (a, k, b), "Y": (a, b)}


def _norm_views(h, x_shape, y_shape):
    channels, locations = x_shape[0], 1
    for size in x_shape[1:]:
        locations *= size
    return {"X": (channels, locations), "Y": (channels, locations), "W": (channels,), "b": (channels,)}


STRUCTURED = [
    Structured(
        "linear", out=(n, o), expr=Σ(W[o, i] * X[n, i], i) + b[o],
        params={"weight": W, "bias": b}, views=_linear_views,
        forward="torch.nn.functional.linear({x}, {weight}, {bias})",
    ),
    Structured(
        # nn.Linear on (N, *S, D): one weight shared by every position l (not a tied weight: one node uses it)
        "shared_linear", out=(n, l, o), expr=Σ(W[o, i] * X[n, l, i], i) + b[o],
        params={"weight": W, "bias": b}, views=_shared_linear_views,
        forward="torch.nn.functional.linear({x}, {weight}, {bias})",
    ),
    Structured(
        # nn.Embedding: a gather by integer ids, linear in its weight; X is the one-hot of the ids (no input curvature)
        "embedding", out=(n, l, o), expr=Σ(X[n, l, i] * W[i, o], i), params={"weight": W}, views=_embedding_views,
        input_view="one_hot", forward="torch.nn.functional.embedding({x}, {weight})",
    ),
    Structured(
        "conv2d", out=(n, g, o, l), expr=Σ(W[g, o, c, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_views, input_view="patches",
        forward="torch.nn.functional.conv2d({x}, {weight}, {bias}, {stride}, {padding}, {dilation}, {groups})",
    ),
    Structured(
        "conv1d", out=(n, g, o, l), expr=Σ(W[g, o, c, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_views, input_view="patches",
        forward="torch.nn.functional.conv1d({x}, {weight}, {bias}, {stride}, {padding}, {dilation}, {groups})",
    ),
    Structured(
        "conv3d", out=(n, g, o, l), expr=Σ(W[g, o, c, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_views, input_view="patches",
        forward="torch.nn.functional.conv3d({x}, {weight}, {bias}, {stride}, {padding}, {dilation}, {groups})",
    ),
    Structured(
        # X: the input with stride − 1 zeros between entries, padded, as patches with the kernel offsets reversed
        "conv_transpose2d", out=(n, g, o, l), expr=Σ(W[g, c, o, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_transpose_views, input_view="transposed_patches",
        forward="torch.nn.functional.conv_transpose2d({x}, {weight}, {bias}, {stride}, {padding}, {output_padding}, "
                "{groups}, {dilation})",
        aliases=("convtranspose2d",),
    ),
    Structured(
        "conv_transpose1d", out=(n, g, o, l), expr=Σ(W[g, c, o, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_transpose_views, input_view="transposed_patches",
        forward="torch.nn.functional.conv_transpose1d({x}, {weight}, {bias}, {stride}, {padding}, {output_padding}, "
                "{groups}, {dilation})",
        aliases=("convtranspose1d",),
    ),
    Structured(
        "conv_transpose3d", out=(n, g, o, l), expr=Σ(W[g, c, o, k] * X[n, g, c, k, l], c, k) + b[g, o],
        params={"weight": W, "bias": b}, views=_conv_transpose_views, input_view="transposed_patches",
        forward="torch.nn.functional.conv_transpose3d({x}, {weight}, {bias}, {stride}, {padding}, {output_padding}, "
                "{groups}, {dilation})",
        aliases=("convtranspose3d",),
    ),
    Structured(
        "batch_norm", out=(n, c, l), expr=W[c] * X[n, c, l] + b[c],
        params={"weight": W, "bias": b}, views=_norm_views, input_view="standardize",
        forward="torch.nn.functional.batch_norm({x}, {running_mean}, {running_var}, {weight}, {bias}, False, 0.0, {eps})",
        aliases=("batchnorm1d", "batchnorm2d"),
    ),
    Structured(
        "avg_pool2d", out=(n, c, l), expr=Σ(X[n, c, k, l], k) / K,
        params={}, views=_pool_views, input_view="patches",
        constants=lambda h: {K: h["kernel_size"][0] * h["kernel_size"][1]},
        forward="torch.nn.functional.avg_pool2d({x}, {kernel_size}, {stride}, {padding})", aliases=("avgpool2d",),
    ),
    Structured(
        "avg_pool1d", out=(n, c, l), expr=Σ(X[n, c, k, l], k) / K,
        params={}, views=_pool_views, input_view="patches",
        constants=lambda h: {K: h["kernel_size"][0]},
        forward="torch.nn.functional.avg_pool1d({x}, {kernel_size}, {stride}, {padding})", aliases=("avgpool1d",),
    ),
    Structured(
        "avg_pool3d", out=(n, c, l), expr=Σ(X[n, c, k, l], k) / K,
        params={}, views=_pool_views, input_view="patches",
        constants=lambda h: {K: prod(h["kernel_size"])},
        forward="torch.nn.functional.avg_pool3d({x}, {kernel_size}, {stride}, {padding})", aliases=("avgpool3d",),
    ),
]

SHAPE_OPS = [
    Structured("transpose", out=(n, g, o, c, i, l), expr=X[n, g, i, c, o, l], params={}, views=_transpose_views,
               forward="{x}.transpose{dims}", aliases=("swapaxes",)),
    Structured("sum", out=(n, g, l), expr=Σ(X[n, g, k, l], k), params={}, views=_reduce_views,
               forward="{x}.sum({dim}, keepdim=True)"),
    Structured("mean", out=(n, g, l), expr=Σ(X[n, g, k, l], k) / K, params={}, views=_reduce_views,
               constants=lambda h: {K: h["divisor"]}, forward="{x}.sum({dim}, keepdim=True) / {divisor}"),
    Structured("channel_affine", out=(n, c, l), expr=W[c] * X[n, c, l] + b[c], params={"weight": W, "bias": b},
               views=_norm_views,
               forward="torch.addcmul({bias}.reshape({broadcast}), {x}, {weight}.reshape({broadcast}))"),
]

SELECTIONS = [
    Selection("max_pool2d", "take", "max_pool2d_with_indices({x}, {kernel_size}, {stride}, {padding}, {dilation})",
              aliases=("maxpool2d",)),
    Selection("max_pool1d", "take",
              "torch.nn.functional.max_pool1d({x}, {kernel_size}, {stride}, {padding}, {dilation}, return_indices=True)",
              aliases=("maxpool1d",)),
    Selection("max_pool3d", "take",
              "torch.nn.functional.max_pool3d({x}, {kernel_size}, {stride}, {padding}, {dilation}, return_indices=True)",
              aliases=("maxpool3d",)),
    *(Selection(f"max_pool{d}d_ceil", "take", f"torch.nn.functional.max_pool{d}d({{x}}, {{kernel_size}}, {{stride}}, "
                "{padding}, {dilation}, ceil_mode=True, return_indices=True)") for d in (1, 2, 3)),
    Selection("pad", "pad", "torch.nn.functional.pad({x}, {padding})", aliases=("zeropad2d",)),
    Selection("crop", "crop", "torch.nn.functional.pad({x}, {padding})"),  # negative padding crops
    Selection("reshape", "reshape", "{x}.reshape({x}.shape[0], *{y_shape})",
              aliases=("flatten", "view", "unflatten", "unsqueeze", "squeeze")),
    Selection("identity", "identity", "{x}",
              aliases=("dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous")),
    Selection("add", "add", "{x0} + {x1}"),
    # fixed entries (a causal or padding mask: "causal" or flat indices) set to value; a tangent is 0 there
    Selection("masked_fill", "mask", "{x}.masked_fill(fixed_mask({masked}, {y_shape}, {x}.device), float({value}))"),
    Selection("cat", "cat", "torch.cat([{xs}], {dim})"),
]
