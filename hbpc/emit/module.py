"""Assemble the generated ``curv_model.py`` from node code, the loss derivation and the plan."""
from math import prod
from pathlib import Path

import sympy as sp

from hbpc import __version__
from hbpc.derive import derive
from hbpc.derive.printer import torch_code

from .nodes import node_code, param_code

PRELUDE = (Path(__file__).with_name("prelude.py")).read_text()
_INDENT = "    "


def _indent(lines, depth):
    return [(_INDENT * depth + line) if line else "" for line in lines]


def _loss_lines(graph, last):
    rule = graph.graph["loss_rule"]
    derivation = derive(rule)
    N, C = sp.symbols("N C", positive=True, integer=True)
    scale = torch_code(sp.nsimplify(rule.scale[graph.graph["reduction"]](N, C)))
    shared, exprs = derivation.code()
    classes = prod(graph.nodes[last]["y_shape"])
    target = (f"torch.nn.functional.one_hot(target, {classes}).to(z.dtype)" if rule.target == "class"
              else "target.reshape(N, -1).to(z.dtype)")
    lines = [f"z = a_{last}.reshape(N, -1)", f"C = {classes}", f"t = {target}"]
    lines += [f"{name} = {code}" for name, code in derivation.intermediates.items()]
    lines += shared
    lines += [f"scale = {scale}", f"loss = scale * ({exprs['value']}).sum()",
              f"g_{last} = (scale * ({exprs['grad']})).reshape(N, *{graph.nodes[last]['y_shape']!r})",
              "self.loss_scale, self.loss_z, self.loss_t = scale, z, t"]
    lines += [f"self.loss_{name} = {name}" for name in derivation.intermediates]
    restore = ["z, t, scale = self.loss_z, self.loss_t, self.loss_scale"]
    restore += [f"{name} = self.loss_{name}" for name in derivation.intermediates]
    hvp = restore + shared + [f"return scale * ({exprs['hvp']})"]
    doc = f"ℓ(z, t) = {rule.ell};  Hv = {derivation.hessian_product}"
    if "softmax" in derivation.intermediates:  # a softmax likelihood: the Fisher can be sampled
        fisher = [
            *restore,
            "labels = torch.multinomial(softmax, samples, replacement=True, generator=generator)  # (N, S)",
            f"s = softmax[:, None, :] - torch.nn.functional.one_hot(labels, {classes}).to(z.dtype)  # ∇_z ℓ(z, ŷ)",
            "return scale / samples * torch.einsum('nsc,...ns->...nc', s, torch.einsum('nsc,...nc->...ns', s, v))",
        ]
        fisher_method = ["def _loss_fisher_product(self, v, samples, generator):",
                         '    """(1/S) Σ_s s sᵀ v per sample with sampled labels: an unbiased estimate of ∇²_z L v."""',
                         *_indent(fisher, 1), ""]
    else:
        fisher_method = []
    methods = [
        "def _loss_hessian_product(self, v):",
        f'    """(∇²_z L) v per sample, v (V, N, C): {doc}"""', *_indent(hvp, 1), "",
        "def _loss_hessian_sum(self):",
        '    """S_z = Σ_n ∇²_{z_n} L: (C, C)."""',
        f"    eye = torch.eye({classes}, dtype=self.loss_z.dtype, device=self.loss_z.device)",
        f"    return self._loss_hessian_product(eye[:, None, :].expand({classes}, self.N, {classes})).sum(1)", "",
        *fisher_method,
    ]
    return lines, methods


