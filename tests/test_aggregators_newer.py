"""FedSVD, SpecTraL and FRLoRA against dense float64 references of their definitions, their
invariants, and (ScreeNOT) the authors' own package. The checks every method shares (weights,
shapes, dtypes, batching, scalings, padding) run on them in tests/test_aggregators.py."""
import numpy as np
import pytest
import torch

from aggregators import fedsvd, frlora, frlora_init, screenot_noise, screenot_threshold, spectral
from tests.reference import dense_dW, dense_fedsvd, dense_frlora, dense_spectral
from tests.test_aggregators import avg, clients, hetero_clients, truncated


def svd_truncation(M, m):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[..., :m] * S[..., None, :m]) @ Vh[..., :m, :]


# ----------------------------------------------------------------------------- FedSVD

@pytest.mark.parametrize("K, lead", [(1, ()), (3, ()), (6, (2,))])
def test_fedsvd_is_the_svd_of_the_averaged_product(K, lead):
    A, B, w = clients(K=K, lead=lead, method="fedsvd", d_out=12, d_in=10, r=3)
    u = fedsvd(A, B, w)
    A_ref, B_ref = dense_fedsvd(A, B, w)
    M = avg(B, w) @ A[..., 0, :, :]
    torch.testing.assert_close(u.B @ u.A, M, rtol=1e-12, atol=1e-12)                 # B A = B_bar A exactly
    torch.testing.assert_close(u.A @ u.A.mT, torch.eye(3, dtype=torch.float64).expand(*lead, 3, 3),
                               rtol=0, atol=1e-13)                                    # orthonormal rows
    sign = (u.A * A_ref).sum(-1)                                                      # (..., r): +-1 each
    torch.testing.assert_close(sign.abs(), torch.ones_like(sign), rtol=0, atol=1e-10)
    torch.testing.assert_close(u.A, A_ref * sign[..., None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u.B, B_ref * sign[..., None, :], rtol=1e-10, atol=1e-10)
    assert u.delta_w is None


def test_fedsvd_with_a_rank_deficient_product_keeps_orthonormal_rows():
    A, B, w = clients(K=3, method="fedsvd", d_out=12, d_in=10, r=4)
    B[..., 2:] = 0                                                                   # M has rank 2
    u = fedsvd(A, B, w)
    torch.testing.assert_close(u.A @ u.A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(u.B @ u.A, avg(B, w) @ A[0], rtol=1e-12, atol=1e-12)
    assert u.B[:, 2:].abs().max() < 1e-12                                           # zero singular values last


def test_fedsvd_truncations_are_each_clients_best_approximation():
    A, B, w = hetero_clients(R=4, d_out=12, d_in=10, method="fedsvd")
    u = fedsvd(A, B, w, ranks=[1, 3, 2, 4])
    M = avg(B, w) @ A[3]                                                             # client 3 holds all of A
    torch.testing.assert_close(u.B @ u.A, M, rtol=1e-12, atol=1e-12)
    for r in (1, 2, 3):
        torch.testing.assert_close(truncated(u.B, r, True) @ truncated(u.A, r), svd_truncation(M, r),
                                   rtol=1e-10, atol=1e-10)


def test_fedsvd_refuses_clients_that_trained_A():
    A, B, w = clients(K=3, d_out=12, d_in=10, r=3)                                  # every client its own A
    with pytest.raises(ValueError, match="fedsvd's clients train B only"):
        fedsvd(A, B, w)


# ----------------------------------------------------------------------------- ScreeNOT and SpecTraL

@pytest.mark.parametrize("strategy", ["i", "w", "0"])
@pytest.mark.parametrize("p, k, gamma", [(24, 6, 1.0), (40, 9, 0.5), (10, 2, 0.8), (7, 1, 7 / 9)])
def test_screenot_equals_the_authors_package(strategy, p, k, gamma):
    """The package of ScreeNOT's authors (numpy, one matrix at a time) on the same singular values,
    at scales 1e-3 to 30: the same pseudo-noise and the same threshold, bit for bit."""
    from screenot.ScreeNOT import computeOptThreshold, createPseudoNoise
    g = torch.Generator().manual_seed(p + k)
    s = torch.rand(4, p, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    s = s * torch.tensor([[1.0], [1e-3], [30.0], [0.2]], dtype=torch.float64)
    s[:, :3] *= 5                                                                     # a few signal components
    z = screenot_noise(s, k, strategy)
    tau = screenot_threshold(s, k, strategy, gamma)
    for i in range(4):
        zi = createPseudoNoise(s[i].numpy().copy(), k, strategy=strategy)
        assert np.array_equal(z[i].numpy(), zi)
        assert tau[i].item() == computeOptThreshold(zi, gamma)


def test_screenot_refuses_an_upper_bound_it_cannot_use():
    s = torch.linspace(3, 1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="2k \\+ 1 < p"):
        screenot_threshold(s, 3, "i")
    with pytest.raises(ValueError, match="k < p"):
        screenot_threshold(s, 6, "w")


@pytest.mark.parametrize("strategy", ["i", "w", "0"])
@pytest.mark.parametrize("ranks", [[4, 4, 4, 4, 4, 4], [1, 3, 2, 4]])
def test_spectral_is_dW_truncated_where_screenot_says(ranks, strategy):
    """Low-rank signal plus small noise in each client, so ScreeNOT has a bulk to find; ranks
    [1, 3, 2, 4] stack 10 slots (not 16 with the padding), which sets ScreeNOT's upper bound."""
    K, R, d = len(ranks), 4, 16
    A, B, w = hetero_clients(ranks=ranks, R=R, d_out=d, d_in=d, seed=3)
    g = torch.Generator().manual_seed(5)
    signal_B, signal_A = torch.randn(d, 2, generator=g, dtype=torch.float64), torch.randn(2, d, generator=g, dtype=torch.float64)
    keep = (torch.arange(R) < torch.tensor(ranks)[:, None]).double()
    A = (0.05 * A + torch.cat([signal_A, torch.zeros(R - 2, d, dtype=torch.float64)])) * keep[:, :, None]
    B = (0.05 * B + 3 * torch.cat([signal_B, torch.zeros(d, R - 2, dtype=torch.float64)], 1)) * keep[:, None, :]
    u = spectral(A, B, w, ranks=ranks, strategy=strategy, seed=7, layer="blocks.0.mlp.fc2")
    want, m = dense_spectral(A, B, w, ranks, strategy)
    torch.testing.assert_close(u.B @ u.A, want, rtol=1e-9, atol=1e-9)
    kept = min(int(m), R)
    assert int((u.B.norm(dim=0) > 0).sum()) == kept and u.delta_w is None
    for r in range(1, kept + 1):                                   # each client's truncation: its best approximation
        torch.testing.assert_close(truncated(u.B, r, True) @ truncated(u.A, r), svd_truncation(dense_dW(A, B, w), r),
                                   rtol=1e-9, atol=1e-9)


def test_spectral_pads_A_with_seeded_normal_rows_and_B_with_zeros():
    """One strong component in noise: ScreeNOT keeps few of R = 8 slots; the rest are A rows drawn
    N(0, 0.02^2) from (seed, layer) and B columns of zeros, so they add nothing yet can train."""
    g = torch.Generator().manual_seed(0)
    K, R, d = 6, 8, 64
    u_vec, v_vec = torch.randn(d, 1, generator=g, dtype=torch.float64), torch.randn(1, d, generator=g, dtype=torch.float64)
    A = 0.01 * torch.randn(K, R, d, generator=g, dtype=torch.float64)
    B = 0.01 * torch.randn(K, d, R, generator=g, dtype=torch.float64)
    A[:, 0], B[:, :, 0] = v_vec, u_vec.T * 10
    w = torch.full((K,), 1 / K, dtype=torch.float64)
    u = spectral(A, B, w, seed=3, layer="blocks.1.attn.proj")
    m = int((u.B.norm(dim=0) > 0).sum())
    assert 1 <= m < R and u.B[:, m:].abs().max() == 0
    pad = u.A[m:]
    assert 0.015 < pad.std().item() < 0.025 and abs(pad.mean().item()) < 0.005
    again = spectral(A, B, w, seed=3, layer="blocks.1.attn.proj")
    assert torch.equal(again.A, u.A) and torch.equal(again.B, u.B)                    # seeded
    other = spectral(A, B, w, seed=4, layer="blocks.1.attn.proj")
    assert not torch.equal(other.A[m:], pad) and torch.equal(other.A[:m], u.A[:m])
    with pytest.raises(ValueError, match="strategy 'i', 'w' or '0'"):
        spectral(A, B, w, strategy="x")


# ----------------------------------------------------------------------------- FRLoRA

def test_frlora_init_holds_the_top_components_and_keeps_the_weight():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    s, r = 2.0, 3
    A0, B0, rest = frlora_init(W, r, s)
    torch.testing.assert_close(rest + s * B0 @ A0, W, rtol=0, atol=1e-13)            # the layer computes W
    torch.testing.assert_close(s * B0 @ A0, svd_truncation(W, r), rtol=1e-12, atol=1e-12)
    S = torch.linalg.svdvals(W)[:r]
    torch.testing.assert_close(A0 @ A0.T, torch.diag(S / s), rtol=0, atol=1e-12)    # sqrt(S) on each factor
    torch.testing.assert_close(B0.T @ B0, torch.diag(S / s), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(rest)[:7], torch.linalg.svdvals(W)[r:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_A", [True, False])
def test_frlora_effective_weight_after_the_round(shared_A):
    """W0 + s delta_w + s B_init A_init = W0 + s B_bar A_bar, which is W0 + s sum_k p_k B_k A_k when
    the clients share A (as its clients do: they train B only); the adapter restarts at its init."""
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(2, 12, 10, generator=g, dtype=torch.float64)
    s = 0.5
    A_init, B_init, rest = zip(*(frlora_init(W0[i], 3, s) for i in range(2)))
    A_init, B_init, rest = torch.stack(A_init), torch.stack(B_init), torch.stack(rest)
    A, B, w = clients(K=4, lead=(2,), d_out=12, d_in=10, r=3, method="frlora" if shared_A else None)
    u = frlora(A, B, w, A_init=A_init, B_init=B_init)
    assert torch.equal(u.A, A_init) and torch.equal(u.B, B_init)
    after = rest + s * u.delta_w + s * u.B @ u.A
    want = dense_frlora(A, B, w, A_init, B_init) if shared_A else avg(B, w) @ avg(A, w) - B_init @ A_init
    torch.testing.assert_close(u.delta_w, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after, rest + s * avg(B, w) @ avg(A, w), rtol=1e-12, atol=1e-12)
    if shared_A:
        torch.testing.assert_close(after, rest + s * dense_dW(A, B, w), rtol=1e-12, atol=1e-12)


def test_frlora_refuses_what_it_does_not_define():
    A, B, w = hetero_clients(method="fedsvd")
    init = {"A_init": A[3], "B_init": B[3]}
    with pytest.raises(ValueError, match="one rank shared by every client"):
        frlora(A, B, w, ranks=[1, 3, 2, 4], **init)
    with pytest.raises(ValueError, match="needs A_init and B_init"):
        frlora(A, B, w)
    with pytest.raises(ValueError, match="must be shaped like one client's"):
        frlora(A, B, w, A_init=A[3, :2], B_init=B[3])


def test_spectral_keeps_every_component_where_screenot_has_too_few_to_work_on():
    """One client of rank 3 (3 singular values; ScreeNOT's imputation needs at least 4): its
    package raises there; SpecTraL here keeps them all, the client's own product."""
    A, B, w = clients(K=1, r=3, d_out=12, d_in=10)
    u = spectral(A, B, w)
    torch.testing.assert_close(u.B @ u.A, B[0] @ A[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="2k \\+ 1 < p"):
        screenot_threshold(torch.linalg.svdvals(B[0] @ A[0])[:3], 1, "i")

