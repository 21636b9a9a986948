"""User names cannot collide with generated names, and user text cannot escape into generated code.

Module names become node names and node names become identifiers of the generated module
(``a_<node>``, ``self._<node>_jvp``, ...; see ``hbpc.emit.names``). Every model here is compiled and
checked in float64 against torch.autograd: loss, gradient, Hessian and GGN products, exact block
products (N = 3) and HBP blocks at N = 1, where they are the true diagonal blocks of a chain.
"""
import ast
import keyword
import os
import random
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import hbpc
import hbpc.ir
from hbpc.cli import main
from hbpc.compiler import compile_source
from hbpc.emit.names import INPUT, LOCAL_PREFIXES, MEMBERS, identifiers, graph_suffixes, node_stems, safe_text
from hbpc.derive import annotate
from hbpc.export import export
from models import SETTINGS

WIDTH, CLASSES = 3, 2


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference: dense Hessian and GGN over all parameters from autograd.


def _flat(model):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflatten(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        return {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}

    return flat, unflatten


def _reference(model, loss_fn, x, t):
    """(loss, gradient, Hessian, GGN) of loss_fn(model(x), t) over the flattened parameters."""
    flat, unflatten = _flat(model)

    def loss(vector):
        return loss_fn(functional_call(model, unflatten(vector), (x,)), t)

    value = loss(flat)
    gradient = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    z = model(x).detach()
    jacobian = jacrev(lambda vector: functional_call(model, unflatten(vector), (x,)))(flat).reshape(z.numel(), -1)
    output_hessian = torch.autograd.functional.hessian(lambda out: loss_fn(out.reshape(z.shape), t), z.flatten())
    return value, gradient, hessian, jacobian.T @ output_hessian @ jacobian


def _slices(model):
    slices, start = {}, 0
    for name, p in model.named_parameters():
        slices[name] = slice(start, start + p.numel())
        start += p.numel()
    return slices


def _data(N, loss_fn, generator):
    x = torch.randn(N, WIDTH, dtype=torch.float64, generator=generator)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return x, torch.randint(0, CLASSES, (N,), generator=generator)
    return x, torch.randn(N, CLASSES, dtype=torch.float64, generator=generator)


def check_exact(model, loss_fn, seed=0):
    """Compile ``model`` and compare everything the generated module computes with autograd, in float64."""
    model = model.double()
    generator = torch.Generator().manual_seed(seed)
    x, t = _data(3, loss_fn, generator)
    module = hbpc.compile_model(model, x, loss_fn)
    curvature = module.Curvature(model)
    slices = _slices(model)
    value, gradient, hessian, ggn = _reference(model, loss_fn, x, t)

    model.zero_grad()
    loss = curvature.forward_backward(x, t)
    assert torch.allclose(loss, value, atol=1e-12), (loss, value)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads, gradient, atol=1e-10)

    vs = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in model.parameters()]
    flat_v = torch.cat([v.flatten() for v in vs])
    for product, truth in ((curvature.hessian_vector_product, hessian), (curvature.ggn_vector_product, ggn)):
        got = torch.cat([out.flatten() for out in product(vs)])
        assert torch.allclose(got, truth @ flat_v, atol=1e-10), product.__name__
    assert list(curvature.block_products()) == list(slices)  # keyed by model.named_parameters() names, in order
    for mode, truth in (("hessian", hessian), ("ggn", ggn)):
        for name, block_product in curvature.block_products(mode).items():
            where, v = slices[name], vs[list(slices).index(name)]
            got = block_product(v).flatten()
            assert torch.allclose(got, truth[where, where] @ v.flatten(), atol=1e-10), (mode, name)

    x1, t1 = x[:1], t[:1]
    _, _, hessian1, ggn1 = _reference(model, loss_fn, x1, t1)
    curvature.forward_backward(x1, t1)
    assert list(curvature.blocks()) == list(slices)
    for mode, truth in (("hessian", hessian1), ("ggn", ggn1)):
        for name, block in curvature.blocks(mode).items():
            where = slices[name]
            assert torch.allclose(block.to_dense(), truth[where, where], atol=1e-10), (mode, name)
    return module


# ---------------------------------------------------------------------------------------------------------------
# The reproducers of issue 13.


