"""The IR: a ``networkx.DiGraph`` whose nodes each carry one frozen ``Node`` and whose edges carry the ``Tensor``
passed from one node to an input slot of the next.

Shapes are per sample (no batch axis): ``x_shapes[i]`` the tensor at input slot ``i``, ``y_shape`` the output,
``param_shapes[role]`` as in ``model.named_parameters()``. ``inputs[i]`` names the node producing input ``i``, or
``"x"`` for the model input (no edge). Each stage adds its layer to a node with ``dataclasses.replace``:
export fills the fields up to ``fx_name``, ``hbpc.derive.annotate`` sets ``derived`` (the rule's derivation,
printed), emit sets ``plan`` (the node's ``hbpc.plan.NodePlan``) on its copy of the graph.

``graph.graph`` holds ``order`` (node names, inputs first), ``input_shape``, ``loss``, ``loss_rule``,
``loss_hyper``, ``reduction``, ``architecture`` ({parameter: shape}), ``model`` and, once derived,
``loss_derived``.
"""
from dataclasses import dataclass, field, replace

INPUT = "x"  # the model input, in Node.inputs


@dataclass(frozen=True)
class Node:
    name: str
    op: str  # the rule key (nn.ReLU, F.relu, torch.relu and x.relu() are all "relu")
    rule: object  # the rule from hbpc.rules
    hyper: dict  # hyper-parameters (stride, padding, ...) as plain tuples, ints and floats
    inputs: tuple  # the producing node per input slot (INPUT for the model input)
    x_shapes: tuple  # per input slot
    y_shape: tuple
    params: dict = field(default_factory=dict)  # {role: name in model.named_parameters()}
    param_shapes: dict = field(default_factory=dict)  # {role: shape}
    buffers: dict = field(default_factory=dict)  # {role: name in model.named_buffers()} (running statistics)
    source: str = "<unknown>"  # file:line of the user's code that created the node
    fx_name: str = ""  # the torch.fx node it was lowered from
    derived: object = None  # set by hbpc.derive.annotate
    plan: object = None  # set by emit from the Plan

    @property
    def x_shape(self) -> tuple:
        """The shape at the first input slot (the only one, except for add and cat)."""
        return self.x_shapes[0]


@dataclass(frozen=True)
class Tensor:
    """What an edge passes: the producer's output, per-sample ``shape``, into the consumer's input ``slots``
    (two for ``a + a``)."""

    shape: tuple
    slots: tuple


def node(graph, name) -> Node:
    return graph.nodes[name]["node"]


def nodes(graph) -> list:
    """Every Node, in graph order."""
    return [graph.nodes[name]["node"] for name in graph.graph["order"]]


def add(graph, ir_node: Node):
    """Add a node and the edges from its producers (the model input has none)."""
    graph.add_node(ir_node.name, node=ir_node)
    for source, shape in zip(ir_node.inputs, ir_node.x_shapes):
        if source != INPUT:
            slots = tuple(slot for slot, name in enumerate(ir_node.inputs) if name == source)
            graph.add_edge(source, ir_node.name, tensor=Tensor(shape, slots))


def update(graph, name, /, **layer):
    """Replace a node's ``derived`` or ``plan`` (or any field) with ``dataclasses.replace``."""
    graph.nodes[name]["node"] = replace(node(graph, name), **layer)
