"""Issue 16 (attention): products of two activations (the Bilinear kind), softmax and log-softmax inside the network,
constant masks and scaled dot-product attention; exact against autograd in float64 (loss, gradient, full and block
Hessian/GGN products, HBP blocks at N = 1 with both averaging flags off)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbpc
from hbpc.derive import derive
from hbpc.rules import TABLE
from hbpc.rules.bilinear import einsum_rule
from hbpc.rules.spec import y
from hbpc.runtime.bilinear import bilinear_residual_modes
from exactness import assert_dense_exact

T, D = 3, 2


class Attention(nn.Module):
    """x → linear → (q, k, v) (N, T, D) → softmax(q kᵀ/√D, masked) v → linear, in the forms people write."""

    def __init__(self, form="matmul", mask=None, normalize="softmax"):
        super().__init__()
        if form == "nanogpt":
            self.c_attn = nn.Linear(T * D, 3 * T * D)
        else:
            self.q, self.k, self.v = (nn.Linear(T * D, T * D) for _ in range(3))
        self.out = nn.Linear(T * D, 3)
        self.form, self.mask, self.normalize = form, mask, normalize
        self.register_buffer("bias", torch.tril(torch.ones(4, 4)).view(1, 4, 4))
        self.register_buffer("causal", torch.tril(torch.ones(4, 4)).view(1, 1, 4, 4))
        self.register_buffer("padding", torch.tensor([False, False, True]))

    def forward(self, x):
        N = x.shape[0]
        if self.form == "nanogpt":  # nanoGPT's attention, its projection on (N, T·D): split, heads, the buffer sliced
            q, k, v = self.c_attn(x).view(N, T, 3 * D).split(D, dim=2)
            q, k, v = (h.view(N, T, 2, D // 2).transpose(1, 2) for h in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.causal[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
            return self.out(y.transpose(1, 2).contiguous().view(N, T * D))
        q, k, v = (m(x).view(N, T, D) for m in (self.q, self.k, self.v))
        if self.form == "heads":  # (N, T, D) -> (N, 2, T, D / 2), causal attention per head, heads back
            q, k, v = (h.view(N, T, 2, D // 2).transpose(1, 2) for h in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous()
            return self.out(y.view(N, T * D))
        if self.form == "sdpa":
            mask = {"causal": None, None: None, "attn_mask": ~self.padding}[self.mask]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.mask == "causal")
            return self.out(y.reshape(N, T * D))
        if self.form == "einsum":
            att = torch.einsum("nid,njd->nij", q, k) / math.sqrt(D)
        else:
            att = torch.bmm(q, k.transpose(1, 2)) * (1 / math.sqrt(D))
        if self.mask == "causal":
            att = att.masked_fill(self.bias[:, :T, :T] == 0, float("-inf"))
        elif self.mask == "padding":
            att = att.masked_fill(self.padding, float("-inf"))
        elif self.mask == "additive":
            att = att + torch.zeros(T, T).masked_fill(self.padding, float("-inf"))
        if self.normalize == "softmax over axis 1":
            att = att.softmax(1)
        elif self.normalize == "log_softmax":
            att = torch.tanh(F.log_softmax(att, dim=-1))
        else:
            att = torch.softmax(att, -1)
        y = att @ v
        return self.out(y.reshape(N, T * D))


CASES = {
    "matmul": dict(), "einsum": dict(form="einsum"), "causal mask": dict(mask="causal"),
    "padding mask": dict(mask="padding"), "additive -inf mask": dict(mask="additive"),
    "softmax over another axis": dict(normalize="softmax over axis 1"), "log-softmax inside": dict(normalize="log_softmax"),
    "sdpa": dict(form="sdpa"), "sdpa causal": dict(form="sdpa", mask="causal"),
    "sdpa attn_mask": dict(form="sdpa", mask="attn_mask"), "sdpa causal over two heads": dict(form="heads"),
    "nanogpt": dict(form="nanogpt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_is_exact(case):
    torch.manual_seed(0)
    model = Attention(**CASES[case]).double()
    x, t = torch.randn(3, T * D, dtype=torch.float64), torch.tensor([0, 2, 1])
    with sdpa_kernel(SDPBackend.MATH):  # the reference's double backward: torch's fused CPU kernel has none
        assert_dense_exact(model, x, t, nn.CrossEntropyLoss())


class Square(nn.Module):
    """Both operands one tensor: h h for h (N, 2, T, T) (the cross term adds to its transpose)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 2 * T * T), nn.Linear(2 * T * T, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x)).view(x.shape[0], 2, T, T)
        return self.out((h @ h).flatten(1))


