"""Argument and state checks: one clear error naming the argument, what was expected and what was passed.

Shape and dtype comparisons only, one min/max for class labels, one row sum for probability targets.
"""
import torch

CURVATURES = ("hessian", "ggn", "pch-abs", "pch-clip")


def check_curvature(curvature):
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


KRONECKER_KINDS = ("kfac", "kflr", "kfra")


def check_kronecker_kind(kind):
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"kind must be one of {KRONECKER_KINDS}, got {kind!r}")


def describe(value):
    """What was passed, for error messages: a tensor's shape, dtype and device, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"a {type(value).__name__}"


def check_tensor(name, value, like=None):
    """value is a tensor with like's dtype and device (no silent casts or transfers); returns value."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    if like is not None and value.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} (the parameters' dtype), got {describe(value)}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} must be on {like.device} (the parameters' device), got {describe(value)}")
    return value


def check_vector(name, v, param_shape, like):
    """v shaped like θ or (V, *θ), of like's dtype and device; True for a single vector (no leading V)."""
    check_tensor(name, v, like)
    shape = tuple(v.shape)
    if shape == param_shape:
        return True
    if len(shape) == len(param_shape) + 1 and shape[1:] == param_shape:
        return False
    batched = "(V, " + ", ".join(map(str, param_shape)) + ")"
    raise ValueError(f"{name} must have shape {param_shape} (like the parameter) or {batched}, got {describe(v)}; "
                     "flattened or transposed vectors are not reshaped silently")


def check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module of the compiled architecture, got {describe(model)}")
    return model


def bind(model, architecture, buffers):
    """The model's current parameters and buffers by name, checked against the compiled architecture.

    Called at every forward_backward, so a Parameter or buffer replaced on the model is used, not the old one.
    """
    params = dict(model.named_parameters())
    found = {name: tuple(p.shape) for name, p in params.items()}
    if found != architecture:
        missing = sorted(set(architecture) - set(found))
        extra = sorted(set(found) - set(architecture))
        wrong = sorted(n for n in set(found) & set(architecture) if found[n] != architecture[n])
        raise ValueError(
            f"model does not match the compiled architecture: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(n, found[n], architecture[n]) for n in wrong]}; recompile with hbpc"
        )
    kinds = {(p.dtype, p.device) for p in params.values()}
    if len(kinds) > 1:
        mixed = {name: f"{p.dtype} on {p.device}" for name, p in params.items()}
        raise TypeError(f"model parameters must share one dtype and device, got {mixed}")
    named_buffers = dict(model.named_buffers())
    missing_buffers = sorted(set(buffers) - set(named_buffers))
    if missing_buffers:
        raise ValueError(f"model lacks the buffers {missing_buffers}; recompile with hbpc")
    return params, named_buffers


def check_eval_mode(model, paths):
    """Refuse training mode for the modules compiled as their eval-mode map (Dropout, BatchNorm) at ``paths``;
    ``'*'`` (functional dropout, whose training flag the trace read as a constant) stands for every module."""
    if not paths:
        return
    training = [name or "model" for name, module in model.named_modules()
                if module.training and ("*" in paths or name in paths)]
    if training:
        raise RuntimeError(
            f"model is in training mode ({', '.join(training[:4])}{', ...' if len(training) > 4 else ''} have "
            "training=True), but its Dropout/BatchNorm were compiled as their eval-mode maps (hbpc has no curvature "
            "for random dropout or batch statistics); call model.eval() before forward_backward"
        )


def check_input(x, input_shape, like, ids=None):
    """x: (N, *input_shape), N >= 1, the parameters' dtype and device (like: a parameter, or None), finite; or, for
    a model that starts with an embedding (ids = its num_embeddings), integer ids in [0, ids) on like's device."""
    check_tensor("x", x)
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, *{input_shape}) with N >= 1 (x has per-sample shape "
                         f"{tuple(x.shape[1:])}, expected {input_shape}), got {describe(x)}")
    if ids is not None:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x must hold token ids of an integer dtype (the model starts with an embedding), "
                            f"got {describe(x)}")
        if like is not None and x.device != like.device:
            raise ValueError(f"x must be on {like.device} (the parameters' device), got {describe(x)}")
        low, high = torch.aminmax(x)
        if low < 0 or high >= ids:
            raise ValueError(f"x must hold token ids in [0, {ids - 1}] (num_embeddings = {ids}), got ids from "
                             f"{int(low)} to {int(high)}")
        return
    check_tensor("x", x, like)
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # a finite sum has finite terms
        raise ValueError("x contains NaN or Inf")


