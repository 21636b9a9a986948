"""``hbpc`` command line: compile, rules, graph. Errors exit with status 2 and one clear message."""
import argparse
import sys

import sympy as sp

from hbpc.errors import HbpcError


def _compile(args):
    from hbpc.compiler import compile_source, write_atomically
    from hbpc.export import load_model_file, load_rules_file

    rules = load_rules_file(args.rules) if args.rules else []
    spec = load_model_file(args.model)
    name = spec.path.rsplit("/", 1)[-1]
    text = compile_source(spec.model, spec.example_input, spec.loss_fn, args.loss, source_name=name, rules=rules)
    write_atomically(args.output, text)
    print(f"wrote {args.output}")


def _graph(args):
    from hbpc.export import export, load_model_file

    spec = load_model_file(args.model)
    graph = export(spec.model, spec.example_input, spec.loss_fn, args.loss)
    rows = [("node", "op", "input", "output", "parameters", "source")]
    for name in graph.graph["order"]:
        node = graph.nodes[name]
        rows.append((name, node["op"], str(node["x_shape"]), str(node["y_shape"]),
                     ", ".join(node["params"].values()) or "-", node["source"].rsplit("/", 1)[-1]))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"loss: {graph.graph['loss']} ({graph.graph['reduction']})")


def _show(expr, latex):
    return sp.latex(expr) if latex else sp.pretty(expr, use_unicode=True)


def describe_rule(rule, latex=False) -> str:
    """Forward expression, derived derivatives and emitted torch code of one rule."""
    from hbpc.derive import derive
    from hbpc.rules.spec import Elementwise, Loss, Selection, Structured

    derivation = derive(rule)
    lines = [f"{rule.key}  ({type(rule).__name__.lower()})"]
    if isinstance(rule, Elementwise):
        code = derivation.code(rule.hyper)
        defaults = f"   defaults: {rule.hyper}" if rule.hyper else ""
        lines += [f"forward   y = {_show(rule.phi, latex)}   (torch: {rule.forward}){defaults}",
                  f"φ′        {_show(derivation.d1, latex)}", f"φ″        {_show(derivation.d2, latex)}",
                  f"code φ′   {code['d1']}", f"code φ″   {code['d2']}"]
    elif isinstance(rule, Structured):
        out = ", ".join(map(str, rule.out))
        lines.append(f"forward   Y[{out}] = {_show(rule.expr, latex)}   (input seen as {rule.input_view})")
        for name, tensor in derivation.tensors.items():
            lines += [f"∂Y/∂{name}    {_show(tensor.jacobian, latex)}",
                      f"  J v     torch.einsum(\"{tensor.jvp.spec}\", {', '.join(tensor.jvp.operands)})"
                      + (f" * {tensor.jvp.coeff}" if tensor.jvp.coeff != 1 else ""),
                      f"  Jᵀ u    torch.einsum(\"{tensor.vjp.spec}\", {', '.join(tensor.vjp.operands)})"
                      + (f" * {tensor.vjp.coeff}" if tensor.vjp.coeff != 1 else ""),
                      f"  linear: {tensor.linear} (∂²Y/∂{name}² = 0)   sample-dependent Jacobian: {tensor.sample_dependent}"]
            if tensor.block is not None:
                lines.append(f"  HBP block: {tensor.block.kind}")
    elif isinstance(rule, Loss):
        shared, code = derivation.code()
        lines += [f"ℓ(z, t)   {_show(rule.ell, latex)}", f"∂ℓ/∂z     {_show(derivation.grad, latex)}",
                  f"∇²ℓ v     {_show(derivation.hessian_product, latex)}",
                  *(f"code      {name} = {value}" for name, value in derivation.intermediates.items()),
                  *(f"code      {line}" for line in shared),
                  f"code ℓ    {code['value']}", f"code ∂ℓ   {code['grad']}", f"code ∇²ℓv {code['hvp']}"]
    elif isinstance(rule, Selection):
        lines += [f"forward   {rule.forward}",
                  f"Jacobian  the structural primitive {rule.primitive!r}: {rule.primitive}_jvp / {rule.primitive}_vjp"]
    return "\n".join(lines)


def _rules(args):
    from hbpc.rules import LOSS_TABLE, OPS, TABLE

    if args.name is None:
        for rule in [*OPS, *{id(r): r for r in LOSS_TABLE.values()}.values()]:
            aliases = f"  (also: {', '.join(rule.aliases)})" if rule.aliases else ""
            print(f"{rule.key:<16}{type(rule).__name__.lower():<13}{aliases}")
        return
    rule = TABLE.get(args.name) or LOSS_TABLE.get(args.name)
    if rule is None:
        names = ", ".join(sorted({r.key for r in [*TABLE.values(), *LOSS_TABLE.values()]}))
        raise HbpcError(f"no rule named '{args.name}'", "hbpc rules NAME", f"use one of: {names}")
    print(describe_rule(rule, args.latex))


def parser():
    top = argparse.ArgumentParser(prog="hbpc", description="Compile PyTorch models into curvature code.")
    commands = top.add_subparsers(dest="command", required=True)
    comp = commands.add_parser("compile", help="compile model.py into a curvature module")
    comp.add_argument("model")
    comp.add_argument("-o", "--output", required=True)
    comp.add_argument("--loss", help="override loss_fn: cross_entropy or mse, optionally ':sum' (e.g. mse:sum)")
    comp.add_argument("--rules", help="a Python file with extra rules (see README: 'Adding an activation')")
    comp.set_defaults(run=_compile)
    rules = commands.add_parser("rules", help="list the rule table, or show one rule's derivation")
    rules.add_argument("name", nargs="?")
    rules.add_argument("--latex", action="store_true")
    rules.set_defaults(run=_rules)
    graph = commands.add_parser("graph", help="print the IR of model.py as a table")
    graph.add_argument("model")
    graph.add_argument("--loss")
    graph.set_defaults(run=_graph)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except HbpcError as error:
        print(f"hbpc: error: {error}", file=sys.stderr)
        return 2
    return 0


def run():
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