def test_product_of_a_tensor_with_itself_is_exact_and_refuses_pch():
    torch.manual_seed(1)
    model = Square().double()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert_dense_exact(model, x, t, nn.MSELoss())
    curvature = hbpc.compile_model(model, x, nn.MSELoss()).Curvature(model)
    curvature.forward_backward(x, t)
    with pytest.raises(NotImplementedError, match="pch-abs: both operands"):
        curvature.blocks("pch-abs")


def test_joint_residual_modes_match_the_eigendecomposition():
    M = torch.randn(2, 4, 3, dtype=torch.float64)
    R = torch.zeros(2, 7, 7, dtype=torch.float64)
    R[:, :4, 4:], R[:, 4:, :4] = M, M.mT
    values, vectors = torch.linalg.eigh(R)
    for mode, f in (("pch-abs", torch.abs), ("pch-clip", lambda v: v.clamp(min=0))):
        want = vectors @ torch.diag_embed(f(values)) @ vectors.mT
        aa, ab, bb = bilinear_residual_modes(M, mode)
        got = torch.zeros_like(R)
        got[:, :4, :4], got[:, 4:, 4:] = aa, bb
        if ab is not None:
            got[:, :4, 4:], got[:, 4:, :4] = ab, ab.mT
        assert torch.allclose(got, want, atol=1e-12), mode
    assert bilinear_residual_modes(M, "hessian") == (None, M, None)


def test_pch_block_products_use_the_mode_of_each_samples_joint_residual():
    """A block of q's weight when the bilinear node's residual is the only one: C = J_θᵀ (J_Aᵀ H J_A + |R_n|_AA) J_θ
    summed over samples, with |R_n|_AA = U Σ Uᵀ from M_n = Σ_k g_k ∂²y_k/∂A∂B (autograd)."""
    torch.manual_seed(2)
    q, k, head = nn.Linear(4, T * D).double(), nn.Linear(4, T * D).double(), nn.Linear(T * T, 2).double()

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.head = q, k, head

        def forward(self, x):
            N = x.shape[0]
            return self.head((self.q(x).view(N, T, D) @ self.k(x).view(N, T, D).transpose(1, 2)).flatten(1))

    model, loss_fn = Scores(), nn.MSELoss(reduction="sum")
    x, t = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    basis = torch.eye(q.weight.numel(), dtype=torch.float64).reshape(-1, *q.weight.shape)
    got = curvature.block_products("pch-abs")["q.weight"](basis).reshape(q.weight.numel(), -1)
    want = torch.zeros_like(got)
    for n in range(2):
        A, B = q(x[n:n + 1]).view(T, D).detach(), k(x[n:n + 1]).view(T, D).mT.detach()
        g = 2 * (head((A @ B).flatten()) - t[n]) @ head.weight  # ∂L/∂y for y = A B, flattened
        M = torch.func.jacrev(torch.func.jacrev(lambda a, b: (g * (a @ b).flatten()).sum(), 0), 1)(A, B)
        U, sigma, _ = torch.linalg.svd(M.reshape(T * D, D * T))
        # R's block over A: the pulled back loss Hessian (2 Wᵀ W through y = A B) plus |R|_AA
        J_A = torch.func.jacrev(lambda a: (a @ B).flatten())(A).reshape(T * T, T * D)
        curv_A = J_A.T @ (2 * head.weight.T @ head.weight) @ J_A + U @ torch.diag(sigma) @ U.T
        J_theta = torch.func.jacrev(lambda w: F.linear(x[n], w, q.bias))(q.weight).reshape(T * D, -1)
        want += J_theta.T @ curv_A @ J_theta
    assert torch.allclose(got, want, atol=1e-10)


