"""Issue 16's transformers, tiny and in float64, against autograd: the causal GPT (tied embedding, LayerNorm, GELU
MLP, residuals), the ViT (patch conv, CLS token, learned positions, nn.MultiheadAttention) and the RMSNorm encoder
with a padding mask.

Each model: loss, gradient, full Hessian and GGN products, exact block products, blocks at N = 1 with both averaging
flags off (a tied weight's block: the sum of its per-use blocks), and KFAC-expand/-reduce factors of a Linear layer
shared over the tokens against their definitions (Eschenhagen et al. 2023).
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbpc
from hbpc.data.text import VOCABULARY
from hbpc.export import load_model_file

from test_full_products import _true_ggn, _true_hessian, parameter_slices

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-10


def _module(path):
    """The model file as a module (its classes take the sizes as keyword arguments)."""
    spec = importlib.util.spec_from_file_location(f"_transformer_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPT_FILE, VIT_FILE, ENCODER_FILE = (ROOT / "examples/models/gpt_char.py", ROOT / "examples/models/vit.py",
                                    Path(__file__).parent / "rmsnorm_encoder.py")


def _tiny(name):
    """(model, x, t, loss_fn) at tiny sizes, float64, seeded."""
    torch.manual_seed(0)
    if name == "gpt":
        module = _module(GPT_FILE)
        model = module.GPT(vocab=5, width=4, heads=2, layers=2, block=4)
        x, t = torch.randint(5, (3, 4)), torch.randint(5, (3, 4))
    elif name == "vit":
        model = _module(VIT_FILE).ViT(width=4, heads=2, patch=2, size=4, classes=3)
        x, t = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    else:
        model = _module(ENCODER_FILE).Encoder(vocab=5, length=4, width=4, padded=1, classes=3)
        x, t = torch.randint(5, (3, 4)), torch.tensor([0, 2, 1])
    return model.double(), x, t, nn.CrossEntropyLoss()


def _blocks_of(matrix, model):
    return {name: matrix[where, where] for name, where in parameter_slices(model).items()}


def _untied_gpt_blocks(model, loss_fn, x, t, truth):
    """The tied embedding's per-use blocks summed: the exact blocks of an untied copy's wte and lm_head weights."""
    untied = type(model)(vocab=5, width=4, heads=2, layers=2, block=4).double()
    untied.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    untied.load_state_dict(model.state_dict(), strict=False)
    untied.lm_head.weight.data.copy_(model.wte.weight.detach())
    exact = _blocks_of(truth(untied, loss_fn, x, t), untied)
    return exact["wte.weight"] + exact["lm_head.weight"]


@pytest.mark.parametrize("name", ["gpt", "vit", "encoder"])
def test_transformer_is_exact(name):
    model, x, t, loss_fn = _tiny(name)
    with sdpa_kernel(SDPBackend.MATH):  # the reference's double backward: torch's fused CPU kernel has none
        curvature = hbpc.compile_model(model, x[:2], loss_fn).Curvature(model)  # compiled for N = 2, run at N = 3
        loss = curvature.forward_backward(x, t)
        expected = loss_fn(model(x), t)
        grads = torch.autograd.grad(expected, list(model.parameters()))
        assert torch.allclose(loss, expected, atol=1e-12)
        for (param, p), g in zip(model.named_parameters(), grads):
            assert torch.allclose(p.grad, g, atol=1e-12), param

        H, G = _true_hessian(model, loss_fn, x, t), _true_ggn(model, loss_fn, x, t)
        vs = [torch.randn(*p.shape, dtype=torch.float64) for p in model.parameters()]
        flat = torch.cat([v.flatten() for v in vs])
        for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
            assert torch.allclose(torch.cat([o.flatten() for o in product(vs)]), truth @ flat, atol=ATOL)
        for mode, truth in (("hessian", H), ("ggn", G)):
            products, exact = curvature.block_products(mode), _blocks_of(truth, model)
            for param, p in model.named_parameters():
                basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
                dense = products[param](basis).reshape(p.numel(), p.numel())
                assert torch.allclose(dense, exact[param], atol=ATOL), (mode, param)

        curvature.forward_backward(x[:1], t[:1])
        for mode, truth in (("hessian", _true_hessian), ("ggn", _true_ggn)):
            exact = _blocks_of(truth(model, loss_fn, x[:1], t[:1]), model)
            blocks = curvature.blocks(mode, False, False)
            for param, _ in model.named_parameters():
                want = (_untied_gpt_blocks(model, loss_fn, x[:1], t[:1], truth) if param == "wte.weight"
                        else exact[param])  # the tied embedding: the sum of its two uses' blocks
                assert torch.allclose(blocks[param].to_dense(), want, atol=ATOL), (mode, param)


def _factor_definitions(model, layer, loss_fn, x, t, approx):
    """(G, A) of a Linear layer shared over L positions from their definitions: J_(n,l) = ∂z_n/∂y_(n,l) by autograd,
    H_n = ∇²_(z_n) L; expand: G = Σ_(n,l) J_(n,l)ᵀ H_n J_(n,l), A = Σ_(n,l) x xᵀ / (N L); reduce: G = Σ_n J̄_nᵀ H_n J̄_n
    with J̄_n = Σ_l J_(n,l), A = Σ_n x̄ x̄ᵀ / N with x̄_n = mean_l x."""
    seen = {}

    def hook(module, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), output.detach().requires_grad_(True)
        return seen["y"]

    handle = layer.register_forward_hook(hook)
    z = model(x).reshape(x.shape[0], -1)
    handle.remove()
    y, N = seen["y"], x.shape[0]
    O = y.shape[-1]
    L = y[0].numel() // O
    J = torch.stack([torch.autograd.grad(z[:, k].sum(), y, retain_graph=True)[0] for k in range(z.shape[1])], 1)
    J = J.reshape(N, z.shape[1], L, O)  # z_n depends on sample n only
    logits = model(x).detach()
    H = torch.autograd.functional.hessian(lambda w: loss_fn(w, t), logits).reshape(N, z.shape[1], N, z.shape[1])
    H = torch.stack([H[n, :, n] for n in range(N)])
    X = seen["x"].reshape(N, L, -1)
    if approx == "expand":
        return torch.einsum("nzlo,nzw,nwlp->op", J, H, J), torch.einsum("nli,nlj->ij", X, X) / (N * L)
    Jbar, xbar = J.sum(2), X.mean(1)
    return torch.einsum("nzo,nzw,nwp->op", Jbar, H, Jbar), xbar.T @ xbar / N


@pytest.mark.parametrize("name, layer", [("gpt", "blocks.1.mlp.0"), ("vit", "mlp.0"), ("encoder", "qkv")])
def test_kfac_expand_and_reduce_of_a_transformer_match_their_definitions(name, layer):
    model, x, t, loss_fn = _tiny(name)
    with sdpa_kernel(SDPBackend.MATH):
        curvature = hbpc.compile_model(model, x, loss_fn, verify=False).Curvature(model)
        curvature.forward_backward(x, t)
        assert any(node in curvature.WEIGHT_SHARING for node in curvature.FACTORS)
        for approx in ("expand", "reduce"):
            got_G, got_A = curvature.kronecker_factors("kflr", kfac_approx=approx)[f"{layer}.weight"].kronecker_factors
            G, A = _factor_definitions(model, model.get_submodule(layer), loss_fn, x, t, approx)
            assert torch.allclose(got_G, G, atol=1e-12) and torch.allclose(got_A, A, atol=1e-12), approx


def test_language_models_use_the_text_corpus_vocabulary():
    for path in (GPT_FILE, ENCODER_FILE):
        model = load_model_file(path).model
        embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        assert embedding.num_embeddings == len(VOCABULARY)
