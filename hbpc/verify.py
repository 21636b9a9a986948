"""Compile-time self-check: run the generated module once against autograd, refuse it if they disagree.

On a float64 deep copy of the user's model, with a few samples and a seeded synthetic target,
``verify`` compares the generated module with ``torch.autograd``:

==================  ==================================================================
loss, gradient      ``forward_backward(x, t)`` against ``loss_fn(model(x), t)`` and its gradient
GGN product         ``ggn_vector_product([v])`` against ``Jᵀ (∇²_z L) J v`` (double backward)
Hessian product     ``hessian_vector_product([v])`` against ``∇²L v`` (double backward)
block product       ``block_products("hessian")[θ₀](v)`` against the true diagonal block ``∇²_θ₀ L v``
HBP block           at N = 1: ``blocks("hessian")[θ₀] @ v`` against the same (HBP is exact there)
==================  ==================================================================

θ₀ is the first parameter used by exactly one node (its products run through the most of the graph). A failure
is localized on the model's own ``torch.fx`` intermediates: the first node whose generated forward value differs
names a wrong forward (or φ, when the rule prints φ as its forward), the first node whose output gradient differs
names a rule whose φ′ disagrees with the module, a wrong loss value or loss gradient names the loss rule.
"""
import copy
import re
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from hbpc.errors import HbpcError

SAMPLES = 2  # batch size of the check (N > 1 exercises the reductions); the HBP block uses the first sample
RELATIVE_TOLERANCE = 1e-6  # float64 agreement is ~1e-12; a miscompile is off by far more
ABSOLUTE_TOLERANCE = 1e-10
HBP_BLOCK_BUDGET = 2**26  # bytes: blocks() at N = 1 is checked only when it needs less than this
_NO_VERIFY = "pass --no-verify (compile_model(..., verify=False)) to write it anyway"


def max_error(found, expected) -> float:
    return (found - expected).abs().max().item() if found.numel() else 0.0


def _disagrees(found, expected) -> bool:
    if found.shape != expected.shape:
        return True
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return not max_error(found, expected) <= RELATIVE_TOLERANCE * scale + ABSOLUTE_TOLERANCE


def _reference_loss(graph, loss_fn, loss):
    """The torch loss module the generated loss must equal: ``loss_fn``, or the one ``--loss`` names."""
    if loss is None:
        return copy.deepcopy(loss_fn) if loss_fn is not None else nn.CrossEntropyLoss()
    rule, reduction = graph.graph["loss_rule"], graph.graph["reduction"]
    torch_losses = {cls.__name__.lower(): cls for cls in vars(nn.modules.loss).values()
                    if isinstance(cls, type) and issubclass(cls, nn.Module)}
    for name in (rule.key, *rule.aliases, rule.key.replace("_", "") + "loss"):
        if name in torch_losses:
            return torch_losses[name](reduction=reduction)
    return None


def _synthetic_data(graph, model, example_input, generator):
    """A few input samples (the example's, or seeded normals if the example is constant) and a seeded target."""
    device = example_input.device
    x = example_input[:SAMPLES]
    if x.is_floating_point():
        x = x.double()
        if x.numel() and (x == x.reshape(-1)[0]).all():
            x = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
    with torch.no_grad():
        out = model(x)
    if graph.graph["loss_rule"].target == "class":
        t = torch.randint(out.shape[-1], out.shape[:1], generator=generator).to(device)
    else:
        t = torch.rand(out.shape, generator=generator, dtype=torch.float64).to(device)
    return x, t


def _first_parameter(graph, model):
    """The first parameter (model order) that exactly one node uses, or None."""
    uses = {}
    for name in graph.graph["order"]:
        for param in graph.nodes[name]["params"].values():
            uses[param] = uses.get(param, 0) + 1
    return next((name for name, p in model.named_parameters() if uses.get(name) == 1 and p.requires_grad), None)


