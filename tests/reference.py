"""Dense reference implementations: the obvious d_out x d_in way, kept to check the fast ones.

They follow the paper's formulas literally (form dW, form (B_bar + dB) A_bar at every SGD step,
run a dense SVD), so any disagreement with aggregators.py is a bug in one of them.
"""
import math

import torch


def dense_dW(A, B, w):
    """dW = sum_k p_k B_k A_k, one client at a time: (..., d_out, d_in)."""
    return sum(w[k] * B[..., k, :, :] @ A[..., k, :, :] for k in range(A.shape[-3]))


def dense_cos(X, Y, similarity, eps=1e-8):
    if similarity == "flat":
        nX = X.flatten(-2).norm(dim=-1).clamp_min(eps)
        nY = Y.flatten(-2).norm(dim=-1).clamp_min(eps)
        return (X * Y).sum((-2, -1)) / (nX * nY)
    nX = X.norm(dim=-2).clamp_min(eps)   # one norm per column: (..., d_in)
    nY = Y.norm(dim=-2).clamp_min(eps)
    return ((X * Y).sum(-2) / (nX * nY)).mean(-1)


def dense_lorafair(A, B, w, *, steps=1000, lr=0.01, lam=0.01, init="zeros", similarity="flat", correct="B",
                   seed=0):
    """Eq. 8 by SGD, forming dW and (B_bar + dB)(A_bar + dA) densely at every step."""
    A_bar = torch.einsum("...krd,k->...rd", A, w)
    B_bar = torch.einsum("...kdr,k->...dr", B, w)
    dW = dense_dW(A, B, w)

    def start(X, s):
        if init == "zeros":
            return torch.zeros_like(X)
        # aggregators._xavier's stream for an unnamed batch: seeded by (seed, FNV-1a of the name "layer")
        h = 2166136261
        for byte in b"layer":
            h = ((h ^ byte) * 16777619) % 2**32
        g = torch.Generator().manual_seed((s * 1_000_003 + h) % 2**63)
        noise = torch.rand(X.shape, generator=g, dtype=torch.float64) * 2 - 1
        return (noise * math.sqrt(6.0 / (X.shape[-2] + X.shape[-1]))).to(X)
    dB = start(B_bar, seed).requires_grad_(correct != "A")
    dA = start(A_bar, seed + 1).requires_grad_(correct != "B")
    if correct == "A":
        dB = torch.zeros_like(B_bar)
    if correct == "B":
        dA = torch.zeros_like(A_bar)
    params = [x for x in (dB, dA) if x.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        Y = (B_bar + dB) @ (A_bar + dA)
        loss = (1 - dense_cos(dW, Y, similarity) + lam * sum((x ** 2).sum((-2, -1)) for x in params)).sum()
        loss.backward()
        opt.step()
    return (A_bar + dA).detach(), (B_bar + dB).detach()


def dense_flexlora(A, B, w):
    """Truncated SVD of the dense dW: B = U_r diag(S_r), A = V_r^T."""
    r = A.shape[-2]
    U, S, Vh = torch.linalg.svd(dense_dW(A, B, w), full_matrices=False)
    return Vh[..., :r, :], U[..., :r] * S[..., None, :r]


def dense_hetlora(A, B, w, use_p=False):
    """HetLoRA's norm-weighted average, each client's ||B_k A_k||_F from the dense product."""
    norms = torch.stack([(B[..., k, :, :] @ A[..., k, :, :]).flatten(-2).norm(dim=-1) for k in range(A.shape[-3])], -1)
    om = norms * w if use_p else norms
    om = om / om.sum(-1, keepdim=True)
    return (sum(om[..., k, None, None] * A[..., k, :, :] for k in range(A.shape[-3])),
            sum(om[..., k, None, None] * B[..., k, :, :] for k in range(A.shape[-3])))


def dense_rbla(A, B, w, ranks):
    """RBLA slot by slot: row i of A (column i of B) averaged over the clients with r_k > i."""
    A_g, B_g = torch.zeros_like(A[..., 0, :, :]), torch.zeros_like(B[..., 0, :, :])
    for i in range(A.shape[-2]):
        who = [k for k in range(A.shape[-3]) if ranks[k] > i]
        if who:
            total = sum(w[k] for k in who)
            A_g[..., i, :] = sum(w[k] * A[..., k, i, :] for k in who) / total
            B_g[..., :, i] = sum(w[k] * B[..., k, :, i] for k in who) / total
    return A_g, B_g


def dense_florist(A, B, w, tau):
    """The dense SVD of dW truncated to the fewest components holding a share tau of sum sigma^2
    (no cap): the update it folds into W0, and m."""
    U, S, Vh = torch.linalg.svd(dense_dW(A, B, w), full_matrices=False)
    share = (S ** 2).cumsum(-1) / (S ** 2).sum(-1, keepdim=True)
    m = int((share < tau - 1e-12).sum()) + 1
    return (U[..., :m] * S[..., None, :m]) @ Vh[..., :m, :], m


def dense_fedsvd(A, B, w):
    """FedSVD as its authors' reinit_lora writes it: the dense product of the averaged B and the
    shared A (client 0's), its SVD, A = V_r^T, B = U_r diag(S_r)."""
    r = A.shape[-2]
    B_bar = sum(w[k] * B[..., k, :, :] for k in range(B.shape[-3]))
    U, S, Vh = torch.linalg.svd(B_bar @ A[..., 0, :, :], full_matrices=False)
    return Vh[..., :r, :], U[..., :r] * S[..., None, :r]


def dense_spectral(A, B, w, ranks=None, strategy="i"):
    """SpecTraL's product from the dense dW, one layer at a time: ScreeNOT (its authors' package) on
    dW's singular values, as many as the stacked core has (min(d_out, d_in, sum r_k)), with the
    upper bound and aspect ratio SpecTraL gives it; dW's SVD truncated to min(m, R). Returns the
    product (..., d_out, d_in) and the ranks m (...,)."""
    from screenot.ScreeNOT import computeOptThreshold, createPseudoNoise
    dW = dense_dW(A, B, w)
    K, R = A.shape[-3], A.shape[-2]
    d_out, d_in = dW.shape[-2:]
    n = sum(ranks) if ranks is not None else K * R
    m1, m2 = min(d_out, n), min(d_in, n)
    mn = min(m1, m2)
    k = max(1, min(max(1, mn // 4), max(1, (mn - 2) // 2) if strategy == "i" else max(1, mn - 1)))
    flat, out, kept = dW.reshape(-1, d_out, d_in), [], []
    for M in flat:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        s = S[:mn].double().cpu().numpy()
        tau = computeOptThreshold(createPseudoNoise(s.copy(), k, strategy=strategy), min(m1 / m2, m2 / m1))
        m = max(1, int((s > tau).sum()))
        out.append((U[:, :min(m, R)] * S[:min(m, R)]) @ Vh[:min(m, R)])
        kept.append(m)
    return torch.stack(out).reshape(dW.shape), torch.tensor(kept).reshape(dW.shape[:-2])


def dense_frlora(A, B, w, A_init, B_init):
    """FRLoRA's fold, densely: sum_k p_k B_k A_k - B_init A_init (its clients share A, so dW is
    B_bar A_bar)."""
    return dense_dW(A, B, w) - B_init @ A_init