@pytest.mark.parametrize("layers", [
    [("x", nn.Linear(WIDTH, WIDTH)), ("act", nn.Tanh()), ("out", nn.Linear(WIDTH, CLASSES))],
    [("lin", nn.Linear(WIDTH, WIDTH)), ("x", nn.Tanh()), ("out", nn.Linear(WIDTH, CLASSES))],
    [("lin", nn.Linear(WIDTH, WIDTH)), ("act", nn.Sigmoid()), ("x", nn.Linear(WIDTH, CLASSES))],
    [("lin", nn.Linear(WIDTH, 4)), ("x", nn.Tanh()), ("out", nn.Linear(4, CLASSES))],
], ids=["x-first", "x-activation", "x-last", "x-other-width"])
def test_a_submodule_named_x_is_not_the_model_input(layers):
    """nn.Sequential's input is the placeholder ``input``: a child named ``x`` once took the input's place."""
    torch.manual_seed(0)
    check_exact(nn.Sequential(OrderedDict(layers)), nn.CrossEntropyLoss())


def test_a_submodule_named_x_gets_its_own_ir_node_name():
    model = nn.Sequential(OrderedDict([("lin", nn.Linear(WIDTH, WIDTH)), ("x", nn.Tanh())]))
    graph = export(model, torch.randn(2, WIDTH))
    assert INPUT not in graph.graph["order"]
    first, second = hbpc.ir.nodes(graph)
    assert first.inputs == (INPUT,) and second.inputs == (first.name,)
    assert graph.edges[first.name, second.name]["tensor"] == hbpc.ir.Tensor((WIDTH,), (0,))


def test_lin_next_to_lin_weight_defines_each_method_once():
    """``lin``'s weight vjp and ``lin_weight``'s input vjp were both ``_lin_weight_vjp``."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict([("lin", nn.Linear(WIDTH, WIDTH)), ("lin_weight", nn.Linear(WIDTH, CLASSES))]))
    module = check_exact(model, nn.CrossEntropyLoss())
    text = compile_source(model, torch.randn(2, WIDTH, dtype=torch.float64), nn.CrossEntropyLoss())
    definitions = re.findall(r"^    def (\w+)\(", text[text.index("class Curvature("):], re.MULTILINE)
    assert len(definitions) == len(set(definitions)), sorted(d for d in definitions if definitions.count(d) > 1)
    assert module.Curvature.NODES["lin_weight_2"][2] == module.Curvature.NODES["lin"][2]  # one family's methods


def test_a_family_name_never_meets_a_node_name():
    """The Linear family's methods ``_<family>_weight_jvp`` next to a node named ``linear`` and a LayerNorm named
    ``linear_weight`` whose normalization prints its own methods: the family is named apart from both."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict([("linear", nn.Linear(WIDTH, WIDTH)), ("linear_weight", nn.LayerNorm(WIDTH)),
                                       ("out", nn.Linear(WIDTH, CLASSES))]))
    module = check_exact(model, nn.CrossEntropyLoss())
    text = compile_source(model, torch.randn(2, WIDTH, dtype=torch.float64), nn.CrossEntropyLoss())
    definitions = re.findall(r"^    def (\w+)\(", text[text.index("class Curvature("):], re.MULTILINE)
    assert len(definitions) == len(set(definitions)), sorted(d for d in definitions if definitions.count(d) > 1)
    nodes = module.Curvature.NODES
    family = nodes["linear"][2]
    assert family == nodes["out"][2] and family not in (None, "linear")  # the stem linear's identifiers are taken
    own = [name for name, (_, _, shared) in nodes.items() if shared is None]  # the LayerNorm's normalization
    assert own and all(f"_{name}_jvp" in definitions for name in own) and f"_{family}_weight_jvp" in definitions


class Branches(nn.Module):
    """Branches joined by add and cat (pair curvatures S_a__b, cat's _<node>_vjp<i>), with adversarial names."""

    def __init__(self):
        super().__init__()
        layers = [("a", nn.Linear(WIDTH, WIDTH)), ("b", nn.Tanh()), ("a_b", nn.Linear(WIDTH, WIDTH)),
                  ("S", nn.Sigmoid()), ("class", nn.Softplus()), ("cat_vjp0", nn.Linear(2 * WIDTH, CLASSES)),
                  ("add_X", nn.SiLU())]
        for name, layer in layers:
            self.add_module(name, layer)

    def forward(self, input):
        h = self.a(input)
        joined = self.b(h) + self.S(self.a_b(h))
        both = torch.cat([self.add_X(joined), getattr(self, "class")(h)], dim=1)
        return self.cat_vjp0(both)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse"])
