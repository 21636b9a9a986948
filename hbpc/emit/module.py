"""Assemble the generated ``curv_model.py`` from node code, the loss derivation and the plan."""
import re
from math import prod
from pathlib import Path

import sympy as sp

from hbpc import __version__
from hbpc.derive import derive
from hbpc.derive.printer import torch_code
from hbpc.errors import HbpcError

from .kronecker import factor_methods, factor_nodes, kronecker_factors_method, root_backward_method
from .names import INPUT, safe_text, with_stems
from .nodes import node_code, param_code, sandwich_temporaries, tangent_view

PRELUDE = (Path(__file__).with_name("prelude.py")).read_text()
PRELUDE_ND = (Path(__file__).with_name("prelude_nd.py")).read_text()
PRELUDE_CONV = (Path(__file__).with_name("prelude_conv.py")).read_text()
PRELUDE_NORM = (Path(__file__).with_name("prelude_norm.py")).read_text()
_INDENT = "    "


def _indent(lines, depth):
    return [(_INDENT * depth + line) if line else "" for line in lines]


def _shape_args(shape) -> str:
    return ", ".join(map(str, shape))


def _needed(shared, code):
    """The CSE lines ``code`` depends on, directly or through later lines."""
    kept, wanted = [], set(re.findall(r"\bs\d+\b", code))
    for line in reversed(shared):
        target, expression = line.split(" = ", 1)
        if target in wanted:
            kept.insert(0, line)
            wanted |= set(re.findall(r"\bs\d+\b", expression))
    return kept


