"""Assemble the generated ``curv_model.py`` from node code, the loss derivation and the plan."""
import io
import tokenize
from math import prod

from hbpc import __version__, ir
from hbpc.plan import ALL, QUANTITIES
from hbpc.runtime import NAMES

from .kronecker import factor_methods, factor_nodes
from .names import INPUT, safe_text, with_stems
from .nodes import node_code

_INDENT = "    "


def _indent(lines, depth):
    return [(_INDENT * depth + line) if line else "" for line in lines]


def _shape_args(shape) -> str:
    return ", ".join(map(str, shape))


def _with_classes(lines, reads, classes):
    """``C = classes`` ahead of lines that read the number of classes C."""
    return [f"C = {classes}", *lines] if "C" in reads else lines


def _loss_lines(graph, last, loss_plan):
    rule, derived = graph.graph["loss_rule"], graph.graph["loss_derived"]
    classes = prod(ir.node(graph, last).y_shape)
    smoothing = loss_plan.label_smoothing
    target = "t.to(z.dtype)" if rule.target == "class" else "t.reshape(N, -1).to(z.dtype)"
    if smoothing:
        target = f"{1 - smoothing!r} * {target} + {smoothing / classes!r}"
    value, grad, hvp = derived.value, derived.grad, derived.hvp
    lines = [f"t = {target}"]
    lines += [f"{name} = {code}" for name, code in derived.intermediates.items()]
    lines += derived.forward_lines
    lines += [f"scale = {derived.scale.code}", f"loss = scale * ({value.code}).sum()",
              f"g_{last} = (scale * ({grad.code})).reshape(N, *{ir.node(graph, last).y_shape!r})",
              *(["self.loss_scale, self.loss_z, self.loss_t = scale, z, t"] if loss_plan.keeps("z, t, scale") else [])]
    lines += [f"self.loss_{name} = {name}" for name in derived.intermediates]
    lines = [f"z = a_{last}.reshape(N, -1)", *_with_classes(lines, value.reads | grad.reads | derived.scale.reads, classes)]
    restore = ["scale = self.loss_scale"] + [f"{name} = self.loss_{name}" for name in ("z", "t", *derived.intermediates)
                                             if name in hvp.reads]
    rank = len(ir.node(graph, last).y_shape)
    flatten = ["shape = v.shape", f"v = v.reshape(*shape[:len(shape) - {rank}], -1)"] if rank > 1 else []
    unflatten = ".reshape(shape)" if rank > 1 else ""
    zero = "" if "v" in hvp.reads else " + 0 * v"  # a constant Hessian product still has v's shape
    hvp_body = _with_classes(restore + flatten + [*hvp.lines, f"return (scale * ({hvp.code}){zero}){unflatten}"],
                             hvp.reads, classes)
    methods = [
        "def _loss_hessian_product(self, v):",
        f'    """(∇²_z L) v per sample, v (V, N, C): {safe_text(derived.doc)}"""', *_indent(hvp_body, 1), "",
    ]
    if loss_plan.sampled_fisher:
        sampled = [
            "labels = torch.multinomial(self.loss_softmax, samples, replacement=True, generator=generator)  # (N, S)",
            f"t = torch.nn.functional.one_hot(labels, {classes}).to(self.loss_z.dtype)  # (N, S, C) sampled targets",
            *[f"{name} = self.loss_{name}[:, None, :]" for name in ("z", *derived.intermediates) if name in grad.reads],
            *grad.lines,
            f"return {grad.code}  # the derived ∇_z ℓ(z, ŷ_s)",
        ]
        methods += [
            "def _loss_sampled_gradients(self, samples, generator):",
            '    """s = ∇_z ℓ(z_n, ŷ_s) at S labels ŷ_s ~ softmax(z_n) per sample: (N, S, C)."""',
            *_indent(_with_classes(sampled, grad.reads, classes), 1), ""]
    return lines, methods


def _sum(terms):
    return " + ".join(terms)


def _input_vars(graph, name):
    return [INPUT if i == INPUT else f"a_{i}" for i in ir.node(graph, name).inputs]


def _backward(graph, order, codes, plan):
    """The gradient pass: g at each tensor with a parameter upstream, summed over its consumers."""
    contributions, lines = {}, []
    for name in reversed(order):
        if name not in plan.upstream:
            continue
        if name != order[-1]:
            lines.append(f"g_{name} = {_sum(contributions[name])}")
        lines += codes[name].backward
        for i, source in enumerate(ir.node(graph, name).inputs):
            if source in plan.upstream:
                contributions.setdefault(source, []).append(codes[name].vjp(f"g_{name}")[i])
    return lines


