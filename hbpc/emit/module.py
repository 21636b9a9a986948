"""Assemble the generated ``curv_model.py`` from node code, the loss derivation and the plan."""
import io
import tokenize
from math import prod

from hbpc import __version__, ir
from hbpc.errors import HbpcError
from hbpc.plan import ALL, QUANTITIES
from hbpc.runtime import NAMES
from hbpc.runtime.base import TABLE_FORMAT

from .code import Method, Target
from .kronecker import factor_nodes
from .names import INPUT, family_names, safe_text, with_stems
from .nodes import node_code, shares_methods
from .tokens import token_loss_lines

_INDENT = "    "


def _indent(lines, depth):
    return [(_INDENT * depth + line) if line else "" for line in lines]


def _shape_args(shape) -> str:
    return ", ".join(map(str, shape))


def _with_classes(lines, reads, classes):
    """``C = classes`` ahead of lines that read the number of classes C."""
    return [f"C = {classes}", *lines] if "C" in reads else lines


def _loss_lines(graph, last, loss_plan):
    if graph.graph.get("tokens"):
        return token_loss_lines(graph, last, loss_plan)
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
    if "v" not in hvp.reads:  # a loss linear in z: its Hessian is 0
        hvp_body = ["return torch.zeros_like(v)"]
    else:
        hvp_body = _with_classes(restore + flatten + [*hvp.lines, f"return (scale * ({hvp.code})){unflatten}"],
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


def _by_input(codes, indices="i") -> tuple:
    """A method body returning codes[k] for input k (``indices`` names the argument(s) k is compared with); inputs
    whose code is the last input's share its plain ``return``."""
    last = codes[-1][1]
    lines = []
    for key, code in codes[:-1]:
        if code != last:
            lines += [f"if {indices} == {key!r}:", f"    return {code}"]
    return (*lines, f"return {last}")


def _sweep_records(code, inputs, branches) -> list:
    """The node's methods hbpc.runtime's HBP sweep calls: S at input i; where the graph branches, E[J_i]ᵀ M and,
    for a node with several inputs, the cross terms E[J_i]ᵀ S E[J_j]. None for a node whose input carries no
    curvature (integer ids)."""
    if not code.input_curvature:
        return []
    records = [Method("input_curvature", "i, S, average_input_jacobian, curvature",
                      "S at input i: E[J_i]ᵀ S E[J_i] (average_input_jacobian) or E[J_iᵀ S J_i], plus mode(Σ_n R_n)",
                      _by_input(list(enumerate(code.input_curvature))))]
    count = len(inputs)
    if branches:
        records.append(Method("mean_vjp", "i, M", "E[J_i]ᵀ M for a (d_y, k) matrix M: (d_x_i, k)",
                              _by_input([(i, code.mean_vjp(i, "M")) for i in range(count)])))
    if code.cross and count > 1 and (branches or len(set(inputs)) < count):  # or one tensor at two inputs (h @ h)
        pairs = [((i, j), code.cross(i, j)) for i in range(count) for j in range(i + 1, count)]
        records.append(Method("cross", "i, j, S, curvature",
                              "E[J_i]ᵀ S E[J_j] for inputs i < j, plus the residual coupling them: (d_x_i, d_x_j)",
                              _by_input(pairs, "(i, j)")))
    return records


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
    """A class attribute holding a dict: on one line where it fits in 116 characters, else one entry a line."""
    line = f"{name} = {{{', '.join(f'{key!r}: {value!r}' for key, value in entries.items())}}}{comment}"
    if len(line) <= 116:
        return [line]
    return [f"{name} = {{{comment}", *[f"    {key!r}: {value!r}," for key, value in entries.items()], "}"]


def _tuple_lines(name, items, comment="") -> list:
    """A class attribute holding a tuple: on one line where it fits in 116 characters, else wrapped at 116."""
    line = f"{name} = {tuple(items)!r}{comment}"
    if len(line) <= 116:
        return [line]
    lines, line = [f"{name} = ({comment}"], "    "
    for item in items:
        if len(line) + len(repr(item)) + 2 > 116:
            lines.append(line.rstrip())
            line = "    "
        line += f"{item!r}, "
    return [*lines, line.rstrip(), ")"]


def _branches(graph, order, plan) -> bool:
    """Whether the HBP sweep keeps cross curvatures: some node has two different inputs that carry curvature."""
    return any(len({i for i in ir.node(graph, n).inputs if i in plan.upstream}) > 1 for n in order)


def _target(graph, name, family=None) -> Target:
    node = ir.node(graph, name)
    return Target(name, dict(node.params), dict(node.param_shapes), family)


def _families(graph, order, plans, branches) -> dict:
    """{node: family name} for the nodes whose kind shares methods: two or more nodes of one rule whose methods, HBP
    methods and second-order row agree form a family (emitted once); its name is the rule's, made unique
    (names.family_names). A node with no such twin prints its own methods."""
    keys = {}
    for name in order:
        node = ir.node(graph, name)
        if not shares_methods(node):
            continue
        code = node_code(_target(graph, name, "family"), node, _input_vars(graph, name), plans[name])
        records = tuple(code.records + _sweep_records(code, node.inputs, branches))
        keys[name] = (node.rule.key, records, _second_order_row(code), tuple(code.blocks.items()))
    shared = [key for key in keys.values() if list(keys.values()).count(key) > 1]  # a node alone keeps its own methods
    families = family_names(graph, [(key[0], key) for key in shared])
    return {name: families[key] for name, key in keys.items() if key in families}


def _second_order_row(code):
    """(has a residual, coupled roles, tangent view suffix), or None for a node without second-order terms."""
    if code.residual_product is None and not code.cross_terms:
        return None
    return code.residual_product is not None, tuple(code.cross_terms), code.tangent_view


def _methods(graph, order, codes, targets, plan, branches) -> list:
    """Every node's methods in graph order: a family's once, at its first node."""
    lines, printed = [], set()
    for name in order:
        code, target, node = codes[name], targets[name], ir.node(graph, name)
        if target.shared and target.family in printed:
            continue
        members = [n for n in order if targets[n].family == target.family] if target.shared else [name]
        if not any(n in plan.upstream for n in members):
            continue  # no gradient, tangent or curvature reaches the node: no walker calls its methods
        sweep = any(any(plan.node(n).input_needs_grad) for n in members)
        records = code.records + (_sweep_records(code, node.inputs, branches) if sweep else [])
        lines += code.methods + [line for record in records for line in record.lines(target)]
        printed.add(target.family)
    return lines


def emit(graph, plan, source_name: str, digest: str, header_lines=(), loss_note=None) -> str:
    """The generated module's text; ``header_lines`` are comment lines after the graph hash, ``loss_note`` a line of
    the module docstring after the loss."""
    graph, plan = with_stems(graph, plan)  # node names as the identifiers' stems: no name can collide
    order = graph.graph["order"]
    plans = {p.name: p for p in plan.nodes}
    for name in order:
        ir.update(graph, name, plan=plans[name])
    branches = _branches(graph, order, plan)
    families = _families(graph, order, plans, branches)
    targets = {name: _target(graph, name, families.get(name)) for name in order}
    codes = {name: node_code(targets[name] if shares_methods(ir.node(graph, name)) else name, ir.node(graph, name),
                             _input_vars(graph, name), plans[name]) for name in order}
    last = order[-1]
    loss_lines, loss_methods = _loss_lines(graph, last, plan.loss)
    factors = factor_nodes(graph, order)
    peak_at = f"the inputs of {plan.sweep.peak_at}" if plan.sweep.peak_at else "the loss"
    sharing = {name: prod(ir.node(graph, name).x_shape[:-1]) for name in factors
               if plans[name].kind == "shared matmul"}
    nodes = ir.nodes(graph)
    buffers = sorted({b for node in nodes for b in node.buffers.values()})
    eval_mode_modules = sorted({node.buffers.get("running_mean", "*").rpartition(".")[0] or "*"
                                for node in nodes if node.op == "batch_norm"}
                               | {node.hyper["dropout"] for node in nodes if "dropout" in node.hyper})
    params = graph.graph["architecture"]  # model order; parameters the loss ignores have zero curvature
    ids = min((node.hyper["num_embeddings"] for node in nodes if node.op == "embedding" and INPUT in node.inputs),
              default=None)
    forward = [line for name in order for line in codes[name].forward]
    rule = graph.graph["loss_rule"]
    y_shape = ir.node(graph, last).y_shape
    classes = prod(y_shape)
    sampled, probabilities = plan.loss.sampled_fisher, plan.loss.probability_targets
    if graph.graph.get("tokens"):
        tokens = graph.graph["tokens"]
        classes = y_shape[0] if tokens["class_axis"] == 1 else y_shape[-1]
        positions = y_shape[1:] if tokens["class_axis"] == 1 else y_shape[:-1]
        target_doc = (f"class labels (N, {_shape_args(positions)}) in [0, {classes}) or {tokens['ignore_index']} "
                      "(ignore_index: left out of the mean)")
    elif rule.target == "class":
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
    nodes = {name: (tuple(ir.node(graph, name).inputs), dict(ir.node(graph, name).params), families.get(name))
             for name in order}
    second_order = {}
    for name in order:
        row = _second_order_row(codes[name])
        if row is not None:
            second_order.setdefault(families.get(name, name), row)
    graph_doc = "\n".join(f"    a_{n} = {safe_text(ir.node(graph, n).op)}({', '.join(_input_vars(graph, n))})    "
                          f"# {' '.join(map(str, ir.node(graph, n).x_shapes))} -> {ir.node(graph, n).y_shape}"
                          for n in order)
    loss = safe_text(f"{graph.graph['loss']} ({graph.graph['reduction']})")
    model = safe_text(graph.graph["model"])
    header = [
        f"# Generated by hbpc {__version__} from {safe_text(source_name)}. Do not edit: recompile instead.",
        f"# hbpc-version: {__version__}",
        f"# graph-hash: {digest}",
        *header_lines,
        f'"""Curvature code for {model}.',
        "",
        "Graph (per-sample shapes):",
        graph_doc,
        f"Loss: {loss}. hbpc's docs/curvature.md defines every quantity.",
        *([loss_note] if loss_note else []),
        '"""',
    ]
    blocks = [name for name in order if codes[name].blocks]
    for name in blocks:
        _check_block_methods(name, codes[name])
    lowered = [name for name in factors if plans[name].lowering]
    cls = [
        "class Curvature(CurvatureModule):",
        f'    """Curvature of {loss} for {model}: HBP blocks and exact products (hbpc.runtime.CurvatureModule)."""',
        "",
        *_indent([
            f"RUNTIME_FORMAT = {TABLE_FORMAT}  # the hbpc.runtime table layout this class is printed for",
            *_table("PARAMETERS", params, "  # as model.named_parameters()"),
            f"INPUT_SHAPE = {graph.graph['input_shape']!r}",
            f"OUTPUT_SHAPE = {tuple(y_shape)!r}",
            *([f"INPUT_IDS = {ids}  # x holds token ids in [0, {ids}): the model starts with an embedding"] if ids else []),
            *([f"BUFFERS = {tuple(buffers)!r}"] if buffers else []),
            *([f"EVAL_MODE_MODULES = {tuple(eval_mode_modules)!r}  # Dropout/BatchNorm compiled as eval maps; '*': F.dropout"]
              if eval_mode_modules else []),
            *([f"TARGET = {rule.target!r}"] if rule.target != "class" else []),
            *([f"PROBABILITY_TARGETS = True  # cross-entropy also takes class probabilities"] if probabilities else []),
            *([f"TOKENS = {graph.graph['tokens']!r}  # cross-entropy over positions: labels (N, *S)"]
              if graph.graph.get("tokens") else []),
            f"LOSS = {graph.graph['loss']!r}",
            *(["SAMPLED_FISHER = True  # a softmax likelihood: labels can be sampled"] if sampled else []),
            *([f"QUANTITIES = {tuple(q for q in QUANTITIES if q in plan.quantities)!r}  # compiled for these only"]
              if plan.quantities != ALL else []),
            *_table("NODES", nodes, "  # node: (inputs, {role: parameter}, family), in graph order"),
            *_table("SECOND_ORDER", second_order,
                    "  # family or node: (residual?, coupled roles, tangent view)"),
            *_tuple_lines("BLOCKS", blocks, "  # nodes with blocks"),
            *(_tuple_lines("FACTORS", list(factors), "  # the KFAC family's layers") if factors else []),
            *(_tuple_lines("LOWERED", lowered, "  # factor layers caching the raw input") if lowered else []),
            *(_table("WEIGHT_SHARING", sharing, "  # KFAC layers shared over positions: node: positions (kfac_approx)")
              if sharing else []),
            f"MEMORY = ({plan.sweep.peak}, {peak_at!r}, {plan.sweep.factors!r})  # blocks(): peak entries, where, factors kept",
            "",
            "def forward_backward(self, x, target):",
            '    """L = scale · Σ_n ℓ(z_n, t_n); fills p.grad like L.backward() and caches what curvature needs.',
            "",
            f"    x: (N, {_shape_args(graph.graph['input_shape'])}) "
            + (f"token ids in [0, {ids})" if ids else "in the parameters' dtype") + f"; target: {target_doc}.",
            '    """',
            *_indent(fb_body, 1), "",
            *loss_methods,
            *_methods(graph, order, codes, targets, plan, branches),
        ], 1),
    ]
    body = "\n".join(cls)
    text = "\n".join([*header, "import torch", "", *_runtime_imports(body), "", "", body])
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"


def _check_block_methods(name, code):
    """hbpc.runtime builds a node's blocks with its ``<role>_block`` methods: an emitter must name them so."""
    wrong = {role: method for role, method in code.blocks.items() if method not in (f"{role}_block", f"_{name}_{role}_block")}
    if wrong:
        raise HbpcError(f"node {name!r}: block methods {wrong} must be named '<role>_block'", "the node's emitter",
                        "name each parameter's block method _<node>_<role>_block")