def _loss_lines(graph, last):
    rule = graph.graph["loss_rule"]
    derivation = derive(rule)
    N, C = sp.symbols("N C", positive=True, integer=True)
    scale = torch_code(sp.nsimplify(rule.scale[graph.graph["reduction"]](N, C)))
    hyper = graph.graph["loss_hyper"]
    shared, exprs = derivation.code(hyper)
    classes = prod(graph.nodes[last]["y_shape"])
    outside = sorted(i for i in derivation.fixed_indices() if i >= classes)
    if outside:
        raise HbpcError(f"loss rule '{rule.key}' reads entry {outside[0]} of the logits, but the model has {classes} "
                        "outputs per sample", f"Loss('{rule.key}', {rule.ell}, ...)",
                        "index entries 0 to C-1 only, or compile a model with more outputs")
    smoothing = hyper.get("label_smoothing", 0.0)
    target = "target.to(z.dtype)" if rule.target == "class" else "target.reshape(N, -1).to(z.dtype)"
    if smoothing:
        target = f"{1 - smoothing!r} * {target} + {smoothing / classes!r}"
    lines = [f"z = a_{last}.reshape(N, -1)", f"C = {classes}", f"t = {target}"]
    lines += [f"{name} = {code}" for name, code in derivation.intermediates.items()]
    lines += _needed(shared, exprs["value"] + " " + exprs["grad"])
    lines += [f"scale = {scale}", f"loss = scale * ({exprs['value']}).sum()",
              f"g_{last} = (scale * ({exprs['grad']})).reshape(N, *{graph.nodes[last]['y_shape']!r})",
              "self.loss_scale, self.loss_z, self.loss_t = scale, z, t"]
    lines += [f"self.loss_{name} = {name}" for name in derivation.intermediates]
    restore = ["z, t, scale = self.loss_z, self.loss_t, self.loss_scale"]
    restore += [f"{name} = self.loss_{name}" for name in derivation.intermediates]
    rank = len(graph.nodes[last]["y_shape"])
    flatten = ["shape = v.shape", f"v = v.reshape(*shape[:len(shape) - {rank}], -1)"] if rank > 1 else []
    unflatten = ".reshape(shape)" if rank > 1 else ""
    hvp = restore + flatten + _needed(shared, exprs["hvp"]) + [f"return (scale * ({exprs['hvp']}) + 0 * v){unflatten}"]
    doc = f"ℓ(z, t) = {rule.ell};  Hv = {derivation.hessian_product}"
    z_shape = _shape_args(graph.nodes[last]["y_shape"])
    if "softmax" in derivation.intermediates:  # a softmax likelihood: the Fisher can be sampled
        sampled = [
            "check_samples(samples)",
            *restore,
            "labels = torch.multinomial(softmax, samples, replacement=True, generator=generator)  # (N, S)",
            f"t = torch.nn.functional.one_hot(labels, {classes}).to(z.dtype)  # (N, S, C) sampled targets",
            *[f"{name} = {name}[:, None, :]" for name in ("z", *derivation.intermediates)
              if re.search(rf"\b{name}\b", exprs["grad"])],
            *_needed(shared, exprs["grad"]),
            f"return {exprs['grad']}  # the derived ∇_z ℓ(z, ŷ_s)",
        ]
        fisher = [
            *flatten,
            "s, scale = self._loss_sampled_gradients(samples, generator), self.loss_scale",
            "return (scale / samples * torch.einsum('nsc,...ns->...nc', s, torch.einsum('nsc,...nc->...ns', s, v)))"
            + unflatten,
        ]
        root = ["s = self._loss_sampled_gradients(samples, generator)",
                f"return (self.loss_scale / samples) ** 0.5 * s.permute(1, 0, 2).reshape(samples, self.N, {z_shape})"]
        fisher_method = [
            "def _loss_sampled_gradients(self, samples, generator):",
            '    """s = ∇_z ℓ(z_n, ŷ_s) at S labels ŷ_s ~ softmax(z_n) per sample: (N, S, C)."""',
            *_indent(sampled, 1), "",
            "def _loss_fisher_product(self, v, samples, generator):",
            '    """(c/S) Σ_s s sᵀ v per sample with sampled labels: an unbiased estimate of ∇²_z L v."""',
            *_indent(fisher, 1), ""]
    else:
        root = [f"raise ValueError(\"kind='kfac' samples labels from a softmax likelihood; {safe_text(graph.graph['loss'])} has \"",
                "                 \"none: use kind='kflr' (exact factors) or 'kfra'\")"]
        fisher_method = []
    fisher_method += [
        "def _loss_sampled_root(self, samples, generator):",
        '    """√(c/S) s, the Monte Carlo square root of ∇²_z L per sample (E[u uᵀ] = ∇²_{z_n} L): (S, N, *z)."""',
        *_indent(root, 1), ""]
    methods = [
        "def _loss_hessian_product(self, v):",
        f'    """(∇²_z L) v per sample, v (V, N, C): {safe_text(doc)}"""', *_indent(hvp, 1), "",
        "def _loss_hessian_sum(self):",
        '    """S_z = Σ_n ∇²_{z_n} L: (C, C)."""',
        f"    eye = torch.eye({classes}, dtype=self.loss_z.dtype, device=self.loss_z.device)",
        f"    basis = eye[:, None, :].expand({classes}, self.N, {classes}).reshape({classes}, self.N, {_shape_args(graph.nodes[last]['y_shape'])})",
        f"    return self._loss_hessian_product(basis).sum(1).reshape({classes}, {classes})", "",
        "def _loss_hessian_root(self):",
        '    """Q_n √Λ_n per sample, ∇²_{z_n} L = Q_n Λ_n Q_nᵀ (Λ clamped at 0): (C, N, *z), column first."""',
        f"    eye = torch.eye({classes}, dtype=self.loss_z.dtype, device=self.loss_z.device)",
        f"    basis = eye[:, None, :].expand({classes}, self.N, {classes}).reshape({classes}, self.N, {z_shape})",
        f"    H = self._loss_hessian_product(basis).reshape({classes}, self.N, {classes}).transpose(0, 1)  # (N, C, C)",
        "    eigenvalues, Q = eigh_upcast(H)",
        "    root = Q * eigenvalues.clamp(min=0).sqrt()[:, None, :]",
        f"    return root.permute(2, 0, 1).reshape({classes}, self.N, {z_shape})", "",
        *fisher_method,
    ]
    return lines, methods


def _sum(terms):
    return " + ".join(terms)


def _input_vars(graph, name):
    return [INPUT if i == INPUT else f"a_{i}" for i in graph.nodes[name]["inputs"]]


def _backward(graph, order, codes, plan):
    """The gradient pass: g at each tensor with a parameter upstream, summed over its consumers."""
    contributions, lines = {}, []
    for name in reversed(order):
        if name not in plan.upstream:
            continue
        if name != order[-1]:
            lines.append(f"g_{name} = {_sum(contributions[name])}")
        lines += codes[name].backward
        for i, source in enumerate(graph.nodes[name]["inputs"]):
            if source in plan.upstream:
                contributions.setdefault(source, []).append(codes[name].vjp(f"g_{name}")[i])
    return lines