def test_adversarial_names_on_a_graph_with_branches(loss_fn):
    torch.manual_seed(2)
    check_exact(Branches(), loss_fn)


@pytest.mark.parametrize("names", [["class", "lambda", "def", "None"], ["ab", "a_b", "a__b", "_ab", "ab_"],
                                   ["α", "β", "日本", "ﬁ", "fi"]], ids=["keywords", "underscores", "unicode"])
def test_names_torch_fx_and_python_treat_alike_stay_apart(names):
    """Keywords (torch.fx writes ``self.class``), names equal up to ``_``, unicode (fx maps them to ``_``; Python
    identifiers are NFKC-normalized, ``ﬁ`` is ``fi``)."""
    torch.manual_seed(3)
    layers = [nn.Linear(WIDTH, WIDTH) if k % 2 == 0 else nn.Tanh() for k in range(len(names) - 1)]
    model = nn.Sequential()
    for name, layer in zip(names, [*layers, nn.Linear(WIDTH, CLASSES)]):
        model.add_module(name, layer)
    check_exact(model, nn.CrossEntropyLoss())


def test_ordinary_names_stay_as_they_are():
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(WIDTH, WIDTH)), ("act", nn.Tanh()),
                                       ("fc2", nn.Linear(WIDTH, CLASSES))]))
    graph = annotate(export(model, torch.randn(2, WIDTH)))
    assert list(node_stems(graph).values()) == ["fc1", "act", "fc2"]


INJECTED = 'os.environ["HBPC_NAMES_INJECTED"] = "1"'


def _import_without_running_injected_code(path):
    os.environ.pop("HBPC_NAMES_INJECTED", None)
    module = hbpc.compiler.import_generated(path)
    assert "HBPC_NAMES_INJECTED" not in os.environ
    assert module.Curvature is not None
    return module


def test_a_class_name_with_triple_quotes_stays_in_the_docstrings(tmp_path):
    name = f'Evil"""\nimport os; {INJECTED}\n"""'
    model = type(name, (nn.Sequential,), {})(nn.Linear(WIDTH, CLASSES))
    text = compile_source(model, torch.randn(2, WIDTH), nn.CrossEntropyLoss())
    path = tmp_path / "curv_model.py"
    path.write_text(text)
    module = _import_without_running_injected_code(path)
    assert safe_text(name) in text
    assert name in module.__doc__ and name in module.Curvature.__doc__  # the docstrings read back the name
    os.environ.pop("HBPC_NAMES_INJECTED", None)
    hbpc.compile_model(model, torch.randn(2, WIDTH))  # the class name is also the header's source name here
    assert "HBPC_NAMES_INJECTED" not in os.environ


def test_a_model_file_name_with_a_newline_stays_in_the_header_comment(tmp_path):
    names = [f"model\nimport os; {INJECTED}\n#.py", f"model\u2028import os; {INJECTED}\r.py"]
    for k, file_name in enumerate(names):
        model_file = tmp_path / file_name
        try:
            model_file.write_text("import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(3, 2))\n"
                                  "example_input = torch.randn(2, 3)\n")
        except OSError:  # a file system that refuses the name: the same text as compile_source's source_name
            text = compile_source(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), source_name=file_name)
            (tmp_path / f"out{k}.py").write_text(text)
        else:
            assert main(["compile", str(model_file), "-o", str(tmp_path / f"out{k}.py")]) == 0
        text = (tmp_path / f"out{k}.py").read_text()
        _import_without_running_injected_code(tmp_path / f"out{k}.py")
        assert f"from {safe_text(file_name)}. Do not edit" in text
        assert text.splitlines()[1].startswith("# hbpc-version: ")  # the header is still three comment lines


@pytest.mark.parametrize("text", ['a"""b', 'ends with a quote"', "back\\slash\\", "new\nline\r\u2028\u202e\x00",
                                  "tab\tand ünïcode θ ∇²"])