def _block_product(graph, order, index, role, codes):
    """Straight-line code for one exact diagonal-block product."""
    name = order[index]
    param = graph.nodes[name]["params"][role]
    downstream = order[index + 1:]
    body = [f"t_{name} = self._{name}_{role}_jvp(v, self.{name}_X)"]
    previous = name
    for node in downstream:
        body.append(f"t_{node} = self._{node}_jvp(t_{previous})")
        previous = node
    body.append(f"u_{previous} = self._loss_hessian_product(t_{previous})")
    for node in reversed(downstream):
        before = order[order.index(node) - 1]
        line = f"u_{before} = self._{node}_vjp(u_{node})"
        if codes[node].residual:
            line += f" + residual_product({codes[node].residual}, t_{before}, curvature)"
        body.append(line)
    body.append(f"return self._{name}_{role}_vjp(u_{name}, self.{name}_X)")
    doc = f"C_θθ v for θ = {param}: J_θᵀ H J_θ v with H by the exact backward recursion (V, *θ) -> (V, *θ)"
    return [f"def _block_product_{name}_{role}(self, v, curvature):", f'    """{doc}"""', *_indent(body, 1), ""]


def _sum(terms):
    return " + ".join(terms)


_FULL_PRODUCTS = {
    "ggn": ("ggn_vector_product(self, vs)", "G v = Jᵀ (∇²_z L) J v over all parameters (the generalized Gauss-Newton)",
            "self._loss_hessian_product({t})"),
    "hessian": ("hessian_vector_product(self, vs)",
                "H v = ∇²L v over all parameters: GGN plus every residual and parameter-input cross term",
                "self._loss_hessian_product({t})"),
    "fisher": ("fisher_mc_vector_product(self, vs, samples=1, generator=None)",
               "F v = Jᵀ (1/S Σ_s s sᵀ) J v with s = ∇_z ℓ(z, ŷ_s), labels ŷ_s ~ softmax(z) drawn per call",
               "self._loss_fisher_product({t}, samples, generator)"),
}


def _full_product(graph, order, codes, kind):
    """Straight-line code for a full-network product, reusing the linearization of forward_backward.

    Forward: t_out = J_x t_in + Σ_θ J_θ v_θ. Backward: u_in = J_xᵀ u_out (+ second-order terms for the Hessian:
    R t_in at nonlinear nodes, J_xᵀ(g; W ← v_W) and J_θᵀ(g; X ← t_in) where ∂²Y/∂X∂θ ≠ 0).
    """
    signature, doc, loss_product = _FULL_PRODUCTS[kind]
    second_order = kind == "hessian"
    body = ["self._check_ready()", "v, single = as_vectors(vs, PARAMETERS)"]
    tangent = {}
    previous = None
    for name in order:
        node = graph.nodes[name]
        terms = [f"self._{name}_jvp({previous})"] if previous else []
        terms += [f"self._{name}_{role}_jvp(v[{param!r}], self.{name}_X)" for role, param in node["params"].items()]
        if terms:
            body.append(f"t_{name} = {_sum(terms)}")
            tangent[name] = f"t_{name}"
            previous = f"t_{name}"
    last = order[-1]
    body.append(f"u_{last} = {loss_product.format(t=f't_{last}')}")
    body.append("out = {}")
    for index in range(len(order) - 1, -1, -1):
        name, node = order[index], graph.nodes[order[index]]
        before = tangent.get(order[index - 1]) if index > 0 else None
        for role, param in node["params"].items():
            terms = [f"self._{name}_{role}_vjp(u_{name}, self.{name}_X)"]
            if second_order and role in codes[name].cross_terms and before:
                terms.append(f"self._{name}_{role}_vjp(self.{name}_g, self._{name}_view({before}))")
            body.append(f"out[{param!r}] = {_sum(terms)}")
        if before is None:
            break
        terms = [f"self._{name}_vjp(u_{name})"]
        if second_order and codes[name].residual:
            terms.append(f"residual_product({codes[name].residual}, {before}, 'hessian')")
        if second_order and "weight" in codes[name].cross_terms:
            terms.append(f"self._{name}_vjp(self.{name}_g, v[{node['params']['weight']!r}])")
        body.append(f"u_{order[index - 1]} = {_sum(terms)}")
    body.append("return from_vectors(out, PARAMETERS, single)")
    return ["@torch.no_grad()", f"def {signature}:", f'    """{doc}; vs is a list shaped like the parameters,'
            ' optionally with a leading V."""', *_indent(body, 1), ""]