def _product(graph, order, codes, active, second_order, loss_product):
    """Straight-line code for C v restricted to the parameters in ``active``, reusing forward_backward's cache.

    Forward: t_out = Σ_i J_i t_i + Σ_θ J_θ v_θ. Backward: u_in = Σ_consumers J_iᵀ u_out, plus second-order terms:
    ``second_order`` is ``None`` (GGN), ``"hessian"`` (every residual R t_in and the parameter-input cross terms
    J_xᵀ(g; W ← v_W), J_θᵀ(g; X ← t_in)) or ``"curvature"`` (residuals under the runtime ``curvature`` mode;
    cross terms, which only tied weights create in a diagonal block, only for ``"hessian"``).
    """
    tangent, lines = set(), []
    for name in order:
        node = graph.nodes[name]
        tangents = [f"t_{i}" if i in tangent else None for i in node["inputs"]]
        terms = [codes[name].jvp(tangents)] if any(tangents) else []
        terms += [f"self._{name}_{role}_jvp(v[{param!r}], self.{name}_X)"
                  for role, param in node["params"].items() if param in active]
        if terms:
            lines.append(f"t_{name} = {_sum(terms)}")
            tangent.add(name)
    last = order[-1]
    lines.append(f"u_{last} = {loss_product.format(t=f't_{last}')}")
    mode = "'hessian'" if second_order == "hessian" else "curvature"
    cross = (lambda term: term) if second_order == "hessian" else (lambda term: f"({term} if curvature == 'hessian' else 0)")
    contributions, out = {}, {}
    for name in reversed(order):
        if name not in tangent:
            continue
        node, code = graph.nodes[name], codes[name]
        if name != last:
            lines.append(f"u_{name} = {_sum(contributions[name])}")
        inputs = node["inputs"]
        input_tangent = f"t_{inputs[0]}" if inputs[0] in tangent else None
        for role, param in node["params"].items():
            if param not in active:
                continue
            terms = [f"self._{name}_{role}_vjp(u_{name}, self.{name}_X)"]
            if second_order and role in code.cross_terms and input_tangent:
                terms.append(cross(f"self._{name}_{role}_vjp(self.{name}_g, {tangent_view(name, node, input_tangent)})"))
            out.setdefault(param, []).extend(terms)
        for i, source in enumerate(inputs):
            if source not in tangent:
                continue
            terms = [code.vjp(f"u_{name}")[i]]
            if second_order and code.residual_product:
                terms.append(code.residual_product(f"t_{source}", mode))
            if second_order and "weight" in code.cross_terms and node["params"]["weight"] in active:
                terms.append(cross(f"self._{name}_vjp(self.{name}_g, v[{node['params']['weight']!r}])"))
            contributions.setdefault(source, []).append(_sum(terms))
    lines += [f"out[{param!r}] = {_sum(terms)}" for param, terms in out.items()]
    return ["out = {}", *lines]


def _parameter_uses(graph, order):
    """{parameter name: [(node, role), ...]} in graph order; a tied parameter has several uses."""
    uses = {}
    for name in order:
        for role, param in graph.nodes[name]["params"].items():
            uses.setdefault(param, []).append((name, role))
    return uses


def _block_product(graph, order, codes, param, method):
    body = ["v = {" + repr(param) + ": v}",
            *_product(graph, order, codes, {param}, "curvature", "self._loss_hessian_product({t})"),
            f"return out[{param!r}]"]
    doc = f"C_θθ v for θ = {param}: the diagonal block of the curvature by the exact recursion, (V, *θ) -> (V, *θ)"
    return [f"def {method}(self, v, curvature):", f'    """{safe_text(doc)}"""', *_indent(body, 1), ""]


