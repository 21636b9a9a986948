"""Cross-entropy over tokens: logits ``(N, C, *S)`` (or ``(N, *S, C)``), labels ``(N, *S)`` with ``ignore_index``.

``L = c · Σ_n Σ_s w_{n,s} ℓ(z_{n,s}, t_{n,s})`` with the derived per-token ℓ of cross-entropy, ``w_{n,s} = 0`` where
the label is ``ignore_index`` (else 1) and ``c = 1 / Σ w`` (mean over the counted tokens, torch's semantics) or 1
(sum; with no token counted, the mean loss is NaN and the gradient and curvature 0, as torch's). Every quantity is the derived per-token one on ``z`` viewed as ``(N, T, C)``, ``T = numel(S)``, times
``c · w``; the loss Hessian is block-diagonal over tokens.
"""
from math import prod

from hbpc import ir

from .code import method_lines


def with_classes(lines, classes):
    """``C = classes`` ahead of the lines (the derived per-token expressions read the number of classes C)."""
    return [f"C = {classes}", *lines]


def _layout(tokens, y_shape):
    """(code viewing (*lead, *y) as (*lead, T, C), code viewing (*lead, T, C) back as (*lead, *y)) for a tensor."""
    if tokens["class_axis"] == 1:
        classes, positions = y_shape[0], tuple(y_shape[1:])
        return (lambda a, lead: f"{a}.movedim({-len(y_shape)}, -1).reshape({lead}, {prod(positions)}, {classes})",
                lambda a, lead: f"{a}.reshape({lead}, *{positions!r}, {classes}).movedim(-1, {-len(y_shape)})")
    classes, positions = y_shape[-1], tuple(y_shape[:-1])
    return (lambda a, lead: f"{a}.reshape({lead}, {prod(positions)}, {classes})",
            lambda a, lead: f"{a}.reshape({lead}, *{y_shape!r})")


def token_loss_lines(graph, last, loss_plan):
    """forward_backward's loss lines and the loss methods (Hessian product, sampled gradients) for tokens."""
    tokens, y_shape, derived = graph.graph["tokens"], ir.node(graph, last).y_shape, graph.graph["loss_derived"]
    classes = y_shape[0] if tokens["class_axis"] == 1 else y_shape[-1]
    to_tokens, from_tokens = _layout(tokens, y_shape)
    smoothing = loss_plan.label_smoothing
    target = "t.to(z.dtype)" + (f" * {1 - smoothing!r} + {smoothing / classes!r}" if smoothing else "")
    grad, hvp_value = (f"(scale * w[..., None] * ({code}))" for code in (derived.grad.code, derived.hvp.code))
    mean = graph.graph["reduction"] == "mean"
    total = f"(w[..., None] * ({derived.value.code})).sum()"
    lines = [f"z = {to_tokens(f'a_{last}', 'N')}  # (N, T, C): tokens × classes",
             "w = t.sum(-1).to(z.dtype)  # (N, T): 0 where the label is ignore_index, else 1", f"t = {target}",
             *[f"{name} = {code}" for name, code in derived.intermediates.items()],
             *derived.forward_lines,
             *([f"scale = 1 / w.sum().clamp(min=1)  # the mean over the counted tokens (none: gradient 0, as torch)",
                f"loss = {total} / w.sum()  # NaN when no token counts, as torch"] if mean else
               [f"scale = {derived.scale.code}", f"loss = scale * {total}"]),
             f"g_{last} = {from_tokens(grad, 'N')}",
             "self.loss_scale, self.loss_z, self.loss_t, self.loss_w = scale, z, t, w",
             *[f"self.loss_{name} = {name}" for name in derived.intermediates]]
    lines = [lines[0], *with_classes(lines[1:], classes)]
    restore = [f"{name} = self.loss_{name}" for name in ("scale", "z", "t", "w", *derived.intermediates)]
    hvp = [*restore, f"lead = v.shape[:{-len(y_shape)}]", f"v = {to_tokens('v', '*lead')}", *derived.hvp.lines,
           f"return {from_tokens(hvp_value, '*lead')}"]
    methods = method_lines("_loss_hessian_product(self, v)",
                           "(∇²_z L) v per sample, v (V, N, *y): the derived per-token product, times c · w",
                           with_classes(hvp, classes))
    sampled = [
        f"labels = torch.multinomial(self.loss_softmax.reshape(-1, {classes}), samples, replacement=True, "
        "generator=generator)",
        f"t = torch.nn.functional.one_hot(labels.reshape(self.N, -1, samples).movedim(-1, 1), {classes})"
        ".to(self.loss_z.dtype)  # (N, S, T, C) a label per token",
        *[f"{name} = self.loss_{name}[:, None]" for name in ("z", *derived.intermediates)],
        *derived.grad.lines,
        f"s = ({derived.grad.code}) * self.loss_w[:, None, :, None]  # the derived ∇_z ℓ(z, ŷ_s), 0 at ignored tokens",
        f"return {from_tokens('s', 'self.N, samples')}.reshape(self.N, samples, -1)",
    ]
    methods += method_lines("_loss_sampled_gradients(self, samples, generator)",
                            "s = ∇_z ℓ(z_n, ŷ_s), ŷ_s ~ softmax(z_(n,t)) per token: (N, S, numel(y)) in the logits' order",
                            with_classes(sampled, classes))
    return lines, methods