def _variable(names) -> str:
    """S_a for one node, S_a__b for the cross curvature of two."""
    return "S_" + "__".join(names)


def _step_line(step, code) -> str:
    """The line of one sweep step (hbpc.plan.sweep.Step) with the node's code for its terms."""
    if step.kind == "visit":
        return f"visit({step.node!r}, S_{step.node})"
    if step.kind == "at":
        return f"S = S_{step.node}  # at the output of {step.node}; propagate to its inputs"
    if step.kind == "free":
        return "del " + ", ".join(map(_variable, step.variables))
    if step.kind == "input":
        term = code.input_curvature[step.slots[0]]
    elif step.kind == "cross":
        term = code.cross(*step.slots)
    else:  # E[J_i]ᵀ S_(node, other): (d_source, d_other)
        term = code.mean_vjp(step.slots[0], _variable(step.matrix) + (".T" if step.flip else ""))
    expression = f"{term} + ({term}).T" if step.symmetric else f"({term}).T" if step.transpose else term
    target = _variable(step.target)
    return f"{target} = {target} + {expression}" if step.accumulate else f"{target} = {expression}"


def _sweep_method(order, codes, sweep):
    """HBP over the graph as the plan scheduled it: a backward sweep keeping S for every pair of frontier tensors."""
    body = [f"S_{order[-1]} = self._loss_hessian_sum()", *(_step_line(step, codes[step.node]) for step in sweep.steps)]
    doc = ("S at every node output by the paper's batch-averaged recursion; visit(node, S) at each node with parameters.\n\n"
           "        S_z = Σ_n ∇²_{z_n} L; S_x = E[J]ᵀ S E[J] (average_input_jacobian) or E[Jᵀ S J], plus mode(Σ_n R_n).\n"
           "        Where the graph branches, S is kept for every pair of live tensors (cross terms use E[J]).\n        ")
    return ["def _hbp_sweep(self, curvature, average_input_jacobian, visit):", f'    """{doc}"""', *_indent(body, 1), ""]


def _runtime_imports(code: str) -> list:
    """``from hbpc.runtime import ...`` naming the runtime's names the code reads (not attributes or strings)."""
    used = set()
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.NAME and token.string in NAMES and previous != ".":
            used.add(token.string)
        previous = token.string
    lines, line = [], "from hbpc.runtime import ("
    for name in sorted(used):
        if len(line) + len(name) + 2 > 120:
            lines.append(line.rstrip())
            line = "    "
        line += f"{name}, "
    return [*lines, line.rstrip(", ") + ")"]


def _table(name, entries, comment="") -> list:
    """A class attribute holding a dict, one entry a line (``{}`` when empty)."""
    if not entries:
        return [f"{name} = {{}}{comment}"]
    return [f"{name} = {{{comment}", *[f"    {key!r}: {value!r}," for key, value in entries.items()], "}"]