_FULL_PRODUCTS = {
    "ggn": ("ggn_vector_product(self, vs)", "G v = Jᵀ (∇²_z L) J v over all parameters (the generalized Gauss-Newton)",
            None, "self._loss_hessian_product({t})"),
    "hessian": ("hessian_vector_product(self, vs)",
                "H v = ∇²L v over all parameters: GGN plus every residual and parameter-input cross term",
                "hessian", "self._loss_hessian_product({t})"),
    "fisher": ("fisher_mc_vector_product(self, vs, samples=1, generator=None)",
               "F v = Jᵀ (1/S Σ_s s sᵀ) J v with s = ∇_z ℓ(z, ŷ_s), labels ŷ_s ~ softmax(z) drawn per call",
               None, "self._loss_fisher_product({t}, samples, generator)"),
}


def _full_product(graph, order, codes, kind):
    signature, doc, second_order, loss_product = _FULL_PRODUCTS[kind]
    active = set(_parameter_uses(graph, order))
    body = ["self._check_ready()", "v, single = as_vectors(vs, PARAMETERS, self.loss_z)",
            *_product(graph, order, codes, active, second_order, loss_product),
            "return from_vectors(out, v, single)"]
    return ["@torch.no_grad()", f"def {signature}:", f'    """{doc}; vs is a list shaped like the parameters,'
            ' optionally with a leading V."""', *_indent(body, 1), ""]


def _pair(a, b, position):
    """The variable holding the cross curvature of tensors a and b, and whether it must be transposed."""
    first, second = sorted((a, b), key=position.__getitem__)
    return f"S_{first}__{second}", first != a


def _accumulate(lines, defined, variable, expression):
    lines.append(f"{variable} = {variable} + {expression}" if variable in defined else f"{variable} = {expression}")
    defined.add(variable)


class _MemoryLedger:
    """Entries the HBP sweep holds at once: live S variables, the S that blocks keep, each step's temporaries.

    ``peak`` is the most at any step of blocks() and ``where`` names that step; the generated ``_check_memory``
    refuses from it before anything is allocated.
    """

    def __init__(self, sizes, last):
        self.sizes, self.live, self.kept = sizes, {f"S_{last}": sizes[last] ** 2}, 0
        self.peak, self.where = self.live[f"S_{last}"], "the loss"

    def entries(self, a, b):
        return self.sizes[a] * self.sizes[b]

    def form(self, variable, entries, temporaries, where):
        """variable is formed (or re-formed as variable + term, holding both sums and the term at once)."""
        total = self.kept + sum(self.live.values()) + entries * (2 if variable in self.live else 1) + temporaries
        if total > self.peak:
            self.peak, self.where = total, where
        self.live[variable] = entries

    def keep(self, variable):
        """Blocks built from variable hold it (or factors of its size) until blocks() returns."""
        self.kept += self.live.pop(variable)

    def free(self, variables):
        for variable in variables:
            self.live.pop(variable, None)


def _input_temporaries(code, i, ledger, name, source):
    """Entries input_curvature[i] allocates besides S and S_source (a node kind without an estimate: a sandwich's)."""
    known = code.curvature_temporaries
    return known[i] if known else sandwich_temporaries(ledger.sizes[source], ledger.sizes[name])