def test_safe_text_reads_back_unchanged_from_a_literal(text):
    for literal in (f'"""{safe_text(text)}"""', f'"{safe_text(text)}"'):
        assert eval(literal) == text  # noqa: S307 (the point of the test)
    assert "\n" not in safe_text(text) and "\r" not in safe_text(text)
    assert len(safe_text(text).splitlines()) <= 1


# ---------------------------------------------------------------------------------------------------------------
# The module-name fuzzer.

PRELUDE_HELPERS = ["lead_shape", "reshape_to", "accumulate_grad", "as_vectors", "from_vectors", "residual_product",
                   "sandwich_independent", "weight_sandwich", "split_block", "DenseBlock", "KroneckerBlock", "numel"]
GENERATOR_NAMES = ["x", "v", "u", "S", "N", "C", "z", "t", "W", "X", "Y", "G", "A", "B", "R", "g", "s", "s0", "out",
                   "single", "lead", "shape", "scale", "loss", "self", "torch", "softmax", "lse", "target", "vs",
                   "curvature", "samples", "generator", "visit", "methods", "block", "param", "method", "products",
                   "name", "f", "p", "model", "input", "a", "a_x", "t_x", "S_x", "S_a__b", "_ready", "check",
                   "loss_z", "block_product", "hbp", "root", "N_X"]
MEMBER_NAMES = ["lin", "lin_weight", "lin_weight_vjp", "lin_X", "lin_d1", "weight", "bias", "jvp", "vjp", "d1", "X_X"]
UNDERSCORES = ["ab", "a_b", "a__b", "_ab", "ab_", "a_b_", "_", "__", "0", "1", "x1"]
UNICODE = ["α", "β", "ñ", "日本", "ℌ", "ﬁ", "fi", "Ω", "é"]
KEYWORDS = ["class", "lambda", "def", "for", "None", "True", "import", "return", "yield", "async"]
ODD = ["a-b", "a b", "a\nb", '"""', "'", "\\", "\u2028", "{x}", "%s"]  # reach the file in parameter names
POOL = GENERATOR_NAMES + MEMBER_NAMES + UNDERSCORES + UNICODE + KEYWORDS + PRELUDE_HELPERS + ODD