class _Reference:
    """Autograd on the float64 model: loss, gradient, GGN and Hessian products, diagonal-block products."""

    def __init__(self, model, loss_fn, x, t):
        self.model, self.loss_fn, self.x, self.t = model, loss_fn, x, t
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _grad(self, outputs, inputs, grad_outputs=None, create_graph=False):
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]

    def loss_and_gradient(self):
        loss = self.loss_fn(self.model(self.x), self.t)
        return loss.detach(), [g.detach() for g in self._grad(loss, self.params)]

    def hessian_product(self, vs):
        gradient = self._grad(self.loss_fn(self.model(self.x), self.t), self.params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(gradient, vs) if g.requires_grad)
        return self._grad(dot, self.params) if torch.is_tensor(dot) else [torch.zeros_like(v) for v in vs]

    def ggn_product(self, vs):
        """Jᵀ (∇²_z L) J v by reverse mode only: J v = ∂(Jᵀ u · v)/∂u."""
        z = self.model(self.x)
        u = torch.zeros_like(z, requires_grad=True)
        jtu = self._grad(z, self.params, u, create_graph=True)
        jv = torch.autograd.grad(sum((a * v).sum() for a, v in zip(jtu, vs)), u, allow_unused=True)[0]
        jv = torch.zeros_like(z) if jv is None else jv
        zd = z.detach().requires_grad_()
        gz = torch.autograd.grad(self.loss_fn(zd, self.t), zd, create_graph=True)[0]
        hjv = torch.autograd.grad(gz, zd, jv, allow_unused=True)[0]
        hjv = torch.zeros_like(z) if hjv is None else hjv
        return [g.detach() for g in self._grad(z, self.params, hjv)]


def _generated_line(error, path):
    """(line number, text, function) of the deepest traceback frame inside the generated file."""
    if isinstance(error, SyntaxError) and error.filename == str(path):
        return error.lineno, (error.text or "").strip(), "<module>"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    if not frames:
        return None, "", ""
    return frames[-1].lineno, (frames[-1].line or "").strip(), frames[-1].name


def _section(text, lineno):
    """The ``# forward`` / ``# loss`` / ``# backward`` section of forward_backward around a line, if any."""
    lines = text.splitlines()
    for line in reversed(lines[: lineno or 0]):
        stripped = line.strip()
        if stripped in ("# forward", "# loss", "# backward"):
            return stripped[2:]
        if stripped.startswith("def "):
            return None
    return None


def _nodes_in_line(graph, line):
    names = []
    for name in graph.graph["order"]:
        if re.search(rf"\b(?:[agtuS]_|self\._?){re.escape(name)}(?:_\w+)?\b|\b_{re.escape(name)}_\w+", line):
            names.append(name)
    return names


def _describe_node(graph, name) -> str:
    node = graph.nodes[name]
    return f"node `{name}` (rule '{node['rule'].key}', {node['source']})"


def _culprit_of_line(graph, text, lineno, line, function) -> str:
    """Which rule a failing generated line belongs to: the loss rule, a node, or nothing known."""
    loss_rule = graph.graph["loss_rule"].key
    if function.startswith("_loss") or (function == "forward_backward" and _section(text, lineno) == "loss"):
        return f"the loss rule '{loss_rule}'"
    assigned = line.split("=", 1)[0] if "=" in line else line
    nodes = _nodes_in_line(graph, assigned) or _nodes_in_line(graph, line)
    return _describe_node(graph, nodes[-1]) if nodes else ""


def _failure(graph, text, path, error, what) -> HbpcError:
    lineno, line, function = _generated_line(error, path)
    culprit = _culprit_of_line(graph, text, lineno, line, function) if lineno else ""
    where = f"generated line {lineno}: {line}" if lineno else ""
    message = f"the generated module {what}: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if culprit:
        message += f"; it comes from {culprit}"
    return HbpcError(message, where, "fix the rule's torch code or sympy expression (hbpc rules NAME shows what it "
                                     f"emits); this is an hbpc bug if no user rule is involved")


def import_checked(graph, text, path, import_module):
    """Import the generated file, turning a failure into an HbpcError naming the generated line and its rule."""
    try:
        return import_module(path)
    except Exception as error:  # a broken rule may produce any error
        raise _failure(graph, text, path, error, "fails to import") from None