def test_kflr_factors_of_the_projections_are_the_ggn_blocks_at_one_sample():
    torch.manual_seed(3)
    model = Attention(mask="causal").double()
    x, t = torch.randn(1, T * D, dtype=torch.float64), torch.tensor([1])
    curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
    curvature.forward_backward(x, t)
    factors, blocks = curvature.kronecker_factors("kflr"), curvature.blocks("ggn", False, False)
    for name in ("q.weight", "k.weight", "v.weight", "v.bias"):
        assert torch.allclose(factors[name].to_dense(), blocks[name].to_dense(), atol=1e-12), name


def test_softmax_rules_read_only_the_output():
    """The derived products of softmax and log-softmax read y (exp(y) for log-softmax), never exp(x), which
    overflows; at a masked (-inf) input they give no NaN (the causal cases above check the values)."""
    for key in ("softmax", "log_softmax"):
        assert derive(TABLE[key]).reads() == [y]


def test_cross_term_of_matmul_and_einsum_is_derived():
    for rule in (TABLE["matmul"], einsum_rule("nhid,nhjd->nhij")):
        derivation = derive(rule)
        assert derivation.cross != 0
        assert set(derivation.operands) == {"A", "B"}
        assert derivation.operands["A"].residual.operands == ("g", "t")


def _refusal(forward, fragment, x=None):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(T * D, T * D), nn.Linear(T * D, 2)
            self.attn = nn.MultiheadAttention(D, 1, batch_first=True)
            self.w = nn.Parameter(torch.randn(D, T))
            self.register_buffer("mask", torch.zeros(T, T, dtype=torch.bool))

        def forward(self, x):
            h = self.lin(x).view(x.shape[0], T, D)
            return self.out(forward(self, h).reshape(x.shape[0], -1)[:, :T * D])

    with pytest.raises(hbpc.HbpcError) as error:
        hbpc.compile_model(M(), torch.randn(2, T * D) if x is None else x, nn.CrossEntropyLoss())
    assert fragment in str(error.value)


@pytest.mark.parametrize("forward, fragment", [
    (lambda m, h: F.scaled_dot_product_attention(h, h, h, dropout_p=0.5), "dropout_p > 0 is random"),
    (lambda m, h: m.attn(h, h.flip(1), h.flip(1), need_weights=False)[0], "self-attention only"),
    (lambda m, h: m.attn(h, h, h, key_padding_mask=m.mask[:, 0].expand(2, T))[0], "key_padding_mask"),
    (lambda m, h: m.attn(h, h, h)[1], "attention weights"),
    (lambda m, h: (h @ h.transpose(1, 2)).masked_fill(h[:, :, :1] > 0, 0.0), "needs a constant mask"),
    (lambda m, h: (h @ h.transpose(1, 2)) + torch.ones(T, T), "only for a mask of 0 and -inf"),
    (lambda m, h: h @ m.w, "a parameter operand is a Linear layer"),
    (lambda m, h: torch.einsum("...d,...e->...de", h, h), "without '...'"),
    (lambda m, h: h.softmax(0), "over the batch axis"),
    (lambda m, h: (h @ h.transpose(1, 2)).masked_fill(torch.eye(T, dtype=torch.bool).repeat(2, 1, 1)
                                          & torch.tensor([True, False]).view(2, 1, 1), 0.0), "differs between samples"),
])
def test_unsupported_attention_forms_are_refused_clearly(forward, fragment):
    _refusal(forward, fragment)
