"""Every aggregator against hand-computed values, its invariants and the dense references.

float64 throughout; layers are non-square (d_out != d_in) so a transposed product cannot pass.
"""
import pytest
import torch

from aggregators import (AGGREGATORS, Update, eq8_minimiser, eq8_objective, fedex, fedit, fedsa, ffa, flexlora,
                         flora, florist, get_aggregator, hetlora, lorafair, rbla, rolora)
from states import applied_update, bias_bounds, diagnostics
from tests.reference import (dense_dW, dense_flexlora, dense_florist, dense_hetlora, dense_lorafair, dense_rbla,
                             dense_spectral)

D_OUT, D_IN, R = 9, 7, 2
OPTS = {"rolora": {"phase": "A"}, "florist": {"tau": 1.0}}


def eq8_minimum(A, B, w, lam):
    """The lowest value of Eq. 8 the plain dense L-BFGS finds (aggregators.eq8_minimiser)."""
    return eq8_objective(A, B, w, eq8_minimiser(A, B, w, lam), lam).item()


def clients(K=3, lead=(), r=R, d_out=D_OUT, d_in=D_IN, seed=0, method=None, device="cpu"):
    """Random client factors A: (*lead, K, r, d_in), B: (*lead, K, d_out, r) and weights w: (K,).

    For ffa, fedsvd and frlora the clients share one A; for rolora (phase 'A') one B, as those
    methods require.
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead, K, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, K, d_out, r, generator=g, dtype=torch.float64)
    if method in ("ffa", "fedsvd", "frlora"):
        A = A[..., :1, :, :].expand_as(A).clone()
    if method == "rolora":
        B = B[..., :1, :, :].expand_as(B).clone()
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return A.to(device), B.to(device), (w / w.sum()).to(device)


def avg(X, w):
    return sum(w[k] * X[..., k, :, :] for k in range(X.shape[-3]))


def product(u: Update, A, B, w):
    """The global model's adapter contribution B A + delta_w (None factors as in applied_update)."""
    return applied_update(u, A, B, w)


def run(method, A, B, w, **kw):
    if method == "frlora" and A.dim() >= 3 and A.shape[-3] > 0:   # an initial adapter, whatever the client order
        kw = {"A_init": A.amax(-3), "B_init": 0.5 * B.amax(-3), **kw}
    return AGGREGATORS[method](A, B, w, **{**OPTS.get(method, {}), **kw})


def test_registry_names():
    assert list(AGGREGATORS) == ["fedit", "ffa", "flora", "flexlora", "fedex", "fedsa", "rolora", "lorafair",
                                 "hetlora", "rbla", "florist", "fedsvd", "spectral", "frlora"]
    with pytest.raises(ValueError, match="unknown method 'fedavg'.*fedit"):
        get_aggregator("fedavg")


