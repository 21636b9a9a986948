"""Issue 16, items 1, 6, 8: weights shared over positions, nn.Embedding, cross-entropy over tokens, KFAC-expand/-reduce.

Float64 against torch.autograd (``exactness.assert_dense_exact``: loss, gradient, full GGN/Hessian products, exact block
products, HBP blocks at N = 1 with both averaging flags off), Kronecker factors against their dense definitions from
per-position Jacobians, and against curvlinops' KFAC where the conventions match.
"""
import importlib.util

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

import hbpc
from hbpc.linalg.dataset import kronecker_factors as dataset_factors
from hbpc.losses import TokenCrossEntropyLoss

from exactness import assert_dense_exact
from test_full_products import _true_ggn, _true_hessian, parameter_slices


class Tokens(nn.Module):
    """ids (N, T) -> embedding (+ positions) -> shared Linear, tanh -> logits (N, V, T) (or (N, T, V))."""

    def __init__(self, vocab=5, width=3, block=4, tied=False, classes_last=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.mix, self.head = nn.Linear(width, width), nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight
        self.classes_last = classes_last

    def forward(self, idx):
        B, T = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(0, T, dtype=torch.long, device=idx.device))
        logits = self.head(torch.tanh(self.mix(x)))
        return logits if self.classes_last else logits.transpose(1, 2)


def _labels(shape, classes, ignore):
    t = torch.randint(classes, shape)
    t[0, 1], t[-1] = ignore, ignore  # one ignored token, and a row of ignored tokens only
    return t


def test_linear_and_layer_norm_shared_over_positions_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3), nn.Flatten(),
                          nn.Linear(6, 3)).double()
    assert_dense_exact(model, torch.randn(3, 2, 3, dtype=torch.float64), torch.randint(3, (3,)), nn.CrossEntropyLoss())


@pytest.mark.parametrize("loss_fn, classes_last, block", [
    (nn.CrossEntropyLoss(), False, 4),
    (nn.CrossEntropyLoss(reduction="sum", ignore_index=1), False, 6),  # positions: the first 4 of 6 rows
    (TokenCrossEntropyLoss(ignore_index=2, label_smoothing=0.1), True, 4),
])
def test_embedding_to_token_cross_entropy_is_exact(loss_fn, classes_last, block):
    torch.manual_seed(1)
    model = Tokens(block=block, classes_last=classes_last).double()
    x = torch.randint(5, (3, 4))
    assert_dense_exact(model, x, _labels((3, 4), 5, loss_fn.ignore_index), loss_fn)


def test_tied_embedding_and_head_products_are_exact_and_blocks_sum_the_uses():
    """The tied weight (one parameter, two nodes): products exact; its N = 1 block is the sum of its per-use blocks,
    i.e. the exact blocks of the untied copy's two weights."""
    torch.manual_seed(2)
    tied, loss_fn = Tokens(tied=True).double(), nn.CrossEntropyLoss()
    x, t = torch.randint(5, (3, 4)), _labels((3, 4), 5, -100)
    curvature = hbpc.compile_model(tied, x[:2], loss_fn).Curvature(tied)
    curvature.forward_backward(x, t)
    vs = [torch.randn_like(p) for p in tied.parameters()]
    flat = torch.cat([v.flatten() for v in vs])
    for product, truth in ((curvature.hessian_vector_product, _true_hessian), (curvature.ggn_vector_product, _true_ggn)):
        got = torch.cat([o.flatten() for o in product(vs)])
        assert torch.allclose(got, truth(tied, loss_fn, x, t) @ flat, atol=1e-10)
    untied = Tokens().double()
    untied.load_state_dict({**tied.state_dict(), "head.weight": tied.wte.weight.detach().clone()})
    curvature.forward_backward(x[:1], t[:1])
    for mode, truth in (("hessian", _true_hessian), ("ggn", _true_ggn)):
        exact, where = truth(untied, loss_fn, x[:1], t[:1]), parameter_slices(untied)
        uses = exact[where["wte.weight"], where["wte.weight"]] + exact[where["head.weight"], where["head.weight"]]
        assert torch.allclose(curvature.blocks(mode, False, False)["wte.weight"].to_dense(), uses, atol=1e-10)