def _capture_locals(function, call):
    """Run ``call()`` and return the local variables of ``function`` when it returns."""
    captured = {}

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is function.__code__:
            captured.update(frame.f_locals)

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return captured


def _model_intermediates(graph, model, x, loss_fn, t, rules):
    """Per IR node: the model's own output there (from its fx trace) and ∂L/∂ of it, keyed by IR node name."""
    from hbpc.export.lower import _trace
    from hbpc.rules import extended

    with extended(list(rules)):
        module = _trace(model, x)
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if torch.is_tensor(value) and value.is_floating_point():
                if not value.requires_grad:
                    value = value.detach().requires_grad_()
                values[node.name] = value
            return value

    loss = loss_fn(Recorder(module).run(x), t)
    last = {graph.nodes[name]["fx_name"]: name for name in graph.graph["order"]}  # affine nodes follow their norm
    names = {fx_name: name for fx_name, name in last.items() if fx_name in values}
    grads = torch.autograd.grad(loss, [values[f] for f in names], allow_unused=True)
    return ({name: values[f].detach() for f, name in names.items()},
            {name: torch.zeros_like(values[f]) if g is None else g for (f, name), g in zip(names.items(), grads)})


def _localize(graph, curvature, model, x, loss_fn, t, rules, loss_differs=False) -> str:
    """The rule responsible for a wrong loss or gradient, from per-node forward values and output gradients."""
    found = _capture_locals(type(curvature).forward_backward, lambda: curvature.forward_backward(x, t))
    try:
        values, gradients = _model_intermediates(graph, model, x, loss_fn, t, rules)
    except Exception:  # the check stays usable when the model cannot be re-traced
        return ""
    order = graph.graph["order"]
    for name in order:
        generated = found.get(f"a_{name}")
        if name in values and torch.is_tensor(generated) and _disagrees(generated, values[name]):
            rule = graph.nodes[name]["rule"]
            forward = (f"its φ = {rule.phi}" if getattr(rule, "forward", "") is None
                       else f"its forward `{getattr(rule, 'forward', '?')}`")
            return (f"{_describe_node(graph, name)}: the generated forward value differs from the model's module by "
                    f"{max_error(generated, values[name]):.3g}, so {forward} does not compute what the module does")
    loss_rule = graph.graph["loss_rule"].key
    if loss_differs:
        return (f"the loss rule '{loss_rule}': on the model's own logits its loss differs from the model's loss "
                f"function, so its ℓ(z, t) or its scale for reduction '{graph.graph['reduction']}' is not that loss")
    last = order[-1]
    generated = found.get(f"g_{last}")
    if last in gradients and torch.is_tensor(generated) and _disagrees(generated, gradients[last]):
        return (f"the loss rule '{loss_rule}': its gradient ∂ℓ/∂z differs from the loss module's by "
                f"{max_error(generated, gradients[last]):.3g}, so its ℓ(z, t) is not the model's loss")
    for name in reversed(order[:-1]):
        generated = found.get(f"g_{name}")
        if name in gradients and torch.is_tensor(generated) and _disagrees(generated, gradients[name]):
            consumers = [_describe_node(graph, s) for s in graph.successors(name)]
            phis = [f"φ = {graph.nodes[s]['rule'].phi}" for s in graph.successors(name)
                    if hasattr(graph.nodes[s]["rule"], "phi")]
            because = f" ({', '.join(phis)} disagrees with the module's forward)" if phis else ""
            return (f"{' and '.join(consumers)}: the gradient it passes back differs from autograd by "
                    f"{max_error(generated, gradients[name]):.3g}{because}")
    return ""


def _user_rule_note(rules) -> str:
    return f" (user rules in play: {', '.join(rule.key for rule in rules)})" if rules else ""