def _blocks_method(graph, order, codes, plan):
    first = next(i for i, n in enumerate(order) if graph.nodes[n]["params"])
    body = ["check_curvature(curvature)", "self._check_ready()", "self._check_memory()",
            "blocks = {}", "S = self._loss_hessian_sum()"]
    for index in range(len(order) - 1, first - 1, -1):
        name = order[index]
        node = graph.nodes[name]
        for role, method in codes[name].blocks.items():
            body.append(f"blocks[{node['params'][role]!r}] = self.{method}(S, average_parameter_jacobian)")
        if index > first:
            if codes[name].input_curvature is None:
                raise NotImplementedError(f"no HBP input curvature for {name}")
            body.append(f"S = {codes[name].input_curvature}  # S at the input of {name}")
    body.append("return {name: blocks[name] for name in PARAMETERS}")
    doc = ("HBP blocks (the paper's batch-averaged recursion) keyed by parameter name.\n\n"
           "        S_z = Σ_n ∇²_{z_n} L; S_x = E[J]ᵀ S E[J] (average_input_jacobian) or E[Jᵀ S J], plus mode(Σ_n R_n);\n"
           "        B_θ = E[J_θ]ᵀ S E[J_θ] (average_parameter_jacobian) or E[J_θᵀ S J_θ].\n        ")
    return ["@torch.no_grad()",
            "def blocks(self, curvature=\"ggn\", average_input_jacobian=True, average_parameter_jacobian=True):",
            f'    """{doc}"""', *_indent(body, 1), ""]