def emit(graph, plan, source_name: str, digest: str) -> str:
    graph, plan = with_stems(graph, plan)  # node names as the identifiers' stems: no name can collide
    order = graph.graph["order"]
    plans = {p.name: p for p in plan.nodes}
    for name in order:
        ir.update(graph, name, plan=plans[name])
    codes = {name: node_code(name, ir.node(graph, name), _input_vars(graph, name), plans[name]) for name in order}
    last = order[-1]
    loss_lines, loss_methods = _loss_lines(graph, last, plan.loss)
    factors = factor_nodes(graph, order)
    sweep = _sweep_method(order, codes, plan.sweep)
    peak_at = f"the inputs of {plan.sweep.peak_at}" if plan.sweep.peak_at else "the loss"
    nodes = ir.nodes(graph)
    buffers = sorted({b for node in nodes for b in node.buffers.values()})
    eval_mode_modules = sorted({node.buffers.get("running_mean", "*").rpartition(".")[0] or "*"
                                for node in nodes if node.op == "batch_norm"}
                               | {node.hyper["dropout"] for node in nodes if "dropout" in node.hyper})
    params = graph.graph["architecture"]  # model order; parameters the loss ignores have zero curvature
    forward = [line for name in order for line in codes[name].forward]
    rule = graph.graph["loss_rule"]
    y_shape = ir.node(graph, last).y_shape
    classes = prod(y_shape)
    sampled, probabilities = plan.loss.sampled_fisher, plan.loss.probability_targets
    if rule.target == "class":
        target_doc = f"class labels (N,) in [0, {classes})" + (
            f" or class probabilities (N, {classes}), rows summing to 1" if probabilities else "")
    else:
        target_doc = f"shaped like the output, (N, {_shape_args(y_shape)})"
    fb_body = [
        "N, t = self._begin(x, target)",
        "with torch.no_grad():",
        *_indent(["# forward", *forward, "# loss", *loss_lines, "# backward", *_backward(graph, order, codes, plan)], 1),
        "return self._end(loss, x, target)",
    ]
    nodes = {name: (tuple(ir.node(graph, name).inputs), dict(ir.node(graph, name).params)) for name in order}
    second_order = {name: (codes[name].residual_product is not None, tuple(codes[name].cross_terms),
                           codes[name].tangent_view)
                    for name in order if codes[name].residual_product or codes[name].cross_terms}
    graph_doc = "\n".join(f"    a_{n} = {safe_text(ir.node(graph, n).op)}({', '.join(_input_vars(graph, n))})    "
                          f"# {' '.join(map(str, ir.node(graph, n).x_shapes))} -> {ir.node(graph, n).y_shape}"
                          for n in order)
    loss = safe_text(f"{graph.graph['loss']} ({graph.graph['reduction']})")
    model = safe_text(graph.graph["model"])
    header = [
        f"# Generated by hbpc {__version__} from {safe_text(source_name)}. Do not edit: recompile instead.",
        f"# hbpc-version: {__version__}",
        f"# graph-hash: {digest}",
        f'"""Curvature code for {model}.',
        "",
        "Graph (per-sample shapes):",
        graph_doc,
        f"Loss: {loss}.",
        "",
        "See hbpc's docs/curvature.md for the definitions of every quantity.",
        '"""',
    ]
    blocks = {name: tuple((ir.node(graph, name).params[role], method) for role, method in codes[name].blocks.items())
              for name in order if codes[name].blocks}
    cls = [
        "class Curvature(CurvatureModule):",
        f'    """Curvature of {loss} for {model}: HBP blocks and exact products (hbpc.runtime.CurvatureModule)."""',
        "",
        *_indent([
            *_table("PARAMETERS", params, "  # as model.named_parameters()"),
            f"INPUT_SHAPE = {graph.graph['input_shape']!r}",
            f"OUTPUT_SHAPE = {tuple(y_shape)!r}",
            *([f"BUFFERS = {tuple(buffers)!r}"] if buffers else []),
            *([f"EVAL_MODE_MODULES = {tuple(eval_mode_modules)!r}  # Dropout/BatchNorm compiled as eval maps; '*': F.dropout"]
              if eval_mode_modules else []),
            *([f"TARGET = {rule.target!r}"] if rule.target != "class" else []),
            *([f"PROBABILITY_TARGETS = True  # cross-entropy also takes class probabilities"] if probabilities else []),
            f"LOSS = {graph.graph['loss']!r}",
            *(["SAMPLED_FISHER = True  # a softmax likelihood: labels can be sampled"] if sampled else []),
            *([f"QUANTITIES = {tuple(q for q in QUANTITIES if q in plan.quantities)!r}  # compiled for these only"]
              if plan.quantities != ALL else []),
            *_table("NODES", nodes, "  # node: (inputs, {role: parameter}), in graph order"),
            *_table("SECOND_ORDER", second_order, "  # node: (has a residual, roles coupled to the input, tangent view)"),
            *_table("BLOCKS", blocks, "  # node: ((parameter, block method), ...)"),
            *_table("FACTORS", {name: (p["weight"], p.get("bias")) for name, p in factors.items()},
                    "  # the KFAC family's layers: node: (weight, bias)"),
            f"MEMORY = ({plan.sweep.peak}, {peak_at!r}, {plan.sweep.factors!r})  # blocks(): peak entries, where, factors kept",
            "",
            "def forward_backward(self, x, target):",
            '    """L = scale · Σ_n ℓ(z_n, t_n); fills p.grad like L.backward() and caches what curvature needs.',
            "",
            f"    x: (N, {_shape_args(graph.graph['input_shape'])}) in the parameters' dtype; target: {target_doc}.",
            '    """',
            *_indent(fb_body, 1), "",
            *sweep,
            *loss_methods,
            *[line for name in order for line in codes[name].methods
              + (factor_methods(name, ir.node(graph, name)) if name in factors else [])],
        ], 1),
    ]
    body = "\n".join(cls)
    text = "\n".join([*header, "import torch", "", *_runtime_imports(body), "", "", body])
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"