def _refuse(quantity, found, expected, culprit, rules):
    error = max_error(found, expected) if found.shape == expected.shape else float("nan")
    shape = "" if found.shape == expected.shape else f" (shape {tuple(found.shape)}, expected {tuple(expected.shape)})"
    what = f"the generated module's {quantity} disagrees with autograd: max error {error:.3g}{shape}"
    return HbpcError(what + (f"; responsible: {culprit}" if culprit else _user_rule_note(rules)),
                     "compile-time verification in float64 against torch.autograd",
                     f"fix the rule named above; {_NO_VERIFY}")


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def verify(graph, module, model, example_input, loss_fn=None, loss=None, rules=()):
    """Check the imported generated ``module`` against autograd on a float64 copy of ``model``; raise HbpcError."""
    reference_loss = _reference_loss(graph, loss_fn, loss)
    if reference_loss is None:
        return  # a --loss rule with no torch module: nothing to compare with
    try:
        model64 = copy.deepcopy(model).double()
        reference_loss = reference_loss.double()
    except Exception as error:
        raise HbpcError(f"cannot verify the generated module: the model cannot be deep-copied "
                        f"({type(error).__name__}: {error})", type(model).__name__, _NO_VERIFY) from None
    for p in model64.parameters():
        p.grad = None
    generator = torch.Generator().manual_seed(0)
    x, t = _synthetic_data(graph, model64, example_input, generator)
    path = Path(module.__file__)
    text = path.read_text() if path.exists() else ""
    try:
        curvature = module.Curvature(model64)
        _compare(graph, curvature, model64, reference_loss, x, t, rules, generator)
    except HbpcError:
        raise
    except Exception as error:  # a broken rule may produce any error
        raise _failure(graph, text, path, error, "fails on its first call") from None


def _compare(graph, curvature, model, loss_fn, x, t, rules, generator):
    reference = _Reference(model, loss_fn, x, t)
    params = dict(model.named_parameters())
    loss = curvature.forward_backward(x, t)
    expected_loss, expected_grad = reference.loss_and_gradient()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in reference.params]
    for quantity, found, expected in (("loss", loss.detach().reshape(1), expected_loss.reshape(1)),
                                      ("gradient", _flat(grads), _flat(expected_grad))):
        if _disagrees(found, expected):
            culprit = _localize(graph, curvature, model, x, loss_fn, t, rules, loss_differs=quantity == "loss")
            raise _refuse(quantity, found, expected, culprit, rules)
    vs = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device) for p in params.values()]
    trainable = [v for v, p in zip(vs, params.values()) if p.requires_grad]
    mask = [p.requires_grad for p in params.values()]
    for quantity, product, expected in (
            ("GGN-vector product", curvature.ggn_vector_product, reference.ggn_product(trainable)),
            ("Hessian-vector product", curvature.hessian_vector_product, reference.hessian_product(trainable))):
        found = [f for f, m in zip(product(vs), mask) if m]
        if _disagrees(_flat(found), _flat(expected)):
            raise _refuse(quantity, _flat(found), _flat(expected), "", rules)
    theta = _first_parameter(graph, model)
    if theta is None:
        return
    index = list(params).index(theta)
    only = [v if name == theta else torch.zeros_like(v) for name, v in zip(params, vs)]
    exact = reference.hessian_product([o for o, m in zip(only, mask) if m])[
        [n for n, p in params.items() if p.requires_grad].index(theta)]
    found = curvature.block_products("hessian")[theta](vs[index])
    if _disagrees(found, exact):
        raise _refuse(f"Hessian block product of {theta}", found, exact, "", rules)
    _compare_hbp_block(curvature, model, loss_fn, x[:1], t[:1], theta, vs, only, mask, rules)


def _compare_hbp_block(curvature, model, loss_fn, x, t, theta, vs, only, mask, rules):
    """At N = 1, the HBP block of θ₀ in the hessian mode is its true diagonal Hessian block."""
    curvature.forward_backward(x, t)
    if curvature.blocks_memory() > HBP_BLOCK_BUDGET:
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    exact = _Reference(model, loss_fn, x, t).hessian_product([o for o, m in zip(only, mask) if m])[names.index(theta)]
    found = curvature.blocks("hessian")[theta] @ vs[list(dict(model.named_parameters())).index(theta)]
    if _disagrees(found, exact):
        raise _refuse(f"HBP block of {theta} at N = 1", found, exact, "", rules)