def _sweep_method(graph, order, codes, plan, ledger):
    """HBP over the graph: a backward sweep keeping S for every pair of tensors on the frontier.

    ``ledger`` (a ``_MemoryLedger``) records what each step holds, for blocks()' memory check.
    """
    position = {name: k for k, name in enumerate(order)}
    body = [f"S_{order[-1]} = self._loss_hessian_sum()"]
    defined, frontier = {f"S_{order[-1]}"}, [order[-1]]
    for name in reversed(order):
        if name not in plan.upstream:
            continue
        node, code = graph.nodes[name], codes[name]
        frontier.remove(name)
        if code.blocks:
            body.append(f"visit({name!r}, S_{name})")
            ledger.keep(f"S_{name}")
        active = [(i, source) for i, source in enumerate(node["inputs"]) if source in plan.upstream]
        if not active:
            continue
        body.append(f"S = S_{name}  # at the output of {name}; propagate to its inputs")
        where = f"the inputs of {name}"
        for i, source in active:
            _accumulate(body, defined, f"S_{source}", code.input_curvature[i])
            ledger.form(f"S_{source}", ledger.entries(source, source), _input_temporaries(code, i, ledger, name, source),
                        where)
        for (i, a), (j, b) in ((p, q) for k, p in enumerate(active) for q in active[k + 1:]):
            term = code.cross(i, j)
            if a == b:
                _accumulate(body, defined, f"S_{a}", f"{term} + ({term}).T")
                ledger.form(f"S_{a}", ledger.entries(a, a), 2 * ledger.entries(a, a), where)
            else:
                variable, flip = _pair(a, b, position)
                _accumulate(body, defined, variable, f"({term}).T" if flip else term)
                ledger.form(variable, ledger.entries(a, b), 2 * ledger.entries(a, b), where)
        for other in frontier:
            variable, flip = _pair(name, other, position)
            if variable not in defined:
                continue
            matrix = f"{variable}.T" if flip else variable
            for i, source in active:
                term = code.mean_vjp(i, matrix)  # E[J_i]ᵀ S_(name, other): (d_source, d_other)
                if source == other:
                    _accumulate(body, defined, f"S_{other}", f"{term} + ({term}).T")
                    ledger.form(f"S_{other}", ledger.entries(other, other), 2 * ledger.entries(other, other), where)
                else:
                    target, target_flip = _pair(source, other, position)
                    _accumulate(body, defined, target, f"({term}).T" if target_flip else term)
                    ledger.form(target, ledger.entries(source, other), 2 * ledger.entries(source, other), where)
        frontier += [source for _, source in active if source not in frontier]
        dead = [f"S_{name}"] + [_pair(name, other, position)[0] for other in frontier if other != name]
        body.append("del " + ", ".join(v for v in dead if v in defined))
        defined -= set(dead)
        ledger.free(dead)
    doc = ("S at every node output by the paper's batch-averaged recursion; visit(node, S) at each node with parameters.\n\n"
           "        S_z = Σ_n ∇²_{z_n} L; S_x = E[J]ᵀ S E[J] (average_input_jacobian) or E[Jᵀ S J], plus mode(Σ_n R_n).\n"
           "        Where the graph branches, S is kept for every pair of live tensors (cross terms use E[J]).\n        ")
    return ["def _hbp_sweep(self, curvature, average_input_jacobian, visit):", f'    """{doc}"""', *_indent(body, 1), ""]


def _blocks_method(graph, order, codes):
    """``blocks()``: the sweep, with every node's parameter blocks computed from its S on the way."""
    methods = {name: [(graph.nodes[name]["params"][role], method) for role, method in codes[name].blocks.items()]
               for name in order if codes[name].blocks}
    body = [
        "check_curvature(curvature)", "check_split(split)", "check_flag('average_input_jacobian', average_input_jacobian)",
        "check_flag('average_parameter_jacobian', average_parameter_jacobian)", "self._check_ready()", "self._check_memory()",
        "methods = {  # node: [(parameter, block method)]", *[f"    {name!r}: {entries!r}," for name, entries in methods.items()],
        "}", "blocks = {}", "",
        "def visit(node, S):  # S at the output of node: its parameters' blocks; a tied parameter sums its uses",
        "    for param, method in methods[node]:",
        "        block = getattr(self, method)(S, average_parameter_jacobian)",
        "        blocks[param] = SumBlock([blocks[param], block]) if param in blocks else block", "",
        "self._hbp_sweep(curvature, average_input_jacobian, visit)",
        "return {name: split_block(blocks.get(name) or OperatorBlock(torch.zeros_like, shape, self.loss_z), split)",
        "        for name, shape in PARAMETERS.items()}  # a parameter the loss ignores: 0",
    ]
    doc = ("HBP blocks (the paper's batch-averaged recursion) keyed by parameter name.\n\n"
           "        S as in _hbp_sweep; B_θ = E[J_θ]ᵀ S E[J_θ] (average_parameter_jacobian) or E[J_θᵀ S J_θ] with S at the\n"
           "        output of θ's node. split > 1 keeps the diagonal sub-blocks over torch.chunk(θ, split, 0) (SplitBlock).\n        ")
    return ["@torch.no_grad()",
            "def blocks(self, curvature=\"ggn\", average_input_jacobian=True, average_parameter_jacobian=True, split=1):",
            f'    """{doc}"""', *_indent(body, 1), ""]


