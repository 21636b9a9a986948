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

A module compiled for fewer quantities (``quantities=``) is checked on those only. θ₀ is the first parameter used by exactly one node (its products run through the most of the graph). A failure
is localized on the model's own ``torch.fx`` intermediates: the first node whose generated forward value differs
names a wrong forward (or φ, when the rule prints φ as its forward), the first node whose output gradient differs
names a rule whose φ′ disagrees with the module, a wrong loss value or loss gradient names the loss rule. A wrong
GGN product is checked against the loss Hessian (the loss rule's ∇²ℓ), a wrong Hessian product with the GGN right
names the rules whose second derivatives (residual terms) it adds. Import failures and errors at run time name the
generated line and the node or loss rule it belongs to. Where autograd itself cannot give a reference (an op it
cannot differentiate twice, a model that does not run in float64), the check warns and does not refuse.
"""
import copy
import re
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from hbpc import ir
from hbpc.emit.names import node_stems
from hbpc.errors import HbpcError

SAMPLES = 2  # batch size of the check (N > 1 exercises the reductions); the HBP block uses the first sample
RELATIVE_TOLERANCE = 1e-6  # float64 agreement is ~1e-12; a miscompile is off by far more
ABSOLUTE_TOLERANCE = 1e-10
HBP_BLOCK_BUDGET = 2**26  # bytes: blocks() at N = 1 is checked only when it needs less than this
# Names of a node's output and of the gradient there inside the generated forward_backward (hbpc/emit/module.py).
ACTIVATION, GRADIENT = "a_{}", "g_{}"
_NO_VERIFY = "pass --no-verify (compile_model(..., verify=False)) to write it anyway"


def _errors(found, expected):
    """(max |found - expected|, max |expected|) over tensors or lists of tensors; NaN on a shape mismatch."""
    pairs = list(zip(found, expected)) if isinstance(found, (list, tuple)) else [(found, expected)]
    if isinstance(found, (list, tuple)) and len(found) != len(expected):
        return float("nan"), 0.0
    error = scale = 0.0
    for a, b in pairs:
        if a.shape != b.shape:
            return float("nan"), 0.0
        if b.numel():
            error = max(error, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
    return error, scale


def max_error(found, expected) -> float:
    return _errors(found, expected)[0]


def _disagrees(found, expected) -> bool:
    error, scale = _errors(found, expected)
    return not error <= RELATIVE_TOLERANCE * scale + ABSOLUTE_TOLERANCE


def _reference_loss(graph, loss_fn, loss):
    """The torch loss module the generated loss must equal: ``loss_fn``, or the one ``--loss`` names."""
    if loss is None and isinstance(loss_fn, nn.NLLLoss):  # after the model's final log_softmax, ...
        return nn.CrossEntropyLoss(reduction=loss_fn.reduction)  # ... whose GGN is cross-entropy's on its input
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
    tokens = graph.graph.get("tokens")
    if tokens:  # labels (N, *S) for logits (N, C, *S) or (N, *S, C)
        axis = tokens["class_axis"]
        positions = out.shape[:1] + (out.shape[2:] if axis == 1 else out.shape[1:-1])
        t = torch.randint(out.shape[axis], positions, generator=generator).to(device)
    elif graph.graph["loss_rule"].target == "class":
        t = torch.randint(out.shape[-1], out.shape[:1], generator=generator).to(device)
    else:
        t = torch.rand(out.shape, generator=generator, dtype=torch.float64).to(device)
    return x, t


def _first_parameter(graph, model):
    """The first parameter (model order) that exactly one node uses, or None."""
    uses = {}
    for name in graph.graph["order"]:
        for param in ir.node(graph, name).params.values():
            uses[param] = uses.get(param, 0) + 1
    return next((name for name, _ in model.named_parameters() if uses.get(name) == 1), None)


def _grad(outputs, inputs, grad_outputs=None, create_graph=False):
    """torch.autograd.grad with zeros for inputs the outputs do not depend on; the graph is kept."""
    if not torch.is_tensor(outputs) or not outputs.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, create_graph=create_graph,
                                allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def _dot(xs, ys):
    return sum((a * b).sum() for a, b in zip(xs, ys))


class _NoReference(Exception):
    """torch.autograd itself cannot compute a reference quantity (e.g. an op it cannot differentiate twice)."""


def _first_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _reference(compute):
    """``compute()``, with a failure of autograd itself as _NoReference (it is no fault of the generated module)."""
    try:
        return compute()
    except Exception as error:  # autograd may fail on any op
        raise _NoReference(f"{type(error).__name__}: {_first_line(error)}") from None


class _Reference:
    """Autograd on the float64 model, one forward graph for all quantities: L, ∇L, ∇²L v, G v, ∇²_θθ L v.

    ``params`` are all parameters (frozen ones too: curvature covers them); vectors are lists over them.
    """

    def __init__(self, model, loss_fn, x, t):
        self.params = list(model.parameters())
        self.loss_fn, self.t = loss_fn, t
        self.z = model(x)
        self.loss = loss_fn(self.z, t)
        self.gradient = _grad(self.loss, self.params, create_graph=True)

    def hessian_product(self, vs, only=None):
        """∇²L v, or only its rows for the parameters at the indices ``only`` (a diagonal block for v on them)."""
        targets = self.params if only is None else [self.params[k] for k in only]
        gradient = self.gradient if only is None else [self.gradient[k] for k in only]
        return _grad(_dot(gradient, vs), targets)

    def ggn_product(self, vs):
        """Jᵀ (∇²_z L) J v by reverse mode only: J v = ∂(Jᵀ u · v)/∂u at u = 0."""
        u = torch.zeros_like(self.z, requires_grad=True)
        jv = _grad(_dot(_grad(self.z, self.params, u, create_graph=True), vs), [u])[0]
        z = self.z.detach().requires_grad_()
        gz = _grad(self.loss_fn(z, self.t), [z], create_graph=True)[0]
        return _grad(self.z, self.params, _grad(_dot([gz], [jv]), [z])[0])


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
    node = ir.node(graph, name)
    return f"node `{name}` (rule '{node.rule.key}', {node.source})"


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
    where = f"generated line {lineno} (in {function}): {line}" if lineno else ""
    message = f"the generated module {what}: {type(error).__name__}: {_first_line(error)}"
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
    last = {ir.node(graph, name).fx_name: name for name in graph.graph["order"]}  # affine nodes follow their norm
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
    stems = node_stems(graph)  # generated identifiers are named after each node's stem
    for name in order:
        generated = found.get(ACTIVATION.format(stems[name]))
        if name in values and torch.is_tensor(generated) and _disagrees(generated, values[name]):
            rule = ir.node(graph, name).rule
            forward = (f"its φ = {rule.phi}" if getattr(rule, "forward", "") is None
                       else f"its forward `{getattr(rule, 'forward', '?')}`")
            return (f"{_describe_node(graph, name)}: the generated forward value differs from the model's module by "
                    f"{max_error(generated, values[name]):.3g}, so {forward} does not compute what the module does")
    loss_rule = graph.graph["loss_rule"].key
    if loss_differs:
        return (f"the loss rule '{loss_rule}': on the model's own logits its loss differs from the model's loss "
                f"function, so its ℓ(z, t) or its scale for reduction '{graph.graph['reduction']}' is not that loss")
    last = order[-1]
    generated = found.get(GRADIENT.format(stems[last]))
    if last in gradients and torch.is_tensor(generated) and _disagrees(generated, gradients[last]):
        return (f"the loss rule '{loss_rule}': its gradient ∂ℓ/∂z differs from the loss module's by "
                f"{max_error(generated, gradients[last]):.3g}, so its ℓ(z, t) is not the model's loss")
    for name in reversed(order[:-1]):
        generated = found.get(GRADIENT.format(stems[name]))
        if name in gradients and torch.is_tensor(generated) and _disagrees(generated, gradients[name]):
            consumers = [_describe_node(graph, s) for s in graph.successors(name)]
            phis = [f"φ = {ir.node(graph, s).rule.phi}" for s in graph.successors(name)
                    if hasattr(ir.node(graph, s).rule, "phi")]
            because = f" ({', '.join(phis)} disagrees with the module's forward)" if phis else ""
            return (f"{' and '.join(consumers)}: the gradient it passes back differs from autograd by "
                    f"{max_error(generated, gradients[name]):.3g}{because}")
    return ""


def _user_rule_note(rules) -> str:
    return f" (user rules in play: {', '.join(rule.key for rule in rules)})" if rules else ""


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors] if isinstance(tensors, (list, tuple)) else tuple(tensors.shape)


def _refuse(quantity, found, expected, culprit, rules):
    error = max_error(found, expected)
    shape = f" (shapes {_shapes(found)}, expected {_shapes(expected)})" if error != error else ""
    what = f"the generated module's {quantity} disagrees with autograd: max error {error:.3g}{shape}"
    return HbpcError(what + (f"; responsible: {culprit}" if culprit else _user_rule_note(rules)),
                     "compile-time verification in float64 against torch.autograd",
                     f"fix the rule named above; {_NO_VERIFY}")


def verify(graph, module, model, example_input, loss_fn=None, loss=None, rules=()):
    """Check the imported generated ``module`` against autograd on a float64 copy of ``model``; raise HbpcError."""
    reference_loss = _reference_loss(graph, loss_fn, loss)
    if reference_loss is None:
        warnings.warn(f"hbpc could not verify the generated module: torch has no loss module for --loss {loss!r} "
                      "to compare with", stacklevel=3)
        return
    generator = torch.Generator().manual_seed(0)
    try:
        model64, reference_loss = copy.deepcopy(model).double(), reference_loss.double()
        x, t = _synthetic_data(graph, model64, example_input.detach(), generator)
    except Exception as error:  # the model's own code may fail on a float64 copy
        warnings.warn(f"hbpc could not verify the generated module: a float64 copy of the model does not run "
                      f"({type(error).__name__}: {_first_line(error)})", stacklevel=4)
        return
    for p in model64.parameters():  # curvature is over every parameter, frozen ones included
        p.requires_grad_(True)
        p.grad = None
    path = Path(module.__file__)
    text = path.read_text() if path.exists() else ""
    try:
        curvature = module.Curvature(model64)
        _compare(graph, curvature, model64, reference_loss, x, t, rules, generator)
    except HbpcError:
        raise
    except _NoReference as error:
        warnings.warn(f"hbpc verified the generated module only partly: torch.autograd cannot compute the "
                      f"reference on this model ({error})", stacklevel=4)
    except Exception as error:  # a broken rule may produce any error
        raise _failure(graph, text, path, error, "fails when first run") from None


def _compare(graph, curvature, model, loss_fn, x, t, rules, generator):
    params = dict(model.named_parameters())
    loss = curvature.forward_backward(x, t)
    reference = _reference(lambda: _Reference(model, loss_fn, x, t))
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params.values()]
    for quantity, found, expected in (("loss", loss.detach(), reference.loss.detach()),
                                      ("gradient", grads, [g.detach() for g in reference.gradient])):
        if _disagrees(found, expected):
            culprit = _localize(graph, curvature, model, x, loss_fn, t, rules, loss_differs=quantity == "loss")
            raise _refuse(quantity, found, expected, culprit, rules)
    vs = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device) for p in params.values()]
    if "ggn" in curvature.QUANTITIES:  # a module compiled for fewer quantities is checked on those
        found, truth = curvature.ggn_vector_product(vs), _reference(lambda: reference.ggn_product(vs))
        if _disagrees(found, truth):
            culprit = _loss_hessian_culprit(graph, curvature, reference, loss_fn, t, generator)
            raise _refuse("GGN-vector product", found, truth, culprit, rules)
    if "hessian" not in curvature.QUANTITIES:
        return
    found, truth = curvature.hessian_vector_product(vs), _reference(lambda: reference.hessian_product(vs))
    if _disagrees(found, truth):
        raise _refuse("Hessian-vector product", found, truth, _residual_culprit(graph), rules)
    theta = _first_parameter(graph, model)
    if theta is None:
        return
    k = list(params).index(theta)
    exact = _reference(lambda: reference.hessian_product([vs[k]], only=[k])[0])
    found = curvature.block_products("hessian")[theta](vs[k])
    if _disagrees(found, exact):
        raise _refuse(f"Hessian block product of {theta}", found, exact, "", rules)
    del reference
    _compare_hbp_block(curvature, model, loss_fn, x[:1], t[:1], theta, vs[k], rules)


def _loss_hessian_culprit(graph, curvature, reference, loss_fn, t, generator) -> str:
    """The loss rule, if its Hessian product (the generated ``_loss_hessian_product``) is not the loss module's."""
    product = getattr(curvature, "_loss_hessian_product", None)
    if product is None:
        return ""
    z = reference.z.detach().requires_grad_()
    u = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    expected = _reference(lambda: _grad((_grad(loss_fn(z, t), [z], create_graph=True)[0] * u).sum(), [z])[0])
    found = product(u.reshape(1, z.shape[0], -1)).reshape(z.shape)
    if not _disagrees(found, expected):
        return ""
    return (f"the loss rule '{graph.graph['loss_rule'].key}': its Hessian product ∇²ℓ v differs from the loss "
            f"module's by {max_error(found, expected):.3g}")


def _residual_culprit(graph) -> str:
    """With the GGN right, a wrong Hessian product is in the residual terms: the rules' second derivatives."""
    keys = sorted({ir.node(graph, n).rule.key for n in graph.graph["order"] if hasattr(ir.node(graph, n).rule, "phi")})
    if not keys:
        return ""
    return (f"the residual terms (second derivatives φ″) of the rules {', '.join(map(repr, keys))}: the GGN "
            "product, which leaves them out, agrees")


def _compare_hbp_block(curvature, model, loss_fn, x, t, theta, v, rules):
    """At N = 1, the HBP block of θ₀ in the hessian mode is its true diagonal Hessian block."""
    curvature.forward_backward(x, t)
    if curvature.blocks_memory() > HBP_BLOCK_BUDGET:
        return
    p = dict(model.named_parameters())[theta]
    exact = _reference(lambda: _grad((_grad(loss_fn(model(x), t), [p], create_graph=True)[0] * v).sum(), [p])[0])
    found = curvature.blocks("hessian")[theta] @ v
    if _disagrees(found, exact):
        raise _refuse(f"HBP block of {theta} at N = 1", found, exact, "", rules)