def test_integer_inputs_and_token_targets_are_checked():
    torch.manual_seed(3)
    model = Tokens().double()
    module = hbpc.compile_model(model, torch.randint(5, (2, 4)), nn.CrossEntropyLoss(ignore_index=0))
    curvature = module.Curvature(model)
    assert module.Curvature.INPUT_IDS == 5
    with pytest.raises(TypeError, match="token ids of an integer dtype"):
        curvature.forward_backward(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[0, 4\]"):
        curvature.forward_backward(torch.full((2, 4), 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, \*S\) = \(2, 4\)"):
        curvature.forward_backward(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"or 0 \(ignore_index\)"):
        curvature.forward_backward(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -100))
    ids, ignored = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    loss = curvature.forward_backward(ids, ignored)  # no token counts: NaN, gradient 0, as torch
    assert torch.isnan(loss) and torch.isnan(nn.CrossEntropyLoss(ignore_index=0)(model(ids), ignored))
    assert all((p.grad == 0).all() for p in model.parameters())
    assert all((g == 0).all() for g in curvature.ggn_vector_product([torch.ones_like(p) for p in model.parameters()]))


class Shuffled(Tokens):
    def forward(self, idx):
        return self.head(self.wte(idx) + self.wpe(torch.tensor([0, 2, 1, 3]))).transpose(1, 2)


def test_embedding_refusals_name_the_problem():
    with pytest.raises(hbpc.HbpcError, match=r"torch.arange\(T\), T <= num_embeddings = 4"):
        hbpc.compile_model(Shuffled(), torch.randint(5, (2, 4)), nn.CrossEntropyLoss())
    padded = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(hbpc.HbpcError, match="embedding with padding_idx is not supported"):
        hbpc.compile_model(padded, torch.randint(5, (2, 2)), nn.CrossEntropyLoss())
    with pytest.raises(hbpc.HbpcError, match=r"ignore_index is not supported for logits \(N, C\), only for"):
        hbpc.compile_model(nn.Linear(3, 2), torch.randn(2, 3), nn.CrossEntropyLoss(ignore_index=0))


class Pooled(nn.Module):
    """(N, T, D) -> shared Linear, tanh -> [mean over T -> Linear: logits (N, C)] or [shared Linear: (N, C, T)]."""

    def __init__(self, pool, classes_last=False):
        super().__init__()
        self.lin1, self.lin2, self.pool, self.classes_last = nn.Linear(3, 4), nn.Linear(4, 3), pool, classes_last

    def forward(self, x):
        h = torch.tanh(self.lin1(x))
        return self.lin2(h.mean(1)) if self.pool else self.logits(self.lin2(h))

    def logits(self, y):
        return y if self.classes_last else y.transpose(1, 2)


def _dense_factors(model, loss_fn, x, t, approx):
    """lin1's (G, A) from their definitions: J_(n,l) = ∂z_n/∂y_(n,l) from autograd, H_n = ∇²_(z_n) L;
    expand: G = Σ_(n,l) J_(n,l)ᵀ H_n J_(n,l), A = Σ_(n,l) x xᵀ / (N L); reduce: G = Σ_n J̄_nᵀ H_n J̄_n with
    J̄_n = Σ_l J_(n,l), A = Σ_n x̄ x̄ᵀ / N with x̄_n = mean_l x."""
    with torch.no_grad():
        y = model.lin1(x)
    rest = lambda y: model.lin2(torch.tanh(y).mean(1)) if model.pool else model.logits(model.lin2(torch.tanh(y)))
    z = rest(y)
    N, L, O = y.shape
    J = jacobian(rest, y).reshape(N, z[0].numel(), N, L, O)
    J = torch.stack([J[n, :, n] for n in range(N)])  # (N, d_z, L, O): per-sample, per-position
    H = hessian(lambda z: loss_fn(z, t), z).reshape(N, z[0].numel(), N, z[0].numel())
    H = torch.stack([H[n, :, n] for n in range(N)])
    if approx == "expand":
        G = torch.einsum("nzlo,nzw,nwlp->op", J, H, J)
        A = torch.einsum("nli,nlj->ij", x, x) / (N * L)
    else:
        Jbar, xbar = J.sum(2), x.mean(1)
        G = torch.einsum("nzo,nzw,nwp->op", Jbar, H, Jbar)
        A = xbar.T @ xbar / N
    return G, A


@pytest.mark.parametrize("pool, loss_fn", [(True, nn.CrossEntropyLoss()), (False, nn.CrossEntropyLoss()),
                                           (False, TokenCrossEntropyLoss())])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_expand_and_reduce_match_their_definitions(pool, loss_fn, approx):
    torch.manual_seed(4)
    model = Pooled(pool, isinstance(loss_fn, TokenCrossEntropyLoss)).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    t = torch.randint(3, (3,) if pool else (3, 2))
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    assert curvature.WEIGHT_SHARING == {"lin1": 2, **({} if pool else {"lin2": 2})}
    curvature.forward_backward(x, t)
    factors = curvature.kronecker_factors("kflr", kfac_approx=approx)
    G, A = _dense_factors(model, loss_fn, x, t, approx)
    got_G, got_A = factors["lin1.weight"].kronecker_factors
    assert torch.allclose(got_G, G, atol=1e-12) and torch.allclose(got_A, A, atol=1e-12)
    assert torch.allclose(factors["lin1.bias"].to_dense(), G, atol=1e-12)
    kfra = curvature.kronecker_factors("kfra", kfac_approx=approx)["lin1.weight"].kronecker_factors
    assert torch.allclose(kfra[1], A, atol=1e-12)
    data = dataset_factors(curvature, [(x[:2], t[:2]), (x[2:], t[2:])], kfac_approx=approx)["lin1.weight"]
    assert torch.allclose(data.kronecker_factors[1], A, atol=1e-12)  # A: a sample mean over the batches


@pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None, reason="curvlinops not installed")
@pytest.mark.parametrize("pool, approx", [(True, "expand"), (True, "reduce"), (False, "expand")])
def test_kfac_expand_and_reduce_equal_curvlinops(pool, approx):
    """curvlinops' type-2 KFAC backpropagates C root columns shared by all tokens: equal to the exact root where each
    token's logits depend on its own position only (expand, token-wise model) or there is one token (pooled)."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(5)
    model, loss_fn = Pooled(pool).double(), nn.CrossEntropyLoss()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    t = torch.randint(3, (3,) if pool else (3, 2))
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    ours = curvature.kronecker_factors("kflr", kfac_approx=approx)
    peer = KFACLinearOperator(model, loss_fn, list(model.parameters()), [(x, t)], fisher_type="type-2",
                              kfac_approx=approx, check_deterministic=False)
    peer.compute_kronecker_factors()
    for layer in ("lin1", "lin2"):
        G, A = ours[f"{layer}.weight"].kronecker_factors
        assert torch.allclose(G, peer._gradient_covariances[layer], atol=1e-12)
        assert torch.allclose(A, peer._input_covariances[layer], atol=1e-12)