def emit(graph, plan, source_name: str, digest: str) -> str:
    graph, plan = with_stems(graph, plan)  # node names as the identifiers' stems: no name can collide
    order = graph.graph["order"]
    plans = {p.name: p for p in plan.nodes}
    codes = {name: node_code(name, graph.nodes[name], _input_vars(graph, name), plans[name]) for name in order}
    last = order[-1]
    loss_lines, loss_methods = _loss_lines(graph, last)
    uses = _parameter_uses(graph, order)
    factors = factor_nodes(graph, order, uses)
    ledger = _MemoryLedger({name: prod(graph.nodes[name]["y_shape"]) for name in order}, last)
    sweep = _sweep_method(graph, order, codes, plan, ledger)
    classes = prod(graph.nodes[last]["y_shape"])
    batch_entries = " + ".join([f"5 * self.N * {classes * classes}",  # the loss Hessian's basis and its products
                                *(e for name in order for e in codes[name].block_factor_entries)])
    buffers = sorted({b for n in order for b in graph.nodes[n].get("buffers", {}).values()})
    eval_mode_modules = sorted({graph.nodes[n].get("buffers", {}).get("running_mean", "*").rpartition(".")[0]
                                or "*" for n in order if graph.nodes[n]["op"] == "batch_norm"}
                               | {graph.nodes[n]["hyper"]["dropout"] for n in order if "dropout" in graph.nodes[n]["hyper"]})
    params = graph.graph["architecture"]  # model order; parameters the loss ignores have zero curvature
    forward = [line for name in order for line in codes[name].forward]
    rule = graph.graph["loss_rule"]
    if rule.target == "class":  # probabilities (soft labels) only for cross-entropy, whose Hessian ignores them
        probabilities = "softmax" in derive(rule).intermediates and rule.key == "cross_entropy"
        check_target = f"target = check_class_target(target, N, {classes}, {probabilities}, x.device)"
        target_doc = f"class labels (N,) in [0, {classes})" + (
            f" or class probabilities (N, {classes}), rows summing to 1" if probabilities else "")
    else:
        check_target = f"target = check_dense_target(target, N, {graph.nodes[last]['y_shape']!r}, x.device)"
        target_doc = f"shaped like the output, (N, {_shape_args(graph.nodes[last]['y_shape'])})"
    fb_body = [
        "check_eval_mode(self.model, EVAL_MODE_MODULES)",
        "params, buffers = bind(self.model, ARCHITECTURE, BUFFERS)  # the model's current tensors",
        "check_input(x, INPUT_SHAPE, next(iter(params.values()), None))",
        "N, inputs = x.shape[0], [('x', x), ('target', target)]", check_target,
        "self.p, self.buffers, self.N = params, buffers, N",
        "self._ready = False  # a failure below leaves no half-updated cache in use",
        "with torch.no_grad():",
        *_indent(["# forward", *forward, "# loss", *loss_lines, "# backward", *_backward(graph, order, codes, plan)], 1),
        "self._state = tensor_state(self.model, inputs)", "self._ready = True", "return loss",
    ]
    methods = {param: f"_block_product_{name}_{role}" for param, ((name, role), *_) in uses.items()}
    products = [line for param, method in methods.items() for line in _block_product(graph, order, codes, param, method)]
    product_map = ", ".join(f"{param!r}: self.{methods[param]}" if param in methods else f"{param!r}: zero_product"
                            for param in params)
    graph_doc = "\n".join(f"    a_{n} = {safe_text(graph.nodes[n]['op'])}({', '.join(_input_vars(graph, n))})    "
                          f"# {' '.join(map(str, graph.nodes[n]['x_shapes']))} -> {graph.nodes[n]['y_shape']}"
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
    cls = [
        f"PARAMETERS = {{{', '.join(f'{k!r}: {v!r}' for k, v in params.items())}}}  # the ones the loss depends on",
        f"ARCHITECTURE = {{{', '.join(f'{k!r}: {v!r}' for k, v in graph.graph['architecture'].items())}}}",
        f"INPUT_SHAPE = {graph.graph['input_shape']!r}",
        f"BUFFERS = {tuple(buffers)!r}",
        f"EVAL_MODE_MODULES = {tuple(eval_mode_modules)!r}  # Dropout/BatchNorm compiled as eval maps; '*': F.dropout",
        f"GRAPH_HASH = {digest!r}",
        "",
        "",
        "class Curvature:",
        f'    """Curvature of {loss} for {model}: HBP blocks and exact products."""',
        "",
        f"    memory_limit = 2 * 1024**3  # bytes blocks() may allocate: curvature matrices, kept or temporary",
        f"    factored_parameters = {tuple(p for params in factors.values() for p in params.values())!r}"
        "  # kronecker_factors() keys",
        "",
        *_indent([
            "def __init__(self, model):",
            '    """Bind to a model of the compiled architecture; names and shapes must match.',
            "",
            "    forward_backward re-reads the model's parameters and buffers, so replacing one on the model is picked up.",
            '    """',
            "    self.model = check_model(model)",
            "    self.p, self.buffers = bind(model, ARCHITECTURE, BUFFERS)",
            "    self._ready = False",
            "",
            "def _check_ready(self):",
            "    if not self._ready:",
            "        raise RuntimeError(\"call forward_backward(x, target) before asking for curvature\")",
            "    check_state(self._state)",
            "",
            "def check_current(self):",
            '    """Raise RuntimeError unless forward_backward ran and no parameter, buffer, x or target changed since."""',
            "    self._check_ready()",
            "",
            "def blocks_memory(self):",
            '    """Bytes blocks() holds at most at once (S matrices, what its blocks keep, each step\'s temporaries)."""',
            "    self._check_ready()",
            f"    return ({ledger.peak} + {batch_entries}) * self.loss_z.element_size()",
            "",
            "def _check_memory(self):",
            '    """Refuse blocks() before it allocates anything."""',
            "    needed = self.blocks_memory()",
            "    if needed > self.memory_limit:",
            "        raise MemoryError(",
            f"            f\"blocks() needs {{needed / 2**30:.2f}} GiB for the curvature at {ledger.where}, more than \"",
            "            f\"memory_limit ({self.memory_limit / 2**30:.2f} GiB); use block_products() or raise memory_limit\"",
            "        )",
            "",
            "def forward_backward(self, x, target):",
            '    """L = scale · Σ_n ℓ(z_n, t_n); fills p.grad like L.backward() and caches what curvature needs.',
            "",
            f"    x: (N, {_shape_args(graph.graph['input_shape'])}) in the parameters' dtype; target: {target_doc}.",
            '    """',
            *_indent(fb_body, 1), "",
            *sweep,
            *_blocks_method(graph, order, codes),
            "def block_products(self, curvature=\"ggn\", split=1):",
            '    """Exact diagonal-block products keyed by parameter name: v (θ or (V, *θ)) -> C_θθ v.',
            "",
            "    split > 1 keeps the diagonal sub-blocks over torch.chunk(θ, split, 0) (SplitProduct, with .parts).",
            '    """',
            "    check_curvature(curvature)",
            "    check_split(split)",
            "    self._check_ready()",
            f"    products = {{{product_map}}}",
            "    return {",
            "        name: split_product(lambda v, f=f: f(v, curvature), PARAMETERS[name], split, self.loss_z, self._check_ready)",
            "        for name, f in products.items()",
            "    }",
            "",
            *kronecker_factors_method(graph, factors),
            *root_backward_method(graph, order, codes, factors),
            *products,
            *_full_product(graph, order, codes, "ggn"),
            *_full_product(graph, order, codes, "hessian"),
            *(_full_product(graph, order, codes, "fisher") if "softmax" in derive(graph.graph["loss_rule"]).intermediates
              else []),
            *loss_methods,
            *[line for name in order for line in codes[name].methods
              + (factor_methods(name, graph.nodes[name]) if name in factors else [])],
        ], 1),
    ]
    prelude = PRELUDE.replace("import torch\n", "", 1).strip()
    if any("patches_nd" in line or "transposed_patches" in line for line in cls):  # 3D conv / pool, conv_transpose
        prelude += "\n\n\n" + PRELUDE_ND.strip()
    if any("conv_apply(" in line for line in cls):  # convolutions lowered to torch's kernels
        prelude += "\n\n\n" + PRELUDE_CONV.strip()
    if any("grouped_matrices(" in line for line in cls):  # a normalization
        prelude += "\n\n\n" + PRELUDE_NORM.strip()
    text = "\n".join([*header, "import torch", "", prelude, "", "", *cls])
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"