def check_class_target(target, N, classes, probabilities, device):
    """Class labels (N,) of an integer dtype in [0, C), or (probabilities=True) rows of p (N, C) summing to 1.

    Returns the one-hot or probability targets t (N, C) in float64 (cast to the logits' dtype by the caller).
    """
    check_tensor("target", target)
    if target.device != device:
        raise ValueError(f"target must be on {device} (the parameters' device), got {describe(target)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        if probabilities and target.is_floating_point() and tuple(target.shape) == (N, classes):
            error = (target.sum(-1) - 1).abs().max()
            tolerance = torch.finfo(target.dtype).eps ** 0.5
            if not error <= tolerance:
                raise ValueError(f"target holds class probabilities of shape (N, C) = ({N}, {classes}) whose rows "
                                 f"must sum to 1, but a row is off by {float(error):.3g}")
            return target
        expected = (f"or class probabilities of shape (N, C) = ({N}, {classes}) with rows summing to 1"
                    if probabilities else "(this loss takes no probability targets)")
        raise TypeError(f"target must hold class labels of an integer dtype, shape (N,) = ({N},), {expected}; "
                        f"got {describe(target)}")
    if tuple(target.shape) != (N,):
        raise ValueError(f"target must have shape (N,) = ({N},) with N = x.shape[0] (one class label per sample), "
                         f"got {describe(target)}")
    low, high = torch.aminmax(target)
    if low < 0 or high >= classes:
        raise ValueError(f"target must hold class labels in [0, {classes - 1}] (C = {classes} classes), got labels "
                         f"from {int(low)} to {int(high)}")
    return torch.nn.functional.one_hot(target.long(), classes)


def check_token_target(target, N, y_shape, tokens, device):
    """Labels (N, *S) of an integer dtype in [0, C) or equal to ignore_index, for logits (N, C, *S) (class_axis 1) or
    (N, *S, C) (class_axis -1). Returns their one-hot (N, T, C), T = numel(S), with zero rows at ignored labels."""
    check_tensor("target", target)
    if target.device != device:
        raise ValueError(f"target must be on {device} (the parameters' device), got {describe(target)}")
    axis, ignore = tokens["class_axis"], tokens["ignore_index"]
    classes, positions = (y_shape[0], tuple(y_shape[1:])) if axis == 1 else (y_shape[-1], tuple(y_shape[:-1]))
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class labels of an integer dtype, shape (N, *S) = {(N, *positions)}; "
                        f"got {describe(target)}")
    if tuple(target.shape) != (N, *positions):
        raise ValueError(f"target must have shape (N, *S) = {(N, *positions)} (one class label per position), "
                         f"got {describe(target)}")
    kept = target != ignore
    labels = torch.where(kept, target, 0)
    low, high = torch.aminmax(labels)
    if low < 0 or high >= classes:
        raise ValueError(f"target must hold class labels in [0, {classes - 1}] (C = {classes} classes) or "
                         f"{ignore} (ignore_index), got labels from {int(low)} to {int(high)}")
    return torch.nn.functional.one_hot(labels.reshape(N, -1).long(), classes) * kept.reshape(N, -1, 1)


def check_dense_target(target, N, y_shape, device):
    """Targets of the model output's shape (N, *y): no broadcasting, as torch's losses would silently do."""
    check_tensor("target", target)
    if target.device != device:
        raise ValueError(f"target must be on {device} (the parameters' device), got {describe(target)}")
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be a real tensor, got {describe(target)}")
    if tuple(target.shape) != (N, *y_shape):
        raise ValueError(f"target must have the output's shape (N, *{y_shape}) = {(N, *y_shape)} with N = x.shape[0]"
                         f" (no broadcasting), got {describe(target)}")
    return target


def tensor_state(model, inputs):
    """What forward_backward's cache depends on: the module tree, every parameter's and buffer's identity and
    version counter, and the inputs' version counters (in-place changes through ``.data`` bypass the counters).

    Recorded as direct references to the modules' own dicts, so ``check_state`` costs a few dict lookups.
    """
    modules = list(model.named_modules())
    children = [(f"{prefix}.{key}" if prefix else key, parent._modules, key, child)
                for prefix, parent in modules for key, child in parent._modules.items()]
    tensors = [(f"{prefix}.{key}" if prefix else key, slots, key, t, t._version) for prefix, module in modules
               for slots in (module._parameters, module._buffers) for key, t in slots.items() if t is not None]
    return children, tensors, [(name, t, t._version) for name, t in inputs]


def check_state(state):
    """Refuse when the model or the inputs changed since forward_backward (its cache would mix two points)."""
    children, tensors, inputs = state
    again = "; call forward_backward(x, target) again before asking for curvature"
    for name, slots, key, child in children:
        if slots.get(key) is not child:
            raise RuntimeError(f"submodule {name} was replaced on the model since forward_backward{again}")
    for name, slots, key, tensor, version in tensors:
        if slots.get(key) is not tensor:
            raise RuntimeError(f"{name} was replaced on the model since forward_backward{again}")
        if tensor._version != version:
            raise RuntimeError(f"{name} was changed in place since forward_backward (e.g. by optimizer.step()){again}")
    for name, tensor, version in inputs:
        if tensor._version != version:
            raise RuntimeError(f"{name} was changed in place since forward_backward{again}")


def check_flag(name, value):
    """A bool option (a positional int here is usually a misplaced ``split``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}; pass split and the others by keyword")


def check_samples(samples):
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int (sampled labels per input), got {samples!r}")


def check_damping(damping):
    """damping: a finite real number >= 0."""
    if isinstance(damping, torch.Tensor) and damping.numel() == 1:
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def check_split(split):
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int (sub-blocks per parameter), got {split!r}")