def test_hand_computed_two_clients():
    # client 1 adapts input 0 -> output 0, client 2 input 1 -> output 1 (r = 1, d_out = 3, d_in = 2)
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)        # (2, 1, 2)
    B = torch.tensor([[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.0]]], dtype=torch.float64)  # (2, 3, 1)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    u = fedit(A, B, w)
    assert torch.equal(u.A, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert torch.equal(u.B, torch.tensor([[0.5], [0.5], [0.0]], dtype=torch.float64))
    dW = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(flora(A, B, w).delta_w, dW)
    # FedIT's product smears both updates over both inputs: the aggregation bias of Eq. 6
    assert torch.equal(u.B @ u.A, torch.tensor([[0.25, 0.25], [0.25, 0.25], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(fedex(A, B, w).delta_w, dW - u.B @ u.A)
    # the best rank-1 approximation of diag(0.5, 0.5) keeps one direction: error 0.5 in Frobenius norm
    f = flexlora(A, B, w)
    assert torch.linalg.matrix_norm(dW - f.B @ f.A).item() == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_permutation_invariance(method):
    A, B, w = clients(K=4, method=method)
    perm = torch.tensor([2, 0, 3, 1])
    u, v = run(method, A, B, w), run(method, A[perm], B[perm], w[perm])
    for x, y in zip(u, v):
        assert (x is None) == (y is None)
        if x is not None and method not in ("flexlora", "florist", "spectral"):  # SVD factors: up to sign
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(product(u, A, B, w), product(v, A[perm], B[perm], w[perm]), rtol=1e-9, atol=1e-9)


# For one client (or identical ones), at every method's defaults: which leave the adapter as it is
KEEPS_FACTORS = ("fedit", "ffa", "fedex", "fedsa", "rolora", "lorafair", "hetlora", "rbla")   # bit for bit up to 1e-12
KEEPS_PRODUCT = ("flora", "flexlora", "fedsvd", "frlora")   # B A + delta_w kept, the factors replaced (FLoRA: restarted)


def test_the_identity_lists_cover_the_registry():
    assert set(KEEPS_FACTORS) | set(KEEPS_PRODUCT) | {"florist", "spectral"} == set(AGGREGATORS)


@pytest.mark.parametrize("identical", [1, 4])
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_one_client_at_the_defaults(method, identical):
    """One client, or `identical` copies of it at unequal weights, through each method at its
    defaults (rolora needs a phase): which methods are the identity, and how the others are not."""
    A, B, _ = clients(K=1, r=6, method=method)
    A, B = A.expand(identical, -1, -1).clone(), B.expand(identical, -1, -1).clone()
    w = torch.arange(1, identical + 1, dtype=torch.float64)
    w = w / w.sum()
    kw = {"phase": "B"} if method == "rolora" else {}
    if method == "frlora":                                      # an initial adapter other than the client's
        kw = {"A_init": torch.ones_like(A[0]), "B_init": torch.ones_like(B[0])}
    u = AGGREGATORS[method](A, B, w, **kw)
    mine = B[0] @ A[0]
    if method in KEEPS_FACTORS:
        torch.testing.assert_close(u.A, A[0], rtol=0, atol=1e-12)
        if method != "fedsa":                                   # fedsa: the client keeps its own B
            torch.testing.assert_close(u.B, B[0], rtol=0, atol=1e-12)
        assert u.delta_w is None or u.delta_w.abs().max() < 1e-12
    elif method in KEEPS_PRODUCT:
        torch.testing.assert_close(product(u, A, B, w), mine, rtol=1e-10, atol=1e-10)
        if method == "flora":
            assert u.A is None and u.B is None                  # a fresh LoRA next round
        else:                                                   # the SVD's factors, not the client's
            assert (u.A - A[0]).norm() > 0.5 * A[0].norm() and (u.B - B[0]).norm() > 0.5 * B[0].norm()
    elif method == "spectral":                                  # the best rank-m approximation, m ScreeNOT's
        want, m = dense_spectral(A, B, w)
        assert int((u.B.norm(dim=0) > 0).sum()) == min(int(m), 6) < 6    # ScreeNOT drops some of the 6 here
        torch.testing.assert_close(u.B @ u.A, want, rtol=1e-10, atol=1e-10)
    else:                                                       # florist at tau 0.9 drops energy
        want, m = dense_florist(A, B, w, 0.9)
        assert m < 6
        torch.testing.assert_close(u.delta_w, want, rtol=1e-9, atol=1e-9)
        S = torch.linalg.svdvals(mine)
        rel = S[m:].square().sum().sqrt() / S.square().sum().sqrt()   # what it drops, in ||.||_F
        assert (u.delta_w - mine).norm() / mine.norm() == pytest.approx(rel.item(), rel=1e-9) and rel > 0.05


def test_weights_are_normalised_sums():
    A, B, w = clients(K=3)
    torch.testing.assert_close(fedit(A, B, w).A, avg(A, w))
    torch.testing.assert_close(fedit(A, B, w).B, avg(B, w))


def test_fedit_is_biased():
    A, B, w = clients(K=3)
    u = fedit(A, B, w)
    dW = dense_dW(A, B, w)
    assert torch.linalg.matrix_norm(u.B @ u.A - dW) > 0.1 * torch.linalg.matrix_norm(dW)


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_flora_and_fedex_are_exact(method):
    A, B, w = clients(K=5)
    W = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    u = run(method, A, B, w)
    ideal = sum(w[k] * (W + B[k] @ A[k]) for k in range(5))
    BA = u.B @ u.A if u.B is not None else 0
    torch.testing.assert_close(W + u.delta_w + BA, ideal, rtol=1e-12, atol=1e-12)
    if method == "fedex":
        torch.testing.assert_close(u.A, avg(A, w)), torch.testing.assert_close(u.B, avg(B, w))
    else:
        assert u.A is None and u.B is None


def test_flexlora_is_the_best_rank_r_approximation():
    A, B, w = clients(K=4)
    u = flexlora(A, B, w)
    dW = dense_dW(A, B, w)
    S = torch.linalg.svdvals(dW)
    err = torch.linalg.matrix_norm(dW - u.B @ u.A)
    torch.testing.assert_close(err, S[R:].square().sum().sqrt(), rtol=1e-10, atol=1e-12)  # Eckart-Young
    a, b = dense_flexlora(A, B, w)
    torch.testing.assert_close(u.B @ u.A, b @ a, rtol=1e-10, atol=1e-10)
    assert u.delta_w is None and u.A.shape == (R, D_IN) and u.B.shape == (D_OUT, R)
    # B = U_r diag(S_r), A = V_r^T: A has orthonormal rows, B's column norms are the singular values
    torch.testing.assert_close(u.A @ u.A.T, torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(u.B.norm(dim=0), S[:R], rtol=1e-10, atol=0)


def test_flexlora_is_exact_when_rank_of_dW_is_at_most_r():
    A, B, w = clients(K=3)
    A = A[:1].expand(3, -1, -1).clone()          # shared A: rank(dW) <= r
    u = flexlora(A, B, w)
    torch.testing.assert_close(u.B @ u.A, dense_dW(A, B, w), rtol=1e-10, atol=1e-12)


def test_ffa_is_exact_and_checks_A_is_shared():
    A, B, w = clients(K=3, method="ffa")
    u = ffa(A, B, w)
    assert torch.equal(u.A, A[0])
    torch.testing.assert_close(u.B @ u.A, dense_dW(A, B, w), rtol=1e-12, atol=1e-12)
    A[1, 0, 0] += 1e-3
    with pytest.raises(ValueError, match="ffa needs one frozen A"):
        ffa(A, B, w, layer="blocks.0.attn.proj")


@pytest.mark.parametrize("phase", ["A", "B"])
def test_rolora_is_exact_and_passes_the_frozen_factor_through(phase):
    A, B, w = clients(K=3)
    if phase == "A":
        B = B[:1].expand(3, -1, -1).clone()
    else:
        A = A[:1].expand(3, -1, -1).clone()
    u = rolora(A, B, w, phase=phase)
    torch.testing.assert_close(u.B @ u.A, dense_dW(A, B, w), rtol=1e-12, atol=1e-12)
    assert torch.equal(u.B, B[0]) if phase == "A" else torch.equal(u.A, A[0])
    with pytest.raises(ValueError, match="needs one"):
        rolora(*clients(K=3)[:2], w, phase=phase)
    with pytest.raises(ValueError, match="phase must be"):
        rolora(A, B, w, phase="AB")


def test_fedsa_leaves_B_to_each_client():
    A, B, w = clients(K=3)
    u = fedsa(A, B, w)
    assert u.B is None and u.delta_w is None
    torch.testing.assert_close(u.A, avg(A, w))


# ----------------------------------------------------------------------------- LoRA-FAIR

def cos_flat(X, Y):
    return ((X * Y).sum() / (X.norm() * Y.norm())).item()


def test_lorafair_improves_cosine_and_keeps_A_bar():
    A, B, w = clients(K=4)
    u = lorafair(A, B, w)
    dW = dense_dW(A, B, w)
    B_bar = avg(B, w)
    torch.testing.assert_close(u.A, avg(A, w))
    assert cos_flat(dW, u.B @ u.A) > cos_flat(dW, B_bar @ u.A) + 1e-3
    assert u.delta_w is None


def test_lorafair_large_lambda_gives_fedit():
    A, B, w = clients(K=4)
    B_bar = avg(B, w)
    sizes = [torch.linalg.matrix_norm(lorafair(A, B, w, lam=lam).B - B_bar).item()
             for lam in (0.01, 1.0, 90.0)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 1e-3 * torch.linalg.matrix_norm(B_bar).item()


def test_lorafair_identical_clients_give_zero_residual():
    A, B, _ = clients(K=1)
    A, B = A.expand(3, -1, -1).clone(), B.expand(3, -1, -1).clone()
    u = lorafair(A, B, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert (u.B - B[0]).abs().max() < 1e-12


@pytest.mark.parametrize("similarity", ["flat", "column"])
def test_lorafair_lambda_zero_reaches_the_least_squares_bound(similarity):
    # With lam = 0 the best B' is the least-squares fit of dW on A_bar's row space, B* = dW A_bar^T G^-1;
    # the flat cosine can reach ||dW P|| / ||dW|| (P the projector onto that row space) and no more.
    A, B, w = clients(K=4, seed=3)
    dW, A_bar = dense_dW(A, B, w), avg(A, w)
    B_star = dW @ A_bar.T @ torch.linalg.inv(A_bar @ A_bar.T)
    u = (lorafair(A, B, w, lam=0.0) if similarity == "flat" else
         lorafair(A, B, w, solver="sgd", lam=0.0, steps=3000, lr=2.0, similarity=similarity))
    if similarity == "flat":
        bound = cos_flat(dW, B_star @ A_bar)
        got = cos_flat(dW, u.B @ u.A)
        assert got <= bound + 1e-12 and got > bound - 1e-12
    else:  # the column objective is maximised too, and never above 1
        from tests.reference import dense_cos
        got = dense_cos(dW, u.B @ u.A, "column").item()
        assert got > dense_cos(dW, avg(B, w) @ A_bar, "column").item() and got <= 1


@pytest.mark.parametrize("K", [3, 30])   # K r (d_out + d_in) > d_out d_in: C and ||dW|| from each layer's dense dW
@pytest.mark.parametrize("init", ["zeros", "xavier"])
@pytest.mark.parametrize("similarity", ["flat", "column"])
def test_lorafair_factored_equals_dense(init, similarity, K):
    A, B, w = clients(K=K, lead=(2,), d_out=24, d_in=17, r=3)
    u = lorafair(A, B, w, solver="sgd", steps=300, init=init, similarity=similarity)
    a, b = dense_lorafair(A, B, w, steps=300, init=init, similarity=similarity)
    torch.testing.assert_close(u.A, a, rtol=0, atol=1e-14)
    dB = b - avg(B, w)
    assert torch.linalg.matrix_norm(u.B - b).max() < 1e-6 * torch.linalg.matrix_norm(dB).min()


@pytest.mark.parametrize("K", [3, 30])
@pytest.mark.parametrize("correct", ["A", "both"])
@pytest.mark.parametrize("similarity", ["flat", "column"])
def test_lorafair_correcting_A_or_both_factored_equals_dense(correct, similarity, K):
    A, B, w = clients(K=K, lead=(2,), d_out=24, d_in=17, r=3)
    u = lorafair(A, B, w, solver="sgd", steps=200, correct=correct, similarity=similarity, init="xavier", lr=0.05)
    a, b = dense_lorafair(A, B, w, steps=200, correct=correct, similarity=similarity, init="xavier", lr=0.05)
    A_bar, B_bar = avg(A, w), avg(B, w)
    assert torch.linalg.matrix_norm(u.A - a).max() < 1e-6 * torch.linalg.matrix_norm(a - A_bar).min()
    if correct == "A":
        torch.testing.assert_close(u.B, B_bar, rtol=1e-13, atol=1e-15)
    else:
        assert torch.linalg.matrix_norm(u.B - b).max() < 1e-6 * torch.linalg.matrix_norm(b - B_bar).min()
    v = lorafair(A, B, w, solver="sgd", steps=300, correct=correct, similarity=similarity, lr=0.05)
    dW = dense_dW(A, B, w)
    for i in range(2):
        assert cos_flat(dW[i], v.B[i] @ v.A[i]) > cos_flat(dW[i], B_bar[i] @ A_bar[i])


def test_lorafair_rejects_bad_options():
    A, B, w = clients()
    for kw, msg in [({"lam": 200.0, "solver": "sgd"}, "diverge"), ({"init": "normal"}, "init"), ({"similarity": "row"}, "similarity"),
                    ({"lr": 0.0}, "lr"), ({"steps": -1}, "steps"), ({"lam": -1.0}, "lam"), ({"correct": "AB"}, "correct")]:
        with pytest.raises(ValueError, match=msg):
            lorafair(A, B, w, **kw)


def test_lorafair_seeded_xavier_is_reproducible():
    A, B, w = clients()
    u1, u2 = (lorafair(A, B, w, solver="sgd", init="xavier", steps=10, seed=5) for _ in range(2))
    assert torch.equal(u1.B, u2.B)
    assert not torch.equal(u1.B, lorafair(A, B, w, solver="sgd", init="xavier", steps=10, seed=6).B)


def test_xavier_noise_is_drawn_per_layer_by_name():
    """Two layers of the same (d_out, r) (a ViT's attn.proj and mlp.fc2) never share noise, and a
    layer's noise is the same whether it is aggregated alone or batched with others."""
    A, B, w = clients(K=3, lead=(2,))
    A, B = A.clone(), B.clone()
    A[1], B[1] = A[0], B[0]                                     # two identical layers...
    names = ["blocks.0.attn.proj", "blocks.0.mlp.fc2"]
    u = lorafair(A, B, w, solver="sgd", init="xavier", steps=0, seed=5, layer=names)
    fedit_B = fedit(A, B, w).B
    noise = u.B - fedit_B                                        # steps=0: the residual is the noise itself
    assert not torch.allclose(noise[0], noise[1])               # ...get different noise
    bound = (6 / (D_OUT + R)) ** 0.5
    assert noise.abs().max() <= bound and noise.abs().max() > 0.5 * bound
    alone = lorafair(A[1], B[1], w, solver="sgd", init="xavier", steps=0, seed=5, layer=names[1])
    # the noise is drawn bit for bit alike; B_bar, a batched vs a single product, may differ in its
    # last bits on some CPUs (ATEN_CPU_CAPABILITY, MKL_CBWR), so: a few float64 ulps of |B|
    ulps = 8 * torch.finfo(torch.float64).eps * B.abs().max().item()
    torch.testing.assert_close(alone.B, u.B[1], rtol=0, atol=ulps)
    torch.testing.assert_close(alone.B - fedit(A[1], B[1], w).B, noise[1], rtol=0, atol=ulps)
    assert (noise[1] - noise[0]).abs().max() > 1e3 * ulps                 # far apart, as drawn by name


# ----------------------------------------------------------------------------- batching, devices

@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_batched_equals_per_layer_loop(method):
    A, B, w = clients(K=3, lead=(2, 3), method=method)
    names = [f"blocks.{i}.mlp{j}" for i in range(2) for j in range(3)]      # random draws follow the layer name
    u = run(method, A, B, w, layer=names)
    for i in range(2):
        for j in range(3):
            v = run(method, A[i, j], B[i, j], w, layer=names[3 * i + j])
            for x, y in zip(u, v):
                if x is not None:
                    torch.testing.assert_close(x[i, j], y, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_cpu_equals_cuda(method):
    A, B, w = clients(K=3, lead=(2,), method=method)
    u = run(method, A, B, w)
    v = run(method, A.cuda(), B.cuda(), w.cuda())
    torch.testing.assert_close(product(v, A.cuda(), B.cuda(), w.cuda()).cpu(), product(u, A, B, w),
                               rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("method", list(AGGREGATORS))
@pytest.mark.parametrize("weights, msg", [
    ([0.5, 0.6, -0.1], ">= 0"), ([0.5, float("nan"), 0.5], "NaN"), ([0.3, 0.3, 0.3], "sum to"),
    ([0.5, 0.5], "2 client weights for 3 clients"),
])
def test_bad_weights(method, weights, msg):
    A, B, _ = clients(K=3, method=method)
    with pytest.raises(ValueError, match=msg):
        run(method, A, B, torch.tensor(weights, dtype=torch.float64), layer="blocks.0.mlp.fc2")


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_bad_shapes_and_values(method):
    A, B, w = clients(K=3, lead=(2,), method=method)
    names = ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    with pytest.raises(ValueError, match="rank mismatch"):
        run(method, A, B[..., :1], w, layer=names)
    with pytest.raises(ValueError, match="disagree"):
        run(method, A, B[:, :2], w, layer=names)
    with pytest.raises(ValueError, match="K = 0"):
        run(method, A[:, :0], B[:, :0], w[:0], layer=names)
    with pytest.raises(ValueError, match="expected A"):
        run(method, A[0, 0], B[0, 0], w, layer=names)
    with pytest.raises(ValueError, match="rank r = 8"):
        run(method, torch.zeros(3, 8, 7, dtype=torch.float64), torch.zeros(3, 9, 8, dtype=torch.float64), w)
    for X in (A, B):
        X[1, 2, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"blocks.1.attn.proj: client 2's [AB] contains NaN/Inf"):
            run(method, A, B, w, layer=names)
        X[1, 2, 0, 0] = 0.0


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("method", list(AGGREGATORS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_aggregated_in_float32_and_returned_in_its_dtype(method, dtype):
    A, B, _ = clients(K=3, lead=(2,), method=method)
    A, B = A.to(dtype), B.to(dtype)
    w = torch.tensor([3, 5, 7], dtype=dtype) / 15        # in bf16 these sum to 1.0039, not 1
    u = run(method, A, B, w)
    ref = run(method, A.float(), B.float(), w.double() / w.double().sum())   # the same inputs, in float32
    for got, want in zip(u, ref):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("method", ["flora", "fedex", "fedit"])
def test_gradients_flow_through_the_aggregate(method):
    """Factors that require grad (live parameters) are differentiated through: the dense update's
    gradient equals the finite-difference one (torch.autograd.gradcheck, float64)."""
    A, B, w = clients(K=3, lead=(2,), d_out=5, d_in=4, r=2)
    A, B = A.requires_grad_(), B.requires_grad_()

    def f(A, B):
        u = AGGREGATORS[method](A, B, w)
        return u.delta_w if u.delta_w is not None else u.B @ u.A
    assert torch.autograd.gradcheck(f, (A, B))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10),
                                        (torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_fedex_is_exact_to_the_dtypes_precision(dtype, tol):
    A, B, _ = clients(K=4, d_out=64, d_in=48, r=4)
    A, B = A.to(dtype), B.to(dtype)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4 - 5e-7], dtype=torch.float64)   # off by rounding: accepted, renormalised
    u = fedex(A, B, w)
    p = (w / w.sum()).to(torch.float64)
    dW = dense_dW(A.double(), B.double(), p)
    got = u.B.double() @ u.A.double() + u.delta_w.double()
    assert ((got - dW).norm() / dW.norm()).item() < tol


# ----------------------------------------------------------------------------- heterogeneous ranks

RANKS = [1, 3, 2, 4]


def hetero_clients(ranks=RANKS, R=4, d_out=D_OUT, d_in=D_IN, method=None, seed=0):
    """Factors zero-padded to R: client k holds the leading ranks[k] rows of A_k, columns of B_k.
    ffa (and rolora phase 'B'): one shared A, each client holding its leading rows of it."""
    g = torch.Generator().manual_seed(seed)
    K = len(ranks)
    A = torch.randn(K, R, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(K, d_out, R, generator=g, dtype=torch.float64)
    if method in ("ffa", "rolora", "fedsvd"):
        A = A[:1].expand(K, -1, -1).clone()
    keep = (torch.arange(R) < torch.tensor(ranks)[:, None]).double()          # (K, R)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return A * keep[:, :, None], B * keep[:, None, :], w / w.sum()


def truncated(X, r, columns=False):
    return X[..., :, :r] if columns else X[..., :r, :]


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_equal_ranks_change_nothing(method):
    A, B, w = clients(K=3, method=method)
    u, v = run(method, A, B, w), run(method, A, B, w, ranks=[R] * 3)
    for x, y in zip(u, v):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_padding_must_be_zero_and_ranks_valid(method):
    A, B, w = hetero_clients(method=method)
    A[0, 2, 0] = 1.0                                   # client 0 has rank 1: row 2 is padding
    with pytest.raises(ValueError, match=r"layer: client 0's A is not zero beyond its rank r_k = 1 \(rows 1..3\)"):
        run(method, A, B, w, ranks=RANKS)
    A, B, w = hetero_clients(method=method)
    B[2, 0, 3] = 1.0
    with pytest.raises(ValueError, match=r"client 2's B is not zero beyond its rank r_k = 2 \(columns 2..3\)"):
        run(method, A, B, w, ranks=RANKS)
    for bad, msg in (([1, 3, 2], "ranks must be 4 integers"), ([0, 3, 2, 4], "ranks must be in 1..R = 4"),
                     ([1, 3, 2, 5], "ranks must be in 1..R = 4"), ([1.0, 3.0, 2.0, 4.0], "ranks must be 4 integers")):
        with pytest.raises(ValueError, match=msg):
            run(method, A * 0, B * 0, w, ranks=bad)


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_exact_methods_stay_exact_with_heterogeneous_ranks(method):
    A, B, w = hetero_clients()
    dW = sum(w[k] * truncated(B[k], r, True) @ truncated(A[k], r) for k, r in enumerate(RANKS))
    u = run(method, A, B, w, ranks=RANKS)
    torch.testing.assert_close(product(u, A, B, w), dW, rtol=1e-12, atol=1e-12)
    assert u.delta_w.shape == (D_OUT, D_IN) and (u.A is None or u.A.shape == (4, D_IN))


@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("method", ["ffa", "rolora"])
def test_a_frozen_shared_factor_passes_through_at_rank_R(method, phase):
    if method == "ffa" and phase == "A":
        pytest.skip("ffa has one configuration")
    A, B, w = hetero_clients(method=method if phase == "B" or method == "ffa" else None)
    if method == "rolora" and phase == "A":          # B is the shared frozen factor
        B = B[3:4].expand(4, -1, -1).clone() * (torch.arange(4) < torch.tensor(RANKS)[:, None]).double()[:, None, :]
    kw = {"phase": phase} if method == "rolora" else {}
    u = AGGREGATORS[method](A, B, w, ranks=RANKS, **kw)
    dW = dense_dW(A, B, w)
    torch.testing.assert_close(u.B @ u.A, dW, rtol=1e-12, atol=1e-12)          # exact
    frozen, full = (u.A, A[3]) if phase == "B" else (u.B, B[3])                # client 3 has rank R = 4
    assert torch.equal(frozen, full)
    # averaging the frozen factor with the others' zero padding (as a public implementation does) misses dW
    naive = u.B @ avg(A, w) if phase == "B" else avg(B, w) @ u.A
    assert ((naive - dW).norm() / dW.norm()) > 0.1


def test_flexlora_truncations_are_each_clients_best_approximation():
    A, B, w = hetero_clients(R=4, d_out=12, d_in=10)
    u = flexlora(A, B, w, ranks=RANKS)
    U, S, Vh = torch.linalg.svd(dense_dW(A, B, w), full_matrices=False)
    for r in sorted(set(RANKS)):
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(truncated(u.B, r, True) @ truncated(u.A, r), best, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_p", [False, True])
def test_hetlora_against_the_dense_reference(use_p):
    A, B, w = hetero_clients()
    A, B = A.expand(2, -1, -1, -1).clone(), B.expand(2, -1, -1, -1).clone()   # two layers, one call
    B[1] *= torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None]   # other norms in layer 1
    u = hetlora(A, B, w, ranks=RANKS, use_p=use_p)
    A_ref, B_ref = dense_hetlora(A, B, w, use_p)
    torch.testing.assert_close(u.A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.B, B_ref, rtol=1e-12, atol=1e-12)
    zero = hetlora(A, B * 0, w, ranks=RANKS)                                  # no update anywhere: p_k
    torch.testing.assert_close(zero.A, torch.stack([avg(A[i], w) for i in range(2)]))


def test_rbla_against_the_dense_reference_and_fedit_at_equal_ranks():
    A, B, w = hetero_clients(ranks=[1, 3, 2, 3])                             # slot 3: no client
    u = rbla(A, B, w, ranks=[1, 3, 2, 3])
    A_ref, B_ref = dense_rbla(A, B, w, [1, 3, 2, 3])
    torch.testing.assert_close(u.A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.B, B_ref, rtol=1e-12, atol=1e-12)
    assert u.A[3].abs().max() == 0 and u.B[:, 3].abs().max() == 0
    assert u.A[0].abs().max() > 0.5 * A[0, 0].abs().max()                     # slot 0 not diluted by padding
    A, B, w = clients(K=3)
    v, f = rbla(A, B, w), fedit(A, B, w)
    torch.testing.assert_close(v.A, f.A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.B, f.B, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_florist_folds_the_energy_share_tau(tau):
    A, B, w = hetero_clients(R=4, d_out=12, d_in=10)
    u = florist(A, B, w, ranks=RANKS, tau=tau)
    want, m = dense_florist(A, B, w, tau)
    assert u.A is None and u.B is None                                       # clients restart from a fresh LoRA
    torch.testing.assert_close(u.delta_w, want, rtol=1e-9, atol=1e-9)
    S = torch.linalg.svdvals(u.delta_w)
    assert int((S > 1e-9 * S[0]).sum()) == m                                 # rank m, the energy share's
    share = S[:m].square().sum() / torch.linalg.svdvals(dense_dW(A, B, w)).square().sum()
    assert share >= tau - 1e-12
    if tau == 1.0:                                   # all of dW, rank sum r_k = 10 > R = 4: not capped
        assert m == sum(RANKS) and torch.allclose(u.delta_w, dense_dW(A, B, w), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="florist tau must be in"):
        florist(A, B, w, tau=0.0)


def test_lorafair_refines_the_padded_average():
    A, B, w = hetero_clients()
    u = lorafair(A, B, w, solver="sgd", ranks=RANKS, steps=200)
    cos_fair, *_ = diagnostics(u, A, B, w)
    cos_fedit, *_ = diagnostics(fedit(A, B, w, ranks=RANKS), A, B, w)
    assert cos_fair > cos_fedit and torch.equal(u.A, fedit(A, B, w).A)


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_unequal_adapter_scalings_are_aggregated_in_weight_units(method):
    """Four clients whose adapters add the same update to the weight, each at its own scale s_k
    (B_k = B / s_k, or A_k = A / s_k where B is rolora's frozen factor): every method must keep that
    update, and each client's start, at its own scale, must give the global one."""
    from aggregators import client_factors, rescaled
    s = torch.tensor([2.0, 4.0, 8.0, 4.0], dtype=torch.float64)           # alpha_k / r_k
    A, B, w = clients(K=4, r=3, method="ffa")                               # one A ...
    B = B[:1].expand(4, -1, -1).clone()                                     # ... and one B, in weight units
    target = B[0] @ A[0]
    opts = OPTS.get(method, {})
    if method == "frlora":
        opts = {"A_init": A[0] * 0.5, "B_init": B[0] * 0.5}
    into_A = method == "rolora" and opts.get("phase") == "A"
    A_k, B_k = (A / s[:, None, None], B) if into_A else (A, B / s[:, None, None])
    u = rescaled(method, A_k, B_k, w, s, **opts)
    in_weight_units = (A_k * s[:, None, None], B_k) if into_A else (A_k, B_k * s[:, None, None])
    if method == "spectral":          # keeps the components ScreeNOT calls signal (the dense reference's)
        target = dense_spectral(*in_weight_units, w)[0]
    torch.testing.assert_close(applied_update(u, *in_weight_units, w), target, rtol=1e-9, atol=1e-9)
    if u.A is not None and u.B is not None:
        for k in range(4):
            a, b = client_factors(u, s[k].item(), phase="A" if into_A else None)
            torch.testing.assert_close(s[k] * b @ a, u.B @ u.A, rtol=1e-12, atol=1e-12)
    if method in ("fedit", "fedex", "lorafair", "rbla", "fedsa"):          # ignoring s_k mixes units
        naive = AGGREGATORS[method](A_k, B_k, w, **opts)
        assert (applied_update(naive, A_k, B_k, w) - target).norm() > 0.1 * target.norm()


# ----------------------------------------------------------------------------- LoRA-FAIR's closed form (lsq)

def dense_lsq(A, B, w, lam):
    """min ||dW - (B_bar + dB) A_bar||^2 / ||dW||^2 + lam ||dB||^2 as one stacked least-squares
    problem, dense and independent of the normal equations: [A_bar^T; sqrt(lam) ||dW|| I] dB^T =
    [R^T; 0], solved by torch.linalg.lstsq (gelsd: the minimum-norm solution when rank-deficient)."""
    dW = dense_dW(A, B, w)
    A_bar, B_bar = avg(A, w), avg(B, w)
    R = dW - B_bar @ A_bar                                                       # (d_out, d_in)
    r = A_bar.shape[-2]
    M = torch.cat([A_bar.mT, (lam ** 0.5) * dW.norm() * torch.eye(r, dtype=A.dtype)])   # (d_in + r, r)
    rhs = torch.cat([R.mT, torch.zeros(r, R.shape[0], dtype=A.dtype)])                   # (d_in + r, d_out)
    return B_bar + torch.linalg.lstsq(M, rhs, driver="gelsd").solution.mT


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.01, 1.0])
def test_lsq_equals_the_dense_least_squares_solution(lam):
    A, B, w = clients(K=4, d_out=11, d_in=8, r=3)
    u = lorafair(A, B, w, objective="lsq", lam=lam)
    torch.testing.assert_close(u.B, dense_lsq(A, B, w, lam), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(u.A, avg(A, w), rtol=0, atol=1e-14)


def test_lsq_at_lam_zero_is_the_projection_and_reaches_the_ceiling():
    A, B, w = clients(K=4, lead=(2,), d_out=11, d_in=8, r=3)
    u = lorafair(A, B, w, objective="lsq", lam=0.0)
    dW = dense_dW(A, B, w)
    A_bar = avg(A, w)
    P = A_bar.mT @ torch.linalg.inv(A_bar @ A_bar.mT) @ A_bar                    # full row rank
    torch.testing.assert_close(u.B @ u.A, dW @ P, rtol=1e-9, atol=1e-10)
    cos = lambda X, Y: (X * Y).sum((-2, -1)) / (X.flatten(-2).norm(dim=-1) * Y.flatten(-2).norm(dim=-1))  # noqa
    _, ceiling = bias_bounds(A, B, w)
    torch.testing.assert_close(cos(dW, u.B @ u.A), ceiling, rtol=1e-10, atol=1e-12)
    for steps, lr in ((1000, 0.01), (3000, 0.5)):                                # the paper's SGD never beats it
        sgd = lorafair(A, B, w, solver="sgd", steps=steps, lr=lr, lam=0.0)
        assert (cos(dW, sgd.B @ sgd.A) <= cos(dW, u.B @ u.A) + 1e-12).all()
    far = lorafair(A, B, w, objective="lsq", lam=1e12)                           # lam -> infinity: FedIT
    torch.testing.assert_close(far.B, avg(B, w), rtol=1e-9, atol=1e-9)


def test_lsq_with_a_rank_deficient_A_bar_is_the_minimum_norm_solution():
    A, B, w = clients(K=3, d_out=11, d_in=8, r=3)
    A[:, 2] = A[:, 1] * 0.5                                                      # row 2 of A_bar = row 1 / 2
    u = lorafair(A, B, w, objective="lsq", lam=0.0)
    ref = dense_lsq(A, B, w, 0.0)
    torch.testing.assert_close(u.B, ref, rtol=1e-8, atol=1e-9)
    A_bar = avg(A, w)
    assert torch.linalg.matrix_rank(A_bar @ A_bar.mT) == 2
    other = ref + torch.outer(torch.randn(11, dtype=torch.float64), torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(other @ A_bar, ref @ A_bar)                       # another solution, same product,
    assert (other - avg(B, w)).norm() > (u.B - avg(B, w)).norm()                 # larger residual dB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lsq_batched_and_in_every_dtype(dtype):
    A, B, w = clients(K=3, lead=(2, 3))
    u = lorafair(A.to(dtype), B.to(dtype), w, objective="lsq", lam=0.01)
    assert u.B.dtype == dtype
    for i in range(2):
        for j in range(3):
            ref = lorafair(A[i, j], B[i, j], w, objective="lsq", lam=0.01)
            torch.testing.assert_close(u.B[i, j].double(), ref.B, rtol=0.05 if dtype == torch.bfloat16 else 1e-4,
                                       atol=0.05 if dtype == torch.bfloat16 else 1e-4)
    with pytest.raises(ValueError, match="objective 'lsq' refines B only"):
        lorafair(A, B, w, objective="lsq", correct="A")
    with pytest.raises(ValueError, match="objective must be 'cosine' or 'lsq'"):
        lorafair(A, B, w, objective="l2")


def test_lsq_with_heterogeneous_ranks_refines_the_padded_average():
    A, B, w = hetero_clients()
    u = lorafair(A, B, w, ranks=RANKS, objective="lsq", lam=0.0)
    torch.testing.assert_close(u.B, lorafair(A, B, w, objective="lsq", lam=0.0).B)   # padding is zero
    _, ceiling = bias_bounds(A, B, w)
    cos, *_ = diagnostics(u, A, B, w)
    torch.testing.assert_close(cos, ceiling, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="client 0's A is not zero beyond its rank"):
        bad = A.clone()
        bad[0, -1, 0] = 1.0                                       # client 0 has rank RANKS[0] < R
        lorafair(bad, B, w, ranks=RANKS, objective="lsq")


@pytest.mark.parametrize("option", [{"steps": 5}, {"lr": 0.1}, {"init": "xavier"}, {"similarity": "column"}])
def test_lsq_refuses_the_sgd_options_it_would_ignore(option):
    A, B, w = clients()
    with pytest.raises(ValueError, match="closed form: solver, steps, lr, init and similarity do not apply"):
        lorafair(A, B, w, objective="lsq", **option)


# ----------------------------------------------------------------------------- Eq. 8 solved (solver='fixed-point')

def near_init(K, r=4, d_out=12, d_in=10, b_norm=1e-3, drift=0.05, seed=0, ranks=None):
    """Clients as in a real round: A_k near one shared init, B_k small (||B_k|| ~ b_norm); with
    ranks, zero-padded past each client's rank."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    A = A0 + drift * torch.randn(K, r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    B = b_norm * torch.randn(K, d_out, r, generator=g, dtype=torch.float64) / (d_out * r) ** 0.5
    if ranks is not None:
        keep = (torch.arange(r) < torch.tensor(ranks)[:, None]).double()              # (K, r)
        A, B = A * keep[:, :, None], B * keep[:, None, :]
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return A, B, w / w.sum()


def scale_ratio(A, B, w, B_new):
    """||B' A_bar|| / max(||B_bar A_bar||, ||dW||)."""
    A_bar = avg(A, w)
    return ((B_new.double() @ A_bar).norm() / max((avg(B, w) @ A_bar).norm(), dense_dW(A, B, w).norm())).item()


@pytest.mark.parametrize("K", [1, 6, 100])
@pytest.mark.parametrize("b_norm", [1e-8, 1e-4, 1e-2, 1.0, 1e2])
def test_eq8_solved_never_worse_than_no_correction_and_never_inflated(b_norm, K):
    A, B, w = near_init(K, b_norm=b_norm, drift=0.3)
    u = lorafair(A, B, w)
    f0, f = (eq8_objective(A, B, w, X, 0.01).item() for X in (avg(B, w), u.B))
    assert f <= f0 + 1e-14
    assert scale_ratio(A, B, w, u.B) <= 2 * (1 + 1e-12)
    if K > 1 and b_norm <= 1e-2:                       # small B: Eq. 8 is about the direction, and reaches it
        assert f < f0 - 1e-6


@pytest.mark.parametrize("lam", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("b_norm, drift, K", [(1e-3, 0.05, 6), (1.0, 0.5, 6), (1e-2, 1.0, 30), (10.0, 0.2, 2)])
def test_eq8_fixed_point_reaches_the_minimum_a_dense_lbfgs_finds(b_norm, drift, K, lam):
    A, B, w = near_init(K, r=4, d_out=16, d_in=12, b_norm=b_norm, drift=drift)
    f = eq8_objective(A, B, w, lorafair(A, B, w, lam=lam).B, lam).item()
    assert f <= eq8_minimum(A, B, w, lam) + 1e-12


@pytest.mark.parametrize("b_norm", [1e-6, 1e-3, 1.0])
def test_eq8_with_heterogeneous_ranks_is_the_unpadded_solution(b_norm):
    """Ranks 1, 2, 2 padded to R = 4: slots 2 and 3 belong to nobody and stay zero; slots 0, 1 are
    what the same clients give unpadded at R = 2."""
    A, B, w = near_init(3, r=4, ranks=[1, 2, 2], b_norm=b_norm, drift=0.3)
    u = lorafair(A, B, w, ranks=[1, 2, 2])
    small = lorafair(A[:, :2].contiguous(), B[:, :, :2].contiguous(), w, ranks=[1, 2, 2])
    torch.testing.assert_close(u.B[:, :2], small.B, rtol=1e-9, atol=1e-15)
    assert u.B[:, 2:].abs().max() <= 1e-12 * u.B.abs().max()
    f0, f = (eq8_objective(A, B, w, X, 0.01).item() for X in (avg(B, w), u.B))
    assert f < f0 and scale_ratio(A, B, w, u.B) <= 2


@pytest.mark.parametrize("b_norm", [1e-3, 1e-2, 1.0])      # (fp16 underflows B below ~1e-5)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eq8_in_half_precision_keeps_the_guarantee_to_the_dtype_rounding(dtype, b_norm):
    A, B, w = near_init(6, b_norm=b_norm, drift=0.3)
    A, B = A.to(dtype), B.to(dtype)
    u = lorafair(A, B, w)
    eps = torch.finfo(dtype).eps
    assert u.B.dtype == dtype
    f0, f = (eq8_objective(A, B, w, X, 0.01).item() for X in (avg(B.double(), w), u.B))
    assert f <= f0 + 4 * eps and scale_ratio(A.double(), B.double(), w, u.B) <= 2 * (1 + 4 * eps)


def test_eq8_where_B_bar_A_bar_is_zero_follows_its_rule():
    """B_bar = 0 while dW != 0 (two clients' B cancel): Eq. 8 has no minimiser, and the rule gives
    the least-squares B' = C G^+, whose product is dW's projection onto A_bar's rows."""
    A, B, _ = near_init(2, drift=0.5, b_norm=1.0)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    B[1] = -B[0] * (0.25 / 0.75)
    assert avg(B, w).abs().max() < 1e-15 and dense_dW(A, B, w).norm() > 0.1
    u = lorafair(A, B, w)
    A_bar, dW = avg(A, w), dense_dW(A, B, w)
    P = A_bar.T @ torch.linalg.pinv(A_bar @ A_bar.T) @ A_bar
    torch.testing.assert_close(u.B @ A_bar, dW @ P, rtol=1e-9, atol=1e-12)


def test_eq8_at_lam_zero_is_the_ceiling_at_the_scale_of_B_bar():
    A, B, w = near_init(6, drift=0.3)
    u = lorafair(A, B, w, lam=0.0)
    A_bar, dW, B_bar = avg(A, w), dense_dW(A, B, w), avg(B, w)
    star = dW @ A_bar.T @ torch.linalg.pinv(A_bar @ A_bar.T)
    torch.testing.assert_close(u.B, star * (star * B_bar).sum() / star.square().sum(), rtol=1e-10, atol=1e-15)


def test_the_published_sgd_makes_eq8_worse_where_the_fixed_point_does_not():
    """The measured defect, kept as a fact: from a small B_bar, 1000 SGD steps at lr 0.01 inflate
    B' A_bar far past dW and end above Eq. 8 at dB = 0; the default solver does neither."""
    A, B, w = near_init(6, r=8, d_out=64, d_in=64, b_norm=1e-3, drift=0.05)
    f0 = eq8_objective(A, B, w, avg(B, w), 0.01).item()
    sgd, fixed = lorafair(A, B, w, solver="sgd"), lorafair(A, B, w)
    assert eq8_objective(A, B, w, sgd.B, 0.01).item() > f0 and scale_ratio(A, B, w, sgd.B) > 10
    assert eq8_objective(A, B, w, fixed.B, 0.01).item() < f0 and scale_ratio(A, B, w, fixed.B) < 1.01


def test_fixed_point_refuses_the_options_of_sgd():
    A, B, w = clients()
    for kw in ({"lr": 0.1}, {"init": "xavier"}, {"similarity": "column"}, {"correct": "A"}):
        with pytest.raises(ValueError, match="pass solver='sgd' for them"):
            lorafair(A, B, w, **kw)
    with pytest.raises(ValueError, match="solver must be 'fixed-point' or 'sgd'"):
        lorafair(A, B, w, solver="adam")


@pytest.mark.parametrize("seed", range(4))
def test_eq8_where_B_bar_A_bar_points_away_from_dW(seed):
    """cos(dW, B_bar A_bar) < 0 (two clients whose B nearly cancel, the larger one pointing away):
    the solver still reaches the minimum a dense L-BFGS finds, far below Eq. 8 at dB = 0."""
    A, B, _ = near_init(2, drift=0.3, b_norm=1.0, seed=seed)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    A[0] = 1.5 * A[0]                                  # B_bar = -0.05 B_1 and dW ~ B_1 (1.5 A_1 - 1.1 A_2) / 2
    B[1] = -1.1 * B[0] + 0.01 * B[1]
    B_bar, A_bar, dW = avg(B, w), avg(A, w), dense_dW(A, B, w)
    assert (dW * (B_bar @ A_bar)).sum() < 0                               # the case meant
    u = lorafair(A, B, w)
    f0, f = (eq8_objective(A, B, w, X, 0.01).item() for X in (B_bar, u.B))
    assert f < f0 - 1.0 and f <= eq8_minimum(A, B, w, 0.01) + 1e-8
    assert eq8_objective(A, B, w, lorafair(A, B, w, steps=50).B, 0.01).item() <= eq8_minimum(A, B, w, 0.01) + 1e-12


def test_eq8_cap_is_the_best_point_left_on_the_ray():
    """With the cap c lowered below the minimiser's scale, the result is capped at c max(...) and
    is the best capped point on its ray (f is convex there), still below Eq. 8 at dB = 0."""
    from aggregators import _fair_inputs, _flat_terms, eq8_fixed_point
    A, B, w = near_init(6, b_norm=1e-3, drift=0.3)
    A_bar, B_bar, U, V = _fair_inputs(A, B, w)
    C, G, nX = _flat_terms(U, V, A_bar, 1e-300)
    free = B_bar + eq8_fixed_point(B_bar, C, G, nX, 0.01)
    capped = B_bar + eq8_fixed_point(B_bar, C, G, nX, 0.01, c=0.5)
    bound = 0.5 * max((B_bar @ A_bar).norm(), nX)
    assert (free @ A_bar).norm() > bound * 1.5                            # the cap binds here
    torch.testing.assert_close((capped @ A_bar).norm(), bound, rtol=1e-12, atol=0)
    f = lambda X: eq8_objective(A, B, w, X, 0.01).item()                     # noqa: E731
    assert all(f(capped) <= f(capped * t) + 1e-15 for t in (0.5, 0.9, 0.99))   # smaller on the ray: worse
    assert f(capped) < f(B_bar)