class DictChain(nn.Module):
    """Layers in an nn.ModuleDict, applied in order."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


# torch refuses child names that are attributes of the container (nn.Module methods)
POOL = [name for name in POOL if not hasattr(nn.Sequential(), name) and not hasattr(nn.ModuleDict(), name)]


def _layer(rng, width_in, width_out):
    if width_in == width_out and rng.random() < 0.5:
        return rng.choice([nn.Tanh, nn.Sigmoid, nn.Softplus, nn.SiLU])()
    return nn.Linear(width_in, width_out, bias=rng.random() < 0.8)


def _container(rng, layers):
    """nn.Sequential (through add_module) or a DictChain of ``layers``, a list of (name, module)."""
    if rng.random() < 0.5:
        container = nn.Sequential()
        for name, layer in layers:
            container.add_module(name, layer)
        return container
    return DictChain(OrderedDict(layers))


def random_model(rng):
    """A chain of 2-5 layers (WIDTH -> ... -> CLASSES), the middle ones nested one level down in 40% of the models,
    every module named from ``POOL``."""
    depth = rng.randint(2, 5)
    widths = [WIDTH] * depth + [CLASSES]
    layers = [_layer(rng, widths[k], widths[k + 1]) for k in range(depth)]
    if depth >= 3 and rng.random() < 0.4:
        inner = _container(rng, list(zip(rng.sample(POOL, depth - 2), layers[1:-1])))
        layers = [layers[0], inner, layers[-1]]
    return _container(rng, list(zip(rng.sample(POOL, len(layers)), layers)))


def _fuzz_models(count, seed=13):
    rng, models = random.Random(seed), []
    for k in range(count):
        torch.manual_seed(k)
        models.append(random_model(rng).double())
    return models


FUZZ_MODELS = _fuzz_models(30)


def _names(model):
    """The model's module names, for test ids (a DictChain's ``layers.`` left out)."""
    names = (name.replace("layers.", "") for name, _ in model.named_modules() if name not in ("", "layers"))
    return ascii(",".join(names))[1:-1]


@pytest.mark.parametrize("model", FUZZ_MODELS, ids=[f"{k}:{_names(m)}" for k, m in enumerate(FUZZ_MODELS)])
def test_fuzzed_module_names_compile_exactly(model):
    loss_fn = nn.CrossEntropyLoss() if sum(p.numel() for p in model.parameters()) % 2 else nn.MSELoss()
    check_exact(model, loss_fn)


def test_fuzz_covers_every_kind_of_name():
    used = {part for model in FUZZ_MODELS for name, _ in model.named_modules() for part in name.split(".") if name}
    for kind in (KEYWORDS, GENERATOR_NAMES, UNICODE, UNDERSCORES, MEMBER_NAMES, PRELUDE_HELPERS, ODD):
        assert used & set(kind), kind


# ---------------------------------------------------------------------------------------------------------------
# The generated module's identifiers are the ones hbpc.emit.names accounts for.


def _class_names(text):
    """(members, locals) of Curvature in the generated text: attributes and methods, and names its code assigns."""
    tree = ast.parse(text)
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Curvature")
    members = {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}
    members |= {target.id for node in cls.body if isinstance(node, ast.Assign) for target in node.targets}
    members |= {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "self"}
    locals_ = {node.id for node in ast.walk(cls) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    return members, locals_


def _families(text):
    """The family names in the generated NODES table (the methods they share are ``_<family>_<suffix>``)."""
    cls = next(node for node in ast.parse(text).body if isinstance(node, ast.ClassDef) and node.name == "Curvature")
    table = next(node.value for node in cls.body if isinstance(node, ast.Assign) and node.targets[0].id == "NODES")
    return {family for _, _, family in ast.literal_eval(table).values() if family is not None}


NAMED_CASES = [(_names(m), m.double(), nn.CrossEntropyLoss(), torch.randn(2, WIDTH, dtype=torch.float64)) for m in [
    *FUZZ_MODELS[:8], Branches(), DictChain({"norm": nn.LayerNorm(WIDTH), "norm_affine": nn.Linear(WIDTH, CLASSES)})]]
ZOO_CASES = [(setting.id, setting.build(), setting.loss_fn(), setting.data(2)[0]) for setting in SETTINGS]


@pytest.mark.parametrize("case", NAMED_CASES + ZOO_CASES, ids=[case[0] for case in NAMED_CASES + ZOO_CASES])
def test_every_generated_member_is_a_node_identifier_or_a_known_member(case):
    """A member neither derived from a node stem or a family name nor in names.MEMBERS could collide with a node's:
    add it there. No family's identifiers are a node's. Generated locals other than the nodes' keep out of the nodes' prefixes a_, g_, t_, u_, S_."""
    _, model, loss_fn, x = case
    graph = annotate(export(model, x, loss_fn))
    text = compile_source(model, x, loss_fn)
    suffixes = graph_suffixes(graph)
    node_names = {pair for stem in node_stems(graph).values() for pair in identifiers(stem, suffixes)}
    family_names = {pair for family in _families(text) for pair in identifiers(family, suffixes)}
    assert not node_names & family_names, sorted(node_names & family_names)
    members, locals_ = _class_names(text)
    unknown = {m for m in members if ("member", m) not in node_names | family_names and m not in MEMBERS
               and not m.startswith("loss_")}
    assert not unknown, f"members neither node-derived nor in hbpc.emit.names.MEMBERS: {sorted(unknown)}"
    stray = {name for name in locals_ if ("local", name) not in node_names and name.split("_")[0] in LOCAL_PREFIXES
             and "_" in name and not re.fullmatch(r"S_\w+__\w+", name)}
    assert not stray, f"generated locals in the node namespaces a_/g_/t_/u_/S_: {sorted(stray)}"


def test_stems_are_unique_identifiers_and_never_the_input():
    for model in FUZZ_MODELS:
        graph = annotate(export(model.double(), torch.randn(2, WIDTH, dtype=torch.float64)))
        stems = list(node_stems(graph).values())
        assert len(set(stems)) == len(stems) and INPUT not in stems
        for stem in stems:
            assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*", stem), stem
            assert not keyword.iskeyword(f"a_{stem}")