def emit(graph, plan, source_name: str, digest: str) -> str:
    order = graph.graph["order"]
    plans = {p.name: p for p in plan.nodes}
    codes, inputs = {}, {}
    previous = "x"
    for name in order:
        inputs[name] = previous
        codes[name] = node_code(name, graph.nodes[name], previous, plans[name])
        previous = f"a_{name}"
    last = order[-1]
    loss_lines, loss_methods = _loss_lines(graph, last)

    params = {graph.nodes[n]["params"][r]: graph.nodes[n]["param_shapes"][r]
              for n in order for r in graph.nodes[n]["params"]}
    forward = [line for name in order for line in codes[name].forward]
    backward = []
    for name in reversed(order):
        backward += codes[name].backward
        if plans[name].needs_input_grad:
            backward.append(codes[name].input_grad)
    fb_body = [
        "self._check_input(x)", "N = self.N = x.shape[0]", "with torch.no_grad():",
        *_indent(["# forward", *forward, "# loss", *loss_lines, "# backward", *backward], 1),
        "self._ready = True", "return loss",
    ]
    products = []
    for index, name in enumerate(order):
        for role in graph.nodes[name]["params"]:
            products += _block_product(graph, order, index, role, codes)
    product_map = ", ".join(f"{graph.nodes[n]['params'][r]!r}: self._block_product_{n}_{r}"
                            for n in order for r in graph.nodes[n]["params"])

    graph_doc = "\n".join(f"    a_{n} = {graph.nodes[n]['op']}({inputs[n]})    "
                          f"# {graph.nodes[n]['x_shape']} -> {graph.nodes[n]['y_shape']}" for n in order)
    loss = f"{graph.graph['loss']} ({graph.graph['reduction']})"
    header = [
        f"# Generated by hbpc {__version__} from {source_name}. Do not edit: recompile instead.",
        f"# hbpc-version: {__version__}",
        f"# graph-hash: {digest}",
        '"""Curvature code for ' + graph.graph["model"] + ".",
        "",
        "Graph (per-sample shapes):",
        graph_doc,
        f"Loss: {loss}.",
        "",
        "See hbpc's docs/curvature.md for the definitions of every quantity.",
        '"""',
    ]
    cls = [
        f"PARAMETERS = {{{', '.join(f'{k!r}: {v!r}' for k, v in params.items())}}}",
        f"INPUT_SHAPE = {graph.graph['input_shape']!r}",
        f"GRAPH_HASH = {digest!r}",
        "",
        "",
        "class Curvature:",
        f'    """Curvature of {loss} for {graph.graph["model"]}: HBP blocks and exact products."""',
        "",
        f"    memory_limit = 2 * 1024**3  # bytes blocks() may use for one per-sample curvature matrix",
        "",
        *_indent([
            "def __init__(self, model):",
            '    """Bind to a model of the compiled architecture; names and shapes must match."""',
            "    found = {name: tuple(p.shape) for name, p in model.named_parameters()}",
            "    if found != PARAMETERS:",
            "        missing = sorted(set(PARAMETERS) - set(found))",
            "        extra = sorted(set(found) - set(PARAMETERS))",
            "        wrong = sorted(n for n in set(found) & set(PARAMETERS) if found[n] != PARAMETERS[n])",
            "        raise ValueError(",
            "            f\"model does not match the compiled architecture: missing {missing}, unexpected {extra}, \"",
            "            f\"wrong shape {[(n, found[n], PARAMETERS[n]) for n in wrong]}; recompile with hbpc\"",
            "        )",
            "    self.model = model",
            "    self.p = dict(model.named_parameters())",
            "    self._ready = False",
            "",
            "def _check_input(self, x):",
            "    if tuple(x.shape[1:]) != INPUT_SHAPE:",
            "        raise ValueError(f\"input has per-sample shape {tuple(x.shape[1:])}, expected {INPUT_SHAPE}\")",
            "    dtype = next(iter(self.p.values())).dtype",
            "    if x.dtype != dtype:",
            "        raise ValueError(f\"input dtype {x.dtype} differs from the parameters' {dtype}\")",
            "    if not torch.isfinite(x).all():",
            "        raise ValueError(\"input contains NaN or Inf\")",
            "",
            "def _check_ready(self):",
            "    if not self._ready:",
            "        raise RuntimeError(\"call forward_backward(x, target) before asking for curvature\")",
            "",
            "def _check_memory(self):",
            f"    needed = {plan.hbp_entries} * next(iter(self.p.values())).element_size()",
            "    if needed > self.memory_limit:",
            "        raise MemoryError(",
            f"            f\"blocks() needs {{needed / 2**30:.2f}} GiB for the curvature at {plan.hbp_largest}, more than \"",
            "            f\"memory_limit ({self.memory_limit / 2**30:.2f} GiB); use block_products() or raise memory_limit\"",
            "        )",
            "",
            "def forward_backward(self, x, target):",
            '    """L = scale · Σ_n ℓ(z_n, t_n); fills p.grad like L.backward() and caches what curvature needs."""',
            *_indent(fb_body, 1), "",
            *_blocks_method(graph, order, codes, plan),
            "def block_products(self, curvature=\"ggn\"):",
            '    """Exact diagonal-block products keyed by parameter name: v (θ or (V, *θ)) -> C_θθ v."""',
            "    check_curvature(curvature)",
            "    self._check_ready()",
            f"    products = {{{product_map}}}",
            "    return {",
            "        name: with_vectors(lambda v, f=f: f(v, curvature), PARAMETERS[name]) for name, f in products.items()",
            "    }",
            "",
            *products,
            *_full_product(graph, order, codes, "ggn"),
            *_full_product(graph, order, codes, "hessian"),
            *(_full_product(graph, order, codes, "fisher") if "softmax" in derive(graph.graph["loss_rule"]).intermediates
              else []),
            *loss_methods,
            *[line for name in order for line in codes[name].methods],
        ], 1),
    ]
    prelude = PRELUDE.replace("import torch\n", "", 1).strip()
    text = "\n".join([*header, "import torch", "", prelude, "", "", *cls])
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"
