"""Names and text in generated code: every identifier made from an IR node name, and user text made safe.

Generated code names what belongs to a node after the node's *stem* ``s``:

==========  ==================================================================================
locals      ``a_s``, ``g_s``, ``t_s``, ``u_s``, ``S_s`` (activation, gradient, tangent, cotangent,
            curvature) and ``S_s__o`` (the cross curvature of nodes ``s`` and ``o``)
attributes  ``self.s_<suffix>``: tensors ``forward_backward`` caches (``X``, ``g``, ``d1``, ...)
methods     ``self._s_<suffix>`` (the node's derivatives) and ``self._block_product_s_<role>``
==========  ==================================================================================

Methods a *family* of nodes shares (same rule, same derived code) are ``self._f_<suffix>`` for the family's
name ``f``: the rule's key made a fragment, never one whose identifiers meet a node's (``family_names``).

Stems are the IR names where that is safe, so generated code reads like the model. ``node_stems``
mangles a name only where it is not a plain identifier fragment or where one of its identifiers
would equal another node's or one of ``Curvature``'s own members (``lin`` and ``lin_weight``
would both define ``_lin_weight_vjp``). The map is deterministic and injective: stems are unique,
use ASCII letters, digits and single inner underscores (so ``S_s__o`` reads back as one pair),
and never start with a digit. The model input is ``x``; no stem is ``x``.

User text (class and file names, rule keys and formulas) reaches docstrings, comments and string
literals only through ``safe_text``.
"""
import re

import networkx as nx

from hbpc import ir
from hbpc.ir import INPUT  # the model input in the IR's inputs and in generated code
from hbpc.rules.spec import Normalization
from hbpc.runtime import CurvatureModule

LOCAL_PREFIXES = ("a", "g", "t", "u", "S")
ROLES = ("weight", "bias")

# Suffixes of a node's attributes (self.s_<suffix>) and methods (self._s_<suffix>), as nodes.py,
# normalization.py and kronecker.py emit them; normalization statistics and cat's vjp<i> are added per graph.
SUFFIXES = (
    "X", "x", "y", "g", "d1", "r", "idx", "modes", "A", "B", "J", "mask", "residual_modes", "residual_products",
    "jvp", "vjp", "view", "tangent_view", "statistics", "residual", "residuals", "jacobians", "residual_product",
    "input_curvature", "mean_vjp", "cross",
    *(f"{role}_{kind}" for role in ROLES for kind in ("jvp", "vjp", "block")),
)

# Curvature's own attributes and methods (besides the loss's intermediates, self.loss_<name>): what the generated
# class defines and sets, and everything it inherits from hbpc.runtime.CurvatureModule.
MEMBERS = frozenset({
    "p", "buffers", "N", "_state", "loss_scale", "loss_z", "loss_t", "forward_backward", "_hbp_sweep",
    "_loss_hessian_product", "_loss_sampled_gradients", *vars(CurvatureModule), "model", "_ready", "RUNTIME_FORMAT",
})


def _fragment(name: str) -> str:
    """``name`` as ASCII letters, digits and single inner underscores, never starting with a digit."""
    base = re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") or "node"
    return f"n{base}" if base[0].isdigit() else base


def identifiers(stem: str, suffixes) -> set:
    """Every (namespace, identifier) generated code gives the node with this stem."""
    return ({("local", f"{prefix}_{stem}") for prefix in LOCAL_PREFIXES}
            | {("member", f"{stem}_{suffix}") for suffix in suffixes}
            | {("member", f"_{stem}_{suffix}") for suffix in suffixes}
            | {("member", f"_block_product_{stem}_{role}") for role in ROLES})


def graph_suffixes(graph) -> tuple:
    """SUFFIXES plus what this graph's nodes add: normalization statistics and ``vjp<i>`` (``jvp<i>``, ``residual<i>``)
    per input of a multi-input node."""
    extra = set()
    for name in graph.graph["order"]:
        node = ir.node(graph, name)
        extra |= ({f"{kind}{i}" for i in range(len(node.inputs)) for kind in ("vjp", "jvp", "residual")}
                  if len(node.inputs) > 1 else set())
        if isinstance(node.rule, Normalization):
            extra |= set(node.derived.reads)
    return SUFFIXES + tuple(sorted(extra))


def reserved(graph) -> set:
    """(namespace, identifier) pairs that are not any node's: Curvature's members, the loss's cached intermediates."""
    members = MEMBERS | {f"loss_{name}" for name in graph.graph["loss_derived"].intermediates}
    return {("member", name) for name in members}


def node_stems(graph) -> dict:
    """{IR name: stem}, in graph order: the name itself where safe, else ``<fragment>_<k>`` for the first free k."""
    suffixes = graph_suffixes(graph)
    taken, stems = set(reserved(graph)), {}
    for name in graph.graph["order"]:
        stems[name] = _claim(_fragment(name), taken, suffixes)
    return stems


def _claim(base: str, taken: set, suffixes) -> str:
    """``base``, or ``<base>_<k>`` for the first k whose identifiers are all free; adds them to ``taken``."""
    candidate, count = base, 1
    while candidate == INPUT or taken & identifiers(candidate, suffixes):
        count += 1
        candidate = f"{base}_{count}"
    taken |= identifiers(candidate, suffixes)
    return candidate


def family_names(graph, keys) -> dict:
    """{family key: name} for ``keys``, (rule key, family key) pairs in graph order, on a graph already renamed to its
    stems: the rule key as a fragment where free, else ``<fragment>_<k>``, never meeting any node's identifiers."""
    suffixes = graph_suffixes(graph)
    taken = set(reserved(graph))
    for name in graph.graph["order"]:
        taken |= identifiers(name, suffixes)
    names = {}
    for rule_key, key in keys:
        if key not in names:
            names[key] = _claim(_fragment(rule_key), taken, suffixes)
    return names


def with_stems(graph, plan):
    """Copies of the IR graph and its plan with every node renamed to its stem (the input stays ``x``)."""
    stems = node_stems(graph)
    renamed = nx.relabel_nodes(graph, stems, copy=True)
    for name in renamed.nodes:
        node = ir.node(renamed, name)
        ir.update(renamed, name, name=name, inputs=tuple(stems.get(i, i) for i in node.inputs))
    renamed.graph["order"] = [stems[name] for name in graph.graph["order"]]
    return renamed, plan.renamed(stems)


def _escape(character: str) -> str:
    if character in '\\"':
        return "\\" + character
    return character if character.isprintable() else repr(character)[1:-1]


def safe_text(text) -> str:
    """``text`` for a docstring, comment or ``"..."`` literal of generated code, read back unchanged from a literal.

    Backslashes and double quotes are escaped, characters that are not printable (newlines, carriage returns,
    line and paragraph separators, control and format characters) written as escapes, so no user text can end
    a string or comment or start a line of code.
    """
    return "".join(map(_escape, str(text)))
