"""Server-side aggregation of federated LoRA: one pure function per method.

Every method has the same contract, per LoRA layer (leading dims batch same-shape layers):

    fn(A, B, w, **options) -> Update(A, B, delta_w)

    A: (..., K, r, d_in)   the K participating clients' down-projections A_k
    B: (..., K, d_out, r)  their up-projections B_k
    w: (K,)                client weights p_k = n_k / sum_j n_j (finite, >= 0, summing to 1)

Heterogeneous ranks: every method takes `ranks` (K ints, None: all equal). Client k's factors are
then zero-padded to the common width R (A_k: its r_k leading rows of (R, d_in), B_k: its r_k leading
columns of (d_out, R)); padding that is not zero is refused. The global adapter comes back at rank
R and client k continues from its leading r_k rows / columns. A zero row of A_k or column of B_k
adds nothing to B_k A_k, so dW is the same with or without the padding; each method's docstring
says what the padding means for it. With equal ranks nothing changes.

Any floating dtype: w is checked and renormalised in float64 so that it sums to one exactly (FedEx's
residual and every average rely on it), half-precision factors are aggregated in float32, and the
Update comes back in the inputs' dtype.

    Update.A: (..., r, d_in) or None     new global A (None: re-initialised / kept by clients)
    Update.B: (..., d_out, r) or None    new global B
    Update.delta_w: (..., d_out, d_in) or None   folded into the frozen base weight W0,
                                                 in B @ A units (the caller multiplies by alpha/r)

Notation of the LoRA-FAIR paper (arXiv 2411.14961):
    A_bar = sum_k p_k A_k,  B_bar = sum_k p_k B_k,  dW = sum_k p_k B_k A_k   (the ideal update, Eq. 6)
FedIT's global adapter B_bar A_bar differs from dW; each method below handles that gap differently.

Nothing big is ever formed where it is not needed: dW = U V with U = [p_1 B_1 ... p_K B_K]
(d_out, K r) and V = [A_1; ...; A_K] (K r, d_in), so LoRA-FAIR's solver and FlexLoRA's SVD work on
matrices of size K r instead of d_out x d_in.

This file depends on torch and the standard library only, so it can be copied alone.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

Names = Union[str, Sequence[str]]


class Update(NamedTuple):
    A: Optional[Tensor]        # (..., r, d_in)
    B: Optional[Tensor]        # (..., d_out, r)
    delta_w: Optional[Tensor]  # (..., d_out, d_in), in B @ A units


# ----------------------------------------------------------------------------- validation

def _name(layer: Names, flat_index: int) -> str:
    if isinstance(layer, str):
        return layer if flat_index < 0 else f"{layer}[{flat_index}]"
    return layer[flat_index] if flat_index >= 0 else ", ".join(layer)


def check_weights(w, K: Optional[int] = None, *, layer: Names = "layer") -> Tensor:
    """Check w is a valid set of client weights p_k; return it in float64, renormalised to sum to 1.

    The sum may be off by rounding (1e-6, or a few ulps of w's own dtype, e.g. bf16 weights)."""
    w = torch.as_tensor(w)
    slack = max(1e-6, (w.numel() + 1) * torch.finfo(w.dtype).eps) if w.is_floating_point() else 1e-6
    if w.dim() != 1:
        raise ValueError(f"{_name(layer, -1)}: client weights must be 1-D (K,), got shape {tuple(w.shape)}")
    if K is not None and w.numel() != K:
        raise ValueError(f"{_name(layer, -1)}: {w.numel()} client weights for {K} clients; "
                         "pass one weight p_k = n_k / sum_j n_j per client")
    if w.numel() == 0:
        raise ValueError(f"{_name(layer, -1)}: no clients (K = 0); at least one client must take part")
    w64 = w.detach().double()
    if not torch.isfinite(w64).all():
        raise ValueError(f"{_name(layer, -1)}: client weights contain NaN/Inf: {w64.tolist()}")
    if (w64 < 0).any():
        raise ValueError(f"{_name(layer, -1)}: client weights must be >= 0, got {w64.tolist()}")
    if abs(w64.sum().item() - 1.0) > slack:
        raise ValueError(f"{_name(layer, -1)}: client weights sum to {w64.sum().item():.8g}, not 1; "
                         "normalise them (p_k = n_k / sum_j n_j)")
    return w64 / w64.sum()


def _check(A: Tensor, B: Tensor, w, layer: Names) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    """Check shapes, finiteness and weights. Return A, B and w in the dtype to compute in (float32
    for half-precision factors, else theirs), w summing to one, and the factors' own dtype."""
    if A.dim() < 3 or B.dim() < 3:
        raise ValueError(f"{_name(layer, -1)}: expected A (..., K, r, d_in) and B (..., K, d_out, r), "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"{_name(layer, -1)}: A {tuple(A.shape)} and B {tuple(B.shape)} disagree on "
                         "the leading dims or the number of clients K")
    K, r, d_in = A.shape[-3:]
    d_out, r_b = B.shape[-2:]
    if r != r_b:
        raise ValueError(f"{_name(layer, -1)}: rank mismatch, A has r = {r} rows but B has {r_b} columns")
    if r == 0 or r > min(d_out, d_in):
        raise ValueError(f"{_name(layer, -1)}: rank r = {r} must be in 1..min(d_out, d_in) = {min(d_out, d_in)}")
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(f"{_name(layer, -1)}: A ({A.dtype}, {A.device}) and B ({B.dtype}, {B.device}) "
                         "must share dtype and device")
    if not A.is_floating_point():
        raise ValueError(f"{_name(layer, -1)}: LoRA factors must be floating point, got {A.dtype}")
    w = check_weights(w, K, layer=layer)
    lead = A.shape[:-3]
    for name, X in (("A", A), ("B", B)):
        # Any NaN/Inf makes the sum non-finite; only then (or on overflow) look element-wise.
        if not X.sum().isfinite():
            bad = ~X.reshape(math.prod(lead), K, -1).isfinite().all(-1)           # (L, K)
            if not bad.any():
                continue
            l, k = (int(i) for i in bad.nonzero()[0])
            where = _name(layer, l if lead else -1)
            raise ValueError(f"{where}: client {k}'s {name} contains NaN/Inf; leave that client out "
                             "of the round and renormalise the weights")
    ct = torch.promote_types(A.dtype, torch.float32)
    return A.to(ct), B.to(ct), w.to(device=A.device, dtype=ct), A.dtype


def _cast(update: Update, dtype: torch.dtype) -> Update:
    """The Update in the inputs' dtype."""
    return Update(*(None if x is None else x.to(dtype) for x in update))


def _dense(U: Tensor, V: Tensor, dtype: torch.dtype) -> Tensor:
    """U @ V in `dtype`: (..., d_out, k) @ (..., k, d_in) -> (..., d_out, d_in), the dense update a
    folding method returns. For half-precision factors (computed in float32) the result is filled
    one layer at a time, so no float32 copy of the whole stack is ever held beside it (a 7B model's
    64 gate and up projections: 10.8 GiB in float32 for 5.4 GiB returned in bf16)."""
    if U.dtype == dtype:
        return U @ V
    if U.shape[:-2] != V.shape[:-2]:
        raise ValueError(f"_dense takes equal leading dims, got U {tuple(U.shape)} and V {tuple(V.shape)}")
    out = torch.empty(*U.shape[:-1], V.shape[-1], dtype=dtype, device=U.device)
    for o, u, v in zip(out.view(-1, *out.shape[-2:]), U.reshape(-1, *U.shape[-2:]), V.reshape(-1, *V.shape[-2:])):
        o.copy_(u @ v)                                                        # (d_out, d_in): one layer in float32
    return out


def _padding(A: Tensor, B: Tensor, ranks, layer: Names) -> Optional[Tensor]:
    """Check per-client ranks of zero-padded factors; return them as a (K,) tensor (None: all R).
    Only the padding itself is read, through views (no copies)."""
    if ranks is None:
        return None
    K, R = A.shape[-3], A.shape[-2]
    r = torch.as_tensor(ranks)
    if r.dim() != 1 or r.numel() != K or r.is_floating_point() or r.dtype == torch.bool:
        raise ValueError(f"{_name(layer, -1)}: ranks must be {K} integers, one per client, got {ranks!r}")
    if (r < 1).any() or (r > R).any():
        raise ValueError(f"{_name(layer, -1)}: ranks must be in 1..R = {R} (the factors' padded width), "
                         f"got {r.tolist()}")
    for k, rank in enumerate(r.tolist()):
        if rank == R:
            continue
        for name, pad, part in (("A", A[..., k, rank:, :], "row"), ("B", B[..., k, :, rank:], "column")):
            if pad.any():
                raise ValueError(f"{_name(layer, -1)}: client {k}'s {name} is not zero beyond its rank r_k = "
                                 f"{rank} ({part}s {rank}..{R - 1}); zero-pad each client's factors to R")
    return r


def _shared(X: Tensor, tol: float, layer: Names, what: str, ranks: Optional[Tensor] = None,
            columns: bool = False) -> Tensor:
    """Check the clients' copies of a factor that must be shared are identical; return one copy.

    With ranks, each client holds only its leading r_k rows (columns for B): those must agree
    with the copy of the client of largest rank, which is returned whole (rank R, zeros beyond
    the largest rank), never averaged with the others' zero padding."""
    if ranks is None:
        X0 = X[..., 0, :, :]                                                  # (..., m, n)
        lead = X.shape[:-3]
        spread = (X.amax(-3) - X.amin(-3)).flatten(-2).amax(-1).reshape(-1)  # (L,): no (K, m, n) temporary
        scale = X0.abs().flatten(-2).amax(-1).reshape(-1)
        bad = (spread > tol * scale).nonzero()
        if len(bad):
            l = int(bad[0])
            raise ValueError(f"{_name(layer, l if lead else -1)}: {what}, but the clients' copies differ "
                             f"by up to {spread[l].item():.3g}")
        return X0.clone()                                                     # not a view keeping all K copies
    ref = int(ranks.argmax())
    X0 = X[..., ref, :, :]                                                    # (..., m, n), the whole factor
    scale = X0.abs().flatten(-2).amax(-1) if tol > 0 else None               # (...,)
    for k, rank in enumerate(ranks.tolist()):
        held = X[..., k, :, :rank] if columns else X[..., k, :rank, :]        # what client k holds (a view)
        own = X0[..., :, :rank] if columns else X0[..., :rank, :]
        if tol == 0 and torch.equal(held, own):
            continue
        spread = (held - own).abs().flatten(-2).amax(-1)                      # (...,)
        if (spread > tol * (scale if scale is not None else 0)).any():
            raise ValueError(f"{_name(layer, -1)}: {what}, but client {k}'s copy differs from client {ref}'s "
                             f"by up to {spread.max().item():.3g}")
    return X0.clone()


# ----------------------------------------------------------------------------- building blocks

def weighted_mean(X: Tensor, w: Tensor) -> Tensor:
    """sum_k p_k X_k over the client dim -3: (..., K, m, n) -> (..., m, n)."""
    return (w @ X.flatten(-2)).unflatten(-1, X.shape[-2:])  # (K,) @ (..., K, m n) -> (..., m n)


def stacked_factors(A: Tensor, B: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """U = [p_1 B_1 ... p_K B_K], V = [A_1; ...; A_K], so that U @ V = dW = sum_k p_k B_k A_k (Eq. 6).

    This is FLoRA's stacking; it lets every method see dW at rank K r without forming it.
    """
    *lead, K, r, d_in = A.shape
    d_out = B.shape[-2]
    if torch.is_grad_enabled() and (B.requires_grad or w.requires_grad):      # out= has no autograd
        U = (B * w[:, None, None]).movedim(-3, -2)                            # reshaped below: a second copy
    else:
        U = B.new_empty(*lead, d_out, K, r, dtype=torch.promote_types(B.dtype, w.dtype))
        torch.mul(B.movedim(-3, -2), w[:, None], out=U)                      # one copy, laid out as U
    U = U.reshape(*lead, d_out, K * r)                                       # (..., d_out, K r)
    V = A.reshape(*lead, K * r, d_in)                                          # (..., K r, d_in)
    return U, V


# ----------------------------------------------------------------------------- the methods

def fedit(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """FedIT: average the factors separately, A_bar = sum p_k A_k and B_bar = sum p_k B_k.

    Clients continue from (A_bar, B_bar). Biased: B_bar A_bar != dW = sum p_k B_k A_k (Eq. 6),
    because a product does not distribute over sums. Heterogeneous ranks: zero-padded averages.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    return _cast(Update(weighted_mean(A, w), weighted_mean(B, w), None), dtype)


def ffa(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", tol: float = 0.0) -> Update:
    """FFA-LoRA: A is frozen at one shared initialisation; only B is trained and averaged.

    Exact, since B_bar A = sum p_k B_k A. The clients' A must really be identical (up to `tol`,
    relative to max |A|); otherwise the average would be silently biased. Heterogeneous ranks:
    client k holds the leading r_k rows of the shared A, which passes through at rank R unchanged
    (averaging it with the zero padding would shrink rows and miss dW); B is the zero-padded average.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    A0 = _shared(A, tol, layer, "ffa needs one frozen A shared by every client (freeze it at one init)", r)
    return _cast(Update(A0, weighted_mean(B, w), None), dtype)


def flora(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """FLoRA: stack the clients' modules, [p_1 B_1 ... p_K B_K] @ [A_1; ...; A_K] = dW exactly.

    dW is folded into the frozen weight (delta_w = dW) and every client re-initialises its LoRA
    (A random, B = 0) next round, so A and B are None. Exact for any ranks (padding adds zeros).
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    U, V = stacked_factors(A, B, w)
    return _cast(Update(None, None, _dense(U, V, dtype)), dtype)              # (..., d_out, d_in)


def flexlora(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """FlexLoRA: truncated rank-r SVD of dW, handed back as B = U_r diag(S_r), A = V_r^T.

    B A is the best rank-r approximation of dW (Eckart-Young). Computed on the factors:
    U = Q_u R_u, V^T = Q_v R_v (QR), SVD of the small core R_u R_v^T = P S Q^T, then
    dW = (Q_u P) S (Q_v Q)^T is already an SVD of dW, at O((d_out + d_in) (K r)^2) instead of a
    dense SVD of d_out x d_in. Heterogeneous ranks: rank R, components sorted by singular value,
    so client k's truncation to r_k is the best rank-r_k approximation of dW.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    r = A.shape[-2]
    U, V = stacked_factors(A, B, w)                 # U: (..., d_out, K r)  V: (..., K r, d_in)
    Qu, Ru = torch.linalg.qr(U)                     # Qu: (..., d_out, m1)  Ru: (..., m1, K r)
    Qv, Rv = torch.linalg.qr(V.mT)                  # Qv: (..., d_in, m2)   Rv: (..., m2, K r)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.mT, full_matrices=False)  # core: (..., m1, m2)
    B_new = (Qu @ P[..., :r]) * S[..., None, :r]    # (..., d_out, r)
    A_new = Qh[..., :r, :] @ Qv.mT                  # (..., r, d_in)
    return _cast(Update(A_new, B_new, None), dtype)


def fedex(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """FedEx-LoRA: FedIT's (A_bar, B_bar) plus the exact residual delta_w = dW - B_bar A_bar.

    The residual goes into the frozen weight, so W0 + delta_w + B_bar A_bar = W0 + dW exactly.
    It is the clients' weighted covariance of the factors, computed as such below. Heterogeneous
    ranks: zero-padded averages, and the residual keeps the sum exact.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    # dW - B_bar A_bar = sum_k p_k (B_k - B_bar)(A_k - A_bar) (as sum_k p_k = 1): one product of
    # inner size K r, the same cost as FLoRA's, with the centred factors
    U, V = stacked_factors(A - A_bar[..., None, :, :], B - B_bar[..., None, :, :], w)
    return _cast(Update(A_bar, B_bar, _dense(U, V, dtype)), dtype)            # (..., d_out, d_in)


def fedsa(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """FedSA-LoRA: share A only. A_bar = sum p_k A_k (zero-padded with heterogeneous ranks); each
    client keeps its own B_k (B is None)."""
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    return _cast(Update(weighted_mean(A, w), None, None), dtype)


def rolora(A: Tensor, B: Tensor, w, *, phase: str, ranks=None, layer: Names = "layer", tol: float = 0.0) -> Update:
    """RoLoRA: clients alternate which factor they train; only that one is averaged.

    phase='A': A_bar = sum p_k A_k with B shared (identical on all clients, passed through);
    phase='B': B_bar = sum p_k B_k with A shared. Either way the product is exact:
    B A_bar = sum p_k B A_k and B_bar A = sum p_k B_k A. Heterogeneous ranks: the frozen factor
    passes through at rank R as ffa's A does; the trained one is the zero-padded average.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    if phase not in ("A", "B"):
        raise ValueError(f"{_name(layer, -1)}: rolora phase must be 'A' or 'B', got {phase!r}")
    if phase == "A":
        B0 = _shared(B, tol, layer, "rolora phase 'A' needs one B shared by every client", r, columns=True)
        return _cast(Update(weighted_mean(A, w), B0, None), dtype)
    A0 = _shared(A, tol, layer, "rolora phase 'B' needs one A shared by every client", r)
    return _cast(Update(A0, weighted_mean(B, w), None), dtype)


def _flat_terms(U: Tensor, V: Tensor, A_bar: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """C = dW A_bar^T (..., d_out, r), G = A_bar A_bar^T (..., r, r), ||dW||_F (...,), from dW = U V.

    From the factors (||U V||^2 = sum((U^T U) * (V V^T))), unless a layer's dense dW is the smaller
    form (K r (d_out + d_in) > d_out d_in: many clients on narrow layers); then each layer's dW is
    formed in turn, never the stack's."""
    (d_out, Kr), d_in = U.shape[-2:], V.shape[-1]
    G = A_bar @ A_bar.mT
    if Kr * (d_out + d_in) <= d_out * d_in:
        nX2 = ((U.mT @ U) * (V @ V.mT)).sum((-2, -1))                        # ||U V||^2, (...,)
        return U @ (V @ A_bar.mT), G, nX2.clamp_min(0).sqrt().clamp_min(eps)
    lead, r = U.shape[:-2], A_bar.shape[-2]
    U, V, A_bar = (x.reshape(-1, *x.shape[-2:]) for x in (U, V, A_bar))      # (n layers, ., .)
    C, nX = U.new_empty(len(U), d_out, r), U.new_empty(len(U))
    for i in range(len(U)):
        dW = U[i] @ V[i]                                                      # (d_out, d_in): this layer only
        C[i], nX[i] = dW @ A_bar[i].mT, dW.square().sum().sqrt()
    return C.reshape(*lead, d_out, r), G, nX.reshape(lead).clamp_min(eps)


def _sgd_flat_B(B_bar: Tensor, dB: Tensor, C: Tensor, G: Tensor, nX: Tensor, steps: int, lr: float, lam: float,
                eps: float) -> Tensor:
    """The default solver (flat cosine, residual on B) with its gradient in closed form:

        cos = <B', C> / (||dW|| n),  n = sqrt(<B' G, B'>) = ||B' A_bar||,  B' = B_bar + dB
        d cos / d B' = C / (||dW|| n) - cos (B' G) / n^2

    the same steps autograd would take, without its per-step overhead (1000 steps a round).
    """
    nX = nX[..., None, None]                                                  # (..., 1, 1)
    C_flat, decay = C.flatten(-2), 1 - 2 * lr * lam
    dB = dB.clone()
    for _ in range(steps):
        Bp = B_bar + dB                                                       # (..., d_out, r)
        P = Bp @ G                                                            # (..., d_out, r)
        n2 = torch.linalg.vecdot(P.flatten(-2), Bp.flatten(-2))[..., None, None]   # n^2: (..., 1, 1)
        n = n2.clamp_min(eps * eps).sqrt()
        cos = torch.linalg.vecdot(Bp.flatten(-2), C_flat)[..., None, None] / (nX * n)
        # dB <- dB - lr (2 lam dB - d cos / d B'); a clamped norm contributes no gradient
        dB.mul_(decay).addcmul_(C, lr / (nX * n)).addcmul_(P, -lr * cos / n2 * (n2 > eps * eps))
    return dB


def _cosine_parts(U: Tensor, V: Tensor, A_bar: Tensor, similarity: str, eps: float):
    """Precompute what cos(dW, B' A') needs; return a function of (B', A'), A' = None meaning A_bar.

    dW = U V, never formed.
    flat:   cos = <dW, B' A'>_F / (||dW||_F ||B' A'||_F), with ||dW||^2 = sum((U^T U) * (V V^T)) and
            for A' = A_bar:  <dW, B' A_bar> = sum(B' * C), C = dW A_bar^T = U (V A_bar^T)  (d_out, r)
                             ||B' A_bar||^2 = sum((B' G) * B'), G = A_bar A_bar^T         (r, r)
            for any A':      <dW, B' A'> = sum((U^T B') * (V A'^T)),
                             ||B' A'||^2 = sum((B'^T B') * (A' A'^T))
    column: mean over the d_in columns j of cos(dW[:, j], (B' A')[:, j]), with
            <dW_j, Y_j> = sum_i V_ij ((U^T B') A')_ij,  ||dW_j||^2 = V_j^T (U^T U) V_j,
            ||Y_j||^2 = A'_j^T (B'^T B') A'_j.
    Norms are clamped below at eps, as torch.nn.functional.cosine_similarity does.
    """
    def projected(Bp: Tensor) -> Tensor:                                      # B'^T dW: (..., r, d_in)
        return (Bp.mT @ U) @ V

    if similarity == "flat":
        C, G, nX = _flat_terms(U, V, A_bar, eps)

        def cos(Bp: Tensor, Ap: Optional[Tensor] = None) -> Tensor:
            if Ap is None:
                inner = (Bp * C).sum((-2, -1))
                nY2 = ((Bp @ G) * Bp).sum((-2, -1))
            else:
                inner = ((U.mT @ Bp) * (V @ Ap.mT)).sum((-2, -1))
                nY2 = ((Bp.mT @ Bp) * (Ap @ Ap.mT)).sum((-2, -1))
            return inner / (nX * nY2.clamp_min(eps * eps).sqrt())             # (...,)
        return cos
    if similarity == "column":
        nX2 = (V * ((U.mT @ U) @ V)).sum(-2)                                 # U^T U: (..., K r, K r)
        nX = nX2.clamp_min(0).sqrt().clamp_min(eps)                           # (..., d_in)

        def cos(Bp: Tensor, Ap: Optional[Tensor] = None) -> Tensor:
            Ap = A_bar if Ap is None else Ap
            inner = (Ap * projected(Bp)).sum(-2)                              # (..., d_in)
            nY = (Ap * ((Bp.mT @ Bp) @ Ap)).sum(-2).clamp_min(eps * eps).sqrt()
            return (inner / (nX * nY)).mean(-1)                               # (...,)
        return cos
    raise ValueError(f"lorafair similarity must be 'flat' or 'column', got {similarity!r}")


def _fnv1a(name: str) -> int:
    """A hash of a layer name that is the same in every process and Python version (FNV-1a, 32 bit)."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) % 2**32
    return h


def _per_layer(like: Tensor, seed: int, layer: Names, sample: Callable) -> Tensor:
    """float64 draws shaped like `like`, on the CPU so the same seed gives the same numbers on every
    device: with one name per batched layer, each layer from its own stream, seeded by (seed, its
    name), so no two layers share draws and a layer's do not depend on how layers were grouped;
    an unnamed batch draws from one stream. sample(shape, generator) -> float64 tensor."""
    names = [layer] if isinstance(layer, str) else list(layer)
    lead, mat = like.shape[:-2], like.shape[-2:]

    def draw(shape, name: str) -> Tensor:
        return sample(shape, torch.Generator().manual_seed((seed * 1_000_003 + _fnv1a(name)) % 2**63))
    if len(names) == math.prod(lead):                                # one name per layer (or one layer)
        return torch.stack([draw(mat, name) for name in names]).reshape(like.shape)
    return draw(like.shape, "layer")


def _xavier(like: Tensor, seed: int, layer: Names = "layer") -> Tensor:
    """xavier_uniform_ on each (fan_out, fan_in) matrix: U(-b, b), b = sqrt(6 / (fan_in + fan_out)),
    each layer from its own seeded stream (`_per_layer`)."""
    noise = _per_layer(like, seed, layer,
                       lambda shape, g: torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1)
    return (noise * math.sqrt(6.0 / sum(like.shape[-2:]))).to(like)


def _check_fair_options(solver: str, steps, lr, lam: float, init: str, similarity: str, correct: str,
                        objective: str) -> tuple[int, Optional[float]]:
    """Check LoRA-FAIR's options; return (steps, lr) with the solver's defaults filled in. An
    option the chosen solver or objective would ignore is refused, not ignored."""
    if objective not in ("cosine", "lsq"):
        raise ValueError(f"lorafair objective must be 'cosine' or 'lsq', got {objective!r}")
    if solver not in ("fixed-point", "sgd"):
        raise ValueError(f"lorafair solver must be 'fixed-point' or 'sgd', got {solver!r}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lorafair lam must be a finite number >= 0, got {lam!r}")
    if init not in ("zeros", "xavier"):
        raise ValueError(f"lorafair init must be 'zeros' or 'xavier', got {init!r}")
    if correct not in ("B", "A", "both"):
        raise ValueError(f"lorafair correct must be 'B', 'A' or 'both', got {correct!r}")
    if similarity not in ("flat", "column"):
        raise ValueError(f"lorafair similarity must be 'flat' or 'column', got {similarity!r}")
    if steps is not None and not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"lorafair steps must be an integer >= 0, got {steps!r}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lorafair lr must be a finite number > 0, got {lr!r}")
    if objective == "lsq":
        if correct != "B":
            raise ValueError(f"lorafair objective 'lsq' refines B only (correct='B'), got correct={correct!r}")
        if (solver, steps, lr, init, similarity) != ("fixed-point", None, None, "zeros", "flat"):
            raise ValueError("lorafair objective 'lsq' is a closed form: solver, steps, lr, init and similarity do "
                             f"not apply (got solver={solver!r}, steps={steps!r}, lr={lr!r}, init={init!r}, "
                             f"similarity={similarity!r}); leave them at their defaults")
        return 0, None
    if solver == "fixed-point":
        if (init, similarity, correct) != ("zeros", "flat", "B") or lr is not None:
            raise ValueError("lorafair solver 'fixed-point' solves Eq. 8 as written (flat cosine, residual on B, "
                             "nothing to start from or step with); init, similarity, correct and lr are SGD's: "
                             f"got init={init!r}, similarity={similarity!r}, correct={correct!r}, lr={lr!r}; "
                             "pass solver='sgd' for them")
        return (20 if steps is None else steps), None
    steps, lr = (1000 if steps is None else steps), (0.01 if lr is None else lr)
    if lr * lam >= 1:
        raise ValueError(f"lorafair: lr * lam = {lr * lam:g} >= 1 makes SGD on the term lam ||dB||^2 "
                         "diverge (each step multiplies dB by 1 - 2 lr lam); lower lr or lam")
    return steps, lr


def lsq_residual(B_bar: Tensor, C: Tensor, G: Tensor, nX: Tensor, lam: float) -> Tensor:
    """The ridge least-squares residual, the closed-form cousin of Eq. 8:

        dB = argmin ||dW - (B_bar + dB) A_bar||_F^2 / ||dW||_F^2 + lam ||dB||_F^2.

    The data term is divided by ||dW||^2 so that it is O(1), like the cosine loss. Near the optimum
    1 - cos is half of it (||x - y||^2 = 2 (1 - cos) for unit vectors), so this objective at lam
    weighs dB as Eq. 8 does at lam / 2. Setting the gradient to zero,
    (dB A_bar - R) A_bar^T / ||dW||^2 + lam dB = 0 with R = dW - B_bar A_bar, gives

        dB = (C - B_bar G) (G + lam ||dW||^2 I)^-1,   C = dW A_bar^T,  G = A_bar A_bar^T,

    computed on the factors (C = U (V A_bar^T): dW is never formed), one r x r solve per layer, no
    iterations. lam = 0: dB = (C - B_bar G) G^+, the minimum-norm least-squares solution, which
    also serves a rank-deficient A_bar (a rank slot no client has); then (B_bar + dB) A_bar = dW P,
    the projection of dW onto A_bar's row space, whose cosine is the ceiling states.bias_bounds reports.
    lam -> infinity: dB -> 0, FedIT. Solved in float64, returned in B_bar's dtype.
    Shapes: B_bar, C (..., d_out, r), G (..., r, r), nX (...,).
    """
    C64, G64, B64 = C.double(), G.double(), B_bar.double()
    rhs = C64 - B64 @ G64                                                    # R A_bar^T: (..., d_out, r)
    if lam == 0:
        dB = rhs @ torch.linalg.pinv(G64, hermitian=True)
    else:
        eye = torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
        reg = G64 + lam * nX.double()[..., None, None].square() * eye         # G + lam ||dW||^2 I: SPD
        dB = torch.linalg.solve(reg, rhs.mT).mT                               # reg symmetric: solve from the right
    return dB.to(B_bar.dtype)


def eq8_objective(A: Tensor, B: Tensor, w, B_new: Tensor, lam: float) -> Tensor:
    """Eq. 8's objective, written plainly: the reference every LoRA-FAIR solver is tested against.

        f(B') = 1 - cos(dW, B' A_bar) + lam ||B' - B_bar||_F^2,   dW = sum_k p_k B_k A_k  (Eq. 6)

    dW and B' A_bar are formed densely, in float64, with no norm clamp (a zero B' A_bar gives NaN).
    Shapes: A (..., K, r, d_in), B (..., K, d_out, r), B_new (..., d_out, r); returns (...,).
    """
    A, B, w, B_new = A.double(), B.double(), torch.as_tensor(w).double(), B_new.double()
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)                   # (..., r, d_in), (..., d_out, r)
    dW = sum(w[k] * B[..., k, :, :] @ A[..., k, :, :] for k in range(A.shape[-3]))   # (..., d_out, d_in)
    Y = B_new @ A_bar                                                         # (..., d_out, d_in)
    cos = (dW * Y).sum((-2, -1)) / (dW.flatten(-2).norm(dim=-1) * Y.flatten(-2).norm(dim=-1))
    return 1 - cos + lam * (B_new - B_bar).square().sum((-2, -1))


def eq8_minimiser(A: Tensor, B: Tensor, w, lam: float, iters: int = 500) -> Tensor:
    """Eq. 8 solved the obvious way, for one layer: autograd and L-BFGS (strong Wolfe) on
    `eq8_objective` over B' (in units of ||B_bar||), from B_bar and from the ceiling's direction
    C G^+ at B_bar's scale; the B' of the lower end. Dense and slow: what `eq8_fixed_point` must
    reach. Shapes: A (K, r, d_in), B (K, d_out, r); returns B' (d_out, r) in float64.
    """
    A, B, w = A.double(), B.double(), torch.as_tensor(w).double()
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    dW = sum(w[k] * B[k] @ A[k] for k in range(A.shape[0]))
    star = dW @ A_bar.T @ torch.linalg.pinv(A_bar @ A_bar.T)                  # C G^+: (d_out, r)
    s = B_bar.norm()
    best, best_B = math.inf, B_bar
    for X0 in (B_bar, star * (star * B_bar).sum() / star.square().sum()):
        X = (X0 / s).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([X], lr=1, max_iter=iters, tolerance_grad=1e-15, tolerance_change=1e-18,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            v = eq8_objective(A[None], B[None], w, (X * s)[None], lam)[0]
            v.backward()
            return v
        with torch.enable_grad():
            opt.step(closure)
        f = eq8_objective(A[None], B[None], w, (X.detach() * s)[None], lam)[0].item()
        if f < best:
            best, best_B = f, X.detach() * s
    return best_B


def eq8_fixed_point(B_bar: Tensor, C: Tensor, G: Tensor, nX: Tensor, lam: float, iters: int = 20,
                    c: float = 2.0, anderson: bool = True) -> Tensor:
    """Eq. 8 solved to convergence: dB minimising f(B') = 1 - cos(dW, B' A_bar) + lam ||B' - B_bar||^2
    (`eq8_objective` states it plainly; tests check this solver against it and `eq8_minimiser`).

    With n = ||B' A_bar|| = sqrt(<B' G, B'>) and cos = <B', C> / (||dW|| n), f's gradient is zero
    where  2 lam (B' - B_bar) = C / (||dW|| n) - cos B' G / n^2,  that is

        B' = (B_bar + a C) (I + b G)^-1,   a = 1 / (2 lam ||dW|| n),   b = cos / (2 lam n^2):

    every stationary point is an r x r solve away from two scalars. With G = Q diag(g) Q^T, f, n and
    cos of B'(a, b) are sums over r terms of (B_bar Q)_i and (C Q)_i, so the search for (a, b) is
    a fixed point of two numbers per layer, in (log a, log b), that costs O(r) an iteration against
    O(d_out r^2) for one SGD step. The plain iteration converges linearly, in some cases slowly
    (drift 0.5, ||B|| ~ 1: f still 3e-8 above its minimum after 300 iterations); with one step of
    Anderson acceleration, from B_bar, every case measured with cos(dW, B_bar A_bar) > 0 reached the
    minimum a dense L-BFGS finds, to 1e-12, within 20 iterations (tests/test_aggregators.py). Where
    B_bar A_bar points away from dW (cos < 0: b > 0 cannot reach it from there) a second search
    starts from the ceiling C G^+; in the cases tested it ends within 1e-8 of L-BFGS in 20
    iterations, below it in 50. Then, in float64:

    - the best iterate is rescaled along its ray to the scale f prefers, t = <B', B_bar> / ||B'||^2
      (the cosine does not see the scale; at a true minimiser t = 1, so ||B'||_F <= ||B_bar||_F),
      and capped so that ||B' A_bar|| <= c max(||B_bar A_bar||, ||dW||) (c = 2; f is convex along
      the ray, so the cap is the best point left on it);
    - if f there is above f(B_bar), dB = 0: never worse than no correction.
    B_bar A_bar = 0 (below 1e-12 ||dW||; f has no minimiser: it falls as B' -> 0 along the
    ceiling's direction): the rule is B' = C G^+, the least-squares solution (B' A_bar = dW P, the
    ceiling at dW's scale); a rule, not the limit, which just above the threshold is a tiny B'.
    lam = 0 (every positive scale is a minimiser): the ceiling's direction at the scale f has
    for any lam > 0, t = <C G^+, B_bar> / ||C G^+||^2 (at dW's scale if that is not positive).
    anderson=False: the plain iteration, kept to measure what acceleration buys (bench/test_eq8.py).
    Shapes: B_bar, C (..., d_out, r), G (..., r, r), nX (...,); dB in B_bar's dtype.
    """
    B64, C64, G64 = B_bar.double(), C.double(), G.double()
    nX = nX.double()[..., None, None]                                          # (..., 1, 1)
    tiny = torch.finfo(torch.float64).tiny

    def objective(Bp: Tensor) -> tuple[Tensor, Tensor]:                       # f and n: (..., 1, 1)
        n = ((Bp @ G64) * Bp).sum((-2, -1), keepdim=True).clamp_min(0).sqrt()
        cos = (Bp * C64).sum((-2, -1), keepdim=True) / (nX * n).clamp_min(tiny)
        return 1 - cos + lam * (Bp - B64).square().sum((-2, -1), keepdim=True), n

    f0, n0 = objective(B64)
    ceiling = C64 @ torch.linalg.pinv(G64, hermitian=True)                     # C G^+: (..., d_out, r)
    if lam == 0:
        t = (ceiling * B64).sum((-2, -1), keepdim=True) / ceiling.square().sum((-2, -1), keepdim=True).clamp_min(tiny)
        Bp = ceiling * torch.where(t > 0, t, torch.ones_like(t))
    else:
        g, Q = torch.linalg.eigh(G64)                                         # g: (..., r)  Q: (..., r, r)
        g = g.clamp_min(0)
        P, S = B64 @ Q, C64 @ Q                                               # (..., d_out, r)
        pp, ps, ss = P.square().sum(-2), (P * S).sum(-2), S.square().sum(-2)  # (..., r)

        def at(x: Tensor) -> tuple[Tensor, Tensor]:
            """f at B'(a, b), x = (log a, log b): (...,), and the fixed-point map T(x): (..., 2)."""
            a, b = x.exp().unbind(-1)
            a, den = a[..., None], 1 + b[..., None] * g                       # (..., 1), (..., r)
            n = (g * (pp + 2 * a * ps + a * a * ss) / den.square()).sum(-1).clamp_min(tiny).sqrt()
            cos = ((ps + a * ss) / den).sum(-1) / (nX[..., 0, 0] * n)
            q, u = 1 / den - 1, a / den
            d2 = (q * q * pp + 2 * q * u * ps + u * u * ss).sum(-1)           # ||B' - B_bar||^2
            T = torch.stack([-(2 * lam * nX[..., 0, 0] * n).log(), (cos.clamp_min(tiny) / (2 * lam * n * n)).log()], -1)
            return 1 - cos + lam * d2, T

        def start(Bp: Tensor) -> Tensor:                                       # T at B' = Bp: (..., 2)
            n = ((Bp @ G64) * Bp).sum((-2, -1)).clamp_min(0).sqrt()
            cos = (Bp * C64).sum((-2, -1)) / (nX[..., 0, 0] * n)
            x = torch.stack([-(2 * lam * nX[..., 0, 0] * n).log(), (cos.clamp_min(tiny) / (2 * lam * n * n)).log()], -1)
            return torch.nan_to_num(x, nan=0.0, posinf=700.0, neginf=-700.0).clamp(-700, 700)

        def search(x: Tensor) -> tuple[Tensor, Tensor]:
            best_f, best_x = torch.full_like(x[..., 0], 3.0), x              # f <= 2 + lam ||dB||^2 at B_bar
            prev = None
            for _ in range(iters):
                fx, T = at(x)
                # the latest iterate unless it is worse beyond rounding: f is flat at the optimum, so
                # iterates equal in f to the last bit still differ in B' (NaN is never better)
                better = fx <= best_f + 8 * torch.finfo(torch.float64).eps * (1 + best_f.abs())
                best_f, best_x = torch.where(better, fx, best_f), torch.where(better[..., None], x, best_x)
                gx = T - x
                if prev is None or not anderson:                              # plain: x <- T(x)
                    nxt = T
                else:                                                        # Anderson, one step of memory
                    dx, dg = x - prev[0], gx - prev[1]
                    gamma = (dg * gx).sum(-1, keepdim=True) / (dg * dg).sum(-1, keepdim=True).clamp_min(tiny)
                    nxt = x + gx - gamma * (dx + dg)
                prev = (x, gx)
                x = torch.where(nxt.isfinite(), nxt, T).nan_to_num(nan=0.0).clamp(-700, 700)
            return best_f, best_x

        # from B_bar; where B_bar A_bar points away from dW (cos < 0, which the search in log b,
        # b = cos / (2 lam n^2) > 0, cannot cross) from the ceiling C G^+ too, keeping the better
        f_bar, x_bar = search(start(B64))
        f_star, x_star = search(start(ceiling))
        away = ((B64 * C64).sum((-2, -1)) <= 0) & (f_star < f_bar)
        best_x = torch.where(away[..., None], x_star, x_bar)
        a, b = best_x.exp().unbind(-1)
        Bp = ((P + a[..., None, None] * S) / (1 + b[..., None, None] * g[..., None, :])) @ Q.mT
        t = (Bp * B64).sum((-2, -1), keepdim=True) / Bp.square().sum((-2, -1), keepdim=True).clamp_min(tiny)
        Bp = torch.where(t > 0, Bp * t, Bp)                                   # the scale f prefers on the ray
    n = ((Bp @ G64) * Bp).sum((-2, -1), keepdim=True).clamp_min(0).sqrt()
    cap = c * torch.maximum(n0, nX)
    Bp = torch.where(n > cap, Bp * cap / n.clamp_min(tiny), Bp)
    f, _ = objective(Bp)
    Bp = torch.where(f <= f0, Bp, B64)                                        # never worse than dB = 0
    Bp = torch.where(n0 > 1e-12 * nX, Bp, ceiling)                            # B_bar A_bar = 0: the rule
    return (Bp - B64).to(B_bar.dtype)


def _fair_inputs(A: Tensor, B: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A_bar (..., r, d_in), B_bar (..., d_out, r) and dW as U (..., d_out, K r) @ V (..., K r, d_in)."""
    A, B = A.detach(), B.detach()
    return weighted_mean(A, w), weighted_mean(B, w), *stacked_factors(A, B, w)


def lorafair(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", solver: str = "fixed-point",
             steps: Optional[int] = None, lr: Optional[float] = None, lam: float = 0.01, init: str = "zeros",
             similarity: str = "flat", correct: str = "B", eps: float = 1e-8, seed: int = 0,
             objective: str = "cosine") -> Update:
    """LoRA-FAIR: (A_bar, B_bar + dB), with the residual dB of Eq. 8,

        dB = argmin [1 - cos(dW, (B_bar + dB) A_bar)] + lam ||dB||_F^2,

    (Eq. 8 writes lam ||dB||; the square, smooth at dB = 0, is what the derived public code uses;
    `eq8_objective` is this objective written plainly, the reference both solvers are tested against).
    W0 is never changed; clients start next round from (A_bar, B_bar + dB).

    solver='fixed-point' (default) solves Eq. 8 to convergence (`eq8_fixed_point`: `steps`
    iterations, 20 by default, of an r x r problem): never a higher objective than dB = 0, and
    ||B' A_bar|| <= 2 max(||B_bar A_bar||, ||dW||). solver='sgd' is the published procedure:
    `steps` (1000) steps of plain SGD at `lr` (0.01) from dB = 0 ('zeros') or Xavier-uniform noise
    ('xavier'), batched layers being independent terms of one summed loss. The cosine does not
    depend on the scale of B', so its gradient is orthogonal to B' and of size ~1 / ||B' A_bar||;
    starting at a small B_bar (early rounds, B starting at 0), fixed-lr steps lengthen B' far past
    dW and can leave Eq. 8 higher than at dB = 0 (docs/lorafair.md, "Eq. 8 and its solvers").

    correct='A' or 'both' (SGD only) are the paper's ablation: a residual dA on A_bar instead of
    (or as well as) dB, same objective with lam ||dA||^2 (and lam ||dB||^2). similarity='flat' is
    Eq. 8 as written; 'column' (SGD only) is the derived code's mean of per-column cosines.

    Defaults: lam = 0.01 is the paper's, as are SGD's lr 0.01 and 1000 steps. init='zeros' (not
    the derived code's 'xavier'): with realistic LoRA magnitudes, Xavier noise of scale
    sqrt(6 / (d_out + r)) dwarfs B_bar and 1000 steps at lr 0.01 do not remove it.

    Heterogeneous ranks: B_bar is refined on the zero-padded factors (as LoRA-FAIR-derived public
    code does) at rank R, and each client takes its truncation.

    objective='lsq' replaces the cosine by its closed-form cousin (`lsq_residual`); solver, steps,
    lr, init and similarity do not apply to it.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    steps, lr = _check_fair_options(solver, steps, lr, lam, init, similarity, correct, objective)
    A_bar, B_bar, U, V = _fair_inputs(A, B, w)
    if objective == "lsq":
        C, G, nX = _flat_terms(U, V, A_bar, eps)
        return _cast(Update(A_bar, B_bar + lsq_residual(B_bar, C, G, nX, lam), None), dtype)
    if solver == "fixed-point":
        C, G, nX = _flat_terms(U, V, A_bar, eps)
        return _cast(Update(A_bar, B_bar + eq8_fixed_point(B_bar, C, G, nX, lam, steps), None), dtype)
    start = (lambda X, s, names: torch.zeros_like(X)) if init == "zeros" else _xavier
    dB = start(B_bar, seed, layer) if correct != "A" else None      # (..., d_out, r)
    dA = start(A_bar, seed + 1, layer) if correct != "B" else None  # (..., r, d_in)
    if similarity == "flat" and correct == "B":
        C, G, nX = _flat_terms(U, V, A_bar, eps)
        return _cast(Update(A_bar, B_bar + _sgd_flat_B(B_bar, dB, C, G, nX, steps, lr, lam, eps), None), dtype)
    cos = _cosine_parts(U, V, A_bar, similarity, eps)                      # autograd for the other variants
    residuals = [x for x in (dB, dA) if x is not None]
    with torch.enable_grad():
        for x in residuals:
            x.requires_grad_(True)
        for _ in range(steps):
            Bp = B_bar if dB is None else B_bar + dB
            loss = 1 - cos(Bp, None if dA is None else A_bar + dA)
            loss = (loss + lam * sum(x.square().sum((-2, -1)) for x in residuals)).sum()
            grads = torch.autograd.grad(loss, residuals)
            with torch.no_grad():
                for x, g in zip(residuals, grads):
                    x -= lr * g
    A_new = A_bar if dA is None else A_bar + dA.detach()
    B_new = B_bar if dB is None else B_bar + dB.detach()
    return _cast(Update(A_new, B_new, None), dtype)


def lorafair_groups(groups: Sequence[tuple], **options) -> list[Update]:
    """lorafair over several shape groups [(layer names, A, B, w), ...], one Update per group.

    With solver='sgd' (flat cosine, residual on B, from zero) a layer's SGD needs only
    C (d_out, r), G (r, r) and ||dW||, none of which depends on d_in, so the groups are merged
    into one SGD loop per (d_out, r): the same steps per layer (layers are independent terms of
    the summed loss), fewer kernel launches. Any other variant runs group by group.
    """
    flat = (options.get("similarity", "flat") == "flat" and options.get("correct", "B") == "B"
            and options.get("init", "zeros") == "zeros" and options.get("objective", "cosine") == "cosine"
            and options.get("solver") == "sgd")
    if not flat:
        return [lorafair(A, B, w, layer=names, **options) for names, A, B, w in groups]
    unknown = set(options) - {"solver", "steps", "lr", "lam", "init", "similarity", "correct", "eps", "seed",
                              "ranks", "objective"}
    if unknown:
        raise TypeError(f"lorafair got unexpected options {sorted(unknown)}")
    lam, eps = options.get("lam", 0.01), options.get("eps", 1e-8)
    steps, lr = _check_fair_options("sgd", options.get("steps"), options.get("lr"), lam, "zeros", "flat", "B",
                                    "cosine")
    terms, bins = [], {}
    for i, (names, A, B, w) in enumerate(groups):
        A, B, w, _ = _check(A, B, w, names)
        _padding(A, B, options.get("ranks"), names)
        A_bar, B_bar, U, V = _fair_inputs(A, B, w)
        terms.append((A_bar, B_bar, *_flat_terms(U, V, A_bar, eps)))
        bins.setdefault((tuple(B_bar.shape[1:]), B_bar.dtype, B_bar.device), []).append(i)
    dB = [None] * len(groups)
    for members in bins.values():
        B_bar, C, G, nX = (torch.cat([terms[i][j] for i in members]) for j in (1, 2, 3, 4))
        out = _sgd_flat_B(B_bar, torch.zeros_like(B_bar), C, G, nX, steps, lr, lam, eps)
        for i, part in zip(members, out.split([len(groups[i][1]) for i in members])):
            dB[i] = part
    return [_cast(Update(t[0], t[1] + d, None), g[1].dtype) for t, d, g in zip(terms, dB, groups)]


# ----------------------------------------------------------------------------- built for heterogeneous ranks

def _rank_mask(ranks: Optional[Tensor], K: int, R: int, like: Tensor) -> Tensor:
    """(K, R): 1 where client k has rank slot i (i < r_k), else 0."""
    if ranks is None:
        return torch.ones(K, R, dtype=like.dtype, device=like.device)
    return (torch.arange(R, device=like.device) < ranks.to(like.device)[:, None]).to(like.dtype)


def hetlora(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", use_p: bool = False) -> Update:
    """HetLoRA (Cho et al., EMNLP 2024), sparsity-weighted aggregation of zero-padded factors:

        omega_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F   (per layer; use_p: p_k ||B_k A_k||_F, renormalised)
        A_glob = sum_k omega_k A_k,  B_glob = sum_k omega_k B_k

    as the public implementations weight it (by the norm of each client's update, not by n_k).
    Client k continues from the leading r_k rows / columns (its truncation). A layer where every
    update is zero (e.g. B = 0 at the start) falls back to p_k.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    norms = ((B.mT @ B) * (A @ A.mT)).sum((-2, -1)).clamp_min(0).sqrt()        # ||B_k A_k||_F: (..., K)
    omega = norms * w if use_p else norms
    total = omega.sum(-1, keepdim=True)
    omega = torch.where(total > 0, omega / total.clamp_min(torch.finfo(omega.dtype).tiny), w)   # (..., K)
    mean = lambda X: (omega[..., None, None] * X).sum(-3)                       # noqa: E731
    return _cast(Update(mean(A), mean(B), None), dtype)


def rbla(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer") -> Update:
    """RBLA, rank-based LoRA aggregation (arXiv 2408.08699): rank slot i (row i of A, column i
    of B) is averaged over only the clients that have it, their weights renormalised:

        A_glob[i] = sum_{k: r_k > i} p_k A_k[i] / sum_{k: r_k > i} p_k   (B's columns alike)

    so a slot few clients train is not diluted by the others' zero padding. A slot no client has
    stays zero. With equal ranks it is FedIT. Since the padding is zero (checked), the numerator is
    FedIT's average, so A_glob is A_bar with row i divided by c_i = sum_{k: r_k > i} p_k (B_bar's
    column i alike): one pass over the factors, as cheap as FedIT.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    K, R = A.shape[-3], A.shape[-2]
    c = w @ _rank_mask(r, K, R, w)                                             # (R,): weight of slot i's clients
    c = torch.where(c > 0, c, torch.ones_like(c))                              # a slot nobody has: 0 / 1
    A_glob = weighted_mean(A, w) / c[:, None]                                  # (..., R, d_in)
    B_glob = weighted_mean(B, w) / c                                           # (..., d_out, R)
    return _cast(Update(A_glob, B_glob, None), dtype)


def florist(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", tau: float = 0.9) -> Update:
    """FLoRIST (arXiv 2506.09199): the SVD of dW = sum_k p_k B_k A_k truncated to the fewest
    components m whose share of the energy sum_j sigma_j^2 reaches tau,

        m = min{m : sum_{j<m} sigma_j^2 >= tau sum_j sigma_j^2},   delta_w = U_m S_m V_m^T,

    folded into the frozen weight (delta_w); every client restarts next round from a fresh LoRA, as
    in FLoRA, whose code FLoRIST's builds on (Anonymous-user-00/FLoRIST@ec3e9bc model_aggregation.py
    l. 63-89: the threshold on the singular values of the product, no cap on m; main.py l. 482-483:
    merged into the base weights). A and B are None. The SVD is taken through the small core, as in
    flexlora; m may exceed every client's rank (at most sum_k r_k). tau = 1 folds dW exactly.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    _padding(A, B, ranks, layer)
    if not 0 < tau <= 1:
        raise ValueError(f"florist tau must be in (0, 1], got {tau!r}")
    U, V = stacked_factors(A, B, w)                 # U: (..., d_out, K R)  V: (..., K R, d_in)
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.mT)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.mT, full_matrices=False)               # S: (..., n), descending
    energy = S.square().cumsum(-1) / S.square().sum(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    m = (energy < tau * (1 - 4 * torch.finfo(S.dtype).eps)).sum(-1) + 1        # (...,)
    keep = (torch.arange(S.shape[-1], device=S.device) < m[..., None]).to(S.dtype)   # (..., n)
    delta_w = _dense((Qu @ P) * (S * keep)[..., None, :], Qh @ Qv.mT, dtype)   # (..., d_out, d_in)
    return _cast(Update(None, None, delta_w), dtype)


# ----------------------------------------------------------------------------- the field's newer methods

def fedsvd(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", tol: float = 0.0) -> Update:
    """FedSVD (NeurIPS 2025): clients train B only, on the round's shared A; the server averages B
    and re-factorises the product with its SVD,

        M = B_bar A,   M = U S V^T,   A <- V_r^T,   B <- U_r S_r,

    so B A = M = sum_k p_k B_k A exactly, and A's rows are M's top right singular vectors
    (orthonormal) every round. As its authors' code (seanie12/fed-svd@36650e2): A frozen on the
    clients (misc/utils.py l. 268-282, the 'ffa' model), B averaged with n_k weights (server.py
    l. 96-112, 225-231), then `reinit_lora` on the server (server.py l. 81-86; misc/utils.py
    l. 212-230: A = rows of V^T, B = U diag(S)). Computed without forming M: A^T = Q R (QR), the
    small SVD B_bar R^T = P S O^T, then U = P and V = Q O. Where M has rank below r, the trailing
    rows of A are an orthonormal completion with singular value 0.
    Heterogeneous ranks: the shared A passes at rank R (as in ffa), B is the zero-padded average;
    components are sorted, so client k's truncation is the best rank-r_k approximation of M.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    A0 = _shared(A, tol, layer, "fedsvd's clients train B only, on one shared A (freeze A on the clients)", r)
    B_bar = weighted_mean(B, w)                                               # (..., d_out, R)
    Q, Rf = torch.linalg.qr(A0.mT)                                            # Q: (..., d_in, R)  Rf: (..., R, R)
    P, S, Oh = torch.linalg.svd(B_bar @ Rf.mT, full_matrices=False)          # (..., d_out, R), (..., R), (..., R, R)
    return _cast(Update(Oh @ Q.mT, P * S[..., None, :], None), dtype)        # A: (..., R, d_in)  B: (..., d_out, R)


def screenot_noise(s: Tensor, k: int, strategy: str = "i") -> Tensor:
    """ScreeNOT's pseudo-noise (Donoho, Gavish and Romanov, 2023): the singular values s (..., p)
    sorted ascending, with the largest k (at most the signal) replaced by a guess of where the noise
    bulk would end: '0' zero, 'w' the (k+1)-th largest, 'i' an imputation along the bulk's edge,
    z_l = z_(k+1) + a_l (z_(k+1) - z_(2k+1)), a_l = (1 - ((l - 1) / k)^(2/3)) / (2^(2/3) - 1)
    (eladromanov/ScreeNOT@7735c53 Python/src/screenot/ScreeNOT.py `createPseudoNoise` l. 71-97)."""
    z = s.double().sort(-1).values.clone()                                    # (..., p), ascending
    p = z.shape[-1]
    if not 0 <= k < p or (strategy == "i" and 2 * k + 1 >= p):
        raise ValueError(f"ScreeNOT needs k < p{' and 2k + 1 < p' if strategy == 'i' else ''} for its noise "
                         f"estimate, got k = {k}, p = {p} singular values")
    if k == 0:
        return z
    if strategy == "0":
        z[..., p - k:] = 0
    elif strategy == "w":
        z[..., p - k:] = z[..., p - k - 1:p - k]
    elif strategy == "i":
        edge, diff = z[..., p - k - 1], z[..., p - k - 1] - z[..., p - 2 * k - 1]          # (...,)
        a = (1 - (torch.arange(k, dtype=torch.float64, device=z.device) / k) ** (2 / 3)) / (2 ** (2 / 3) - 1)
        z[..., p - k:] = (edge[..., None] + a * diff[..., None]).flip(-1)   # z_l at position p - l
    else:
        raise ValueError(f"ScreeNOT strategy must be '0', 'w' or 'i', got {strategy!r}")
    return z


def screenot_threshold(s: Tensor, k: int, strategy: str = "i", gamma: float = 1.0) -> Tensor:
    """ScreeNOT's optimal hard threshold for singular values s (..., p) of a matrix of aspect ratio
    gamma <= 1: the t > max z solving F(t) = t D'(t) / D(t) = -4, with Phi(t) = mean(t / (t^2 - z^2)),
    D(t) = Phi(t) (gamma Phi(t) + (1 - gamma) / t) over the pseudo-noise z (`screenot_noise`); found
    as the package finds it, by doubling from [max z, max z + 2] and bisecting to an absolute width
    of 1e-5 (`computeOptThreshold` l. 109-126, `F` l. 135-188), per matrix. Returns (...,), float64."""
    z = screenot_noise(s, k, strategy)                                        # (..., p)

    def F(y: Tensor) -> Tensor:                                               # (...,)
        y2, z2 = y[..., None].square(), z.square()
        phi, dphi = (y[..., None] / (y2 - z2)).mean(-1), (-(y2 + z2) / (y2 - z2).square()).mean(-1)
        D = phi * (gamma * phi + (1 - gamma) / y)
        dD = dphi * (gamma * phi + (1 - gamma) / y) + phi * (gamma * dphi - (1 - gamma) / y.square())
        return y * dD / D

    low = z.amax(-1)
    high = low + 2.0
    while (grow := F(high) < -4).any():                                       # F increases with t
        low, high = torch.where(grow, high, low), torch.where(grow, 2 * high, high)
    mid = high.clone()
    while (active := high - low > 1e-5).any():
        m = (high + low) / 2
        below = F(m) < -4
        low, high = torch.where(active & below, m, low), torch.where(active & ~below, m, high)
        mid = torch.where(active, m, mid)
    return mid


def _normal(like: Tensor, std: float, seed: int, layer: Names = "layer") -> Tensor:
    """N(0, std^2) entries shaped like `like`, each layer from its own seeded stream (`_per_layer`)."""
    return (_per_layer(like, seed, layer, lambda shape, g: torch.randn(shape, generator=g, dtype=torch.float64))
            * std).to(like)


def spectral(A: Tensor, B: Tensor, w, *, ranks=None, layer: Names = "layer", strategy: str = "i",
             k: Optional[int] = None, pad_std: float = 0.02, seed: int = 0) -> Update:
    """SpecTraL (ECML PKDD 2026): the SVD of dW = sum_k p_k B_k A_k from the clients' stacked
    factors, truncated at the rank ScreeNOT picks for it, each client taking its own rank of it:

        dW = U S V^T (QR of both stacks, SVD of the small core),   m = #{sigma_j > tau},
        B = U_m S_m, A = V_m^T;   slots m..R-1: B = 0, A ~ N(0, pad_std^2).

    As its authors' code (DASS-Lab-Group/SpecTraL@00a3c4b server.py `aggregate_spectral` l. 668-700
    through `aggregate_florist` l. 421-666): only the slots each client holds are stacked
    (sum_k r_k of them, l. 492-508), QR of both stacks and the SVD of P = R_B R_A^T (l. 519-523,
    565-566); tau = `screenot_threshold` of P's singular values with the upper bound
    k = max(1, min(mn // 4, (mn - 2) // 2)) ('i'; mn - 1 for '0', 'w'), mn = min(P.shape), and
    gamma from P's shape (`_select_rank_florist` l. 382-417); all of S on B (l. 607-610); a client
    of rank r_k above m gets B's extra columns zero and A's extra rows N(0, 0.02^2) (client.py
    l. 199-257, 'normal_a', the mode its README runs). Departures: the global adapter keeps
    min(m, R) components (its server evaluates all m, which no client receives; R = the largest
    client rank is what clients continue from); the padding is drawn from a stream seeded by
    (seed, layer), not the process's global one; p_k multiplies B, not A (the same product); where
    the stacked rank is too small for ScreeNOT's noise estimate (fewer than 4 singular values for
    'i', 2 for the others: one client of rank 3, say) every component is kept, where its package
    raises.
    k: ScreeNOT's upper bound on the signal rank (None: the automatic one above).
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    if strategy not in ("i", "w", "0") or (k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1)):
        raise ValueError(f"spectral needs strategy 'i', 'w' or '0' and k None or an integer >= 1, "
                         f"got strategy {strategy!r}, k {k!r}")
    *lead, K, R, d_in = A.shape
    d_out = B.shape[-2]
    held = torch.cat([torch.arange(R) < (R if r is None else int(r[j])) for j in range(K)])   # (K R,)
    U, V = stacked_factors(A, B, w)                                           # (..., d_out, K R), (..., K R, d_in)
    U, V = U[..., held], V[..., held, :]                                      # only what the clients hold
    Qu, Ru = torch.linalg.qr(U)                                               # (..., d_out, m1), (..., m1, n)
    Qv, Rv = torch.linalg.qr(V.mT)                                            # (..., d_in, m2), (..., m2, n)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.mT, full_matrices=False)             # core (..., m1, m2): S (..., mn)
    m1, m2 = Ru.shape[-2], Rv.shape[-2]
    mn = min(m1, m2)
    k_max = max(1, (mn - 2) // 2) if strategy == "i" else max(1, mn - 1)
    k_used = max(1, min(max(1, mn // 4) if k is None else int(k), k_max))
    if mn < (4 if strategy == "i" else 2):                  # too few values to tell noise from: keep them all
        m = torch.full(S.shape[:-1], mn, device=S.device)
    else:
        tau = screenot_threshold(S, k_used, strategy, min(m1 / m2, m2 / m1))  # (...,)
        m = (S.double() > tau[..., None]).sum(-1).clamp_min(1)                # (...,): the rank ScreeNOT keeps
    n = min(mn, R)
    keep = (torch.arange(R, device=S.device) < m[..., None].clamp_max(R)).to(S.dtype)   # (..., R)
    B_new = torch.zeros(*lead, d_out, R, dtype=S.dtype, device=S.device)
    B_new[..., :n] = (Qu @ P[..., :n]) * S[..., None, :n]
    B_new = B_new * keep[..., None, :]                                        # (..., d_out, R)
    A_new = torch.zeros(*lead, R, d_in, dtype=S.dtype, device=S.device)
    A_new[..., :n, :] = Qh[..., :n, :] @ Qv.mT
    if not keep.all():                                      # padded slots: fresh A rows, B columns stay 0
        A_new = torch.where(keep[..., :, None] > 0, A_new, _normal(A_new, pad_std, seed, layer))   # (..., R, d_in)
    return _cast(Update(A_new, B_new, None), dtype)


def frlora_init(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """FRLoRA's start (IAMJackYan/FRLoRA@c29baad fed_global.py `ours_init` l. 38-75): the adapter
    holds the base weight's top-r singular components, split evenly between the factors, and the
    base weight keeps the rest, so the layer computes W first:

        W = U S V^T,  A0 = sqrt(S_r / s) V_r^T,  B0 = U_r sqrt(S_r / s),  W_res = W - s B0 A0.

    Returns (A0 (r, d_in), B0 (d_out, r), W_res (d_out, d_in)), in W's dtype (computed in float64)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = (S[:r] / scale).sqrt()                                             # (r,)
    A0, B0 = root[:, None] * Vh[:r], U[:, :r] * root                          # (r, d_in), (d_out, r)
    return A0.to(W.dtype), B0.to(W.dtype), (W.double() - scale * B0 @ A0).to(W.dtype)


def frlora(A: Tensor, B: Tensor, w, *, A_init: Optional[Tensor] = None, B_init: Optional[Tensor] = None,
           ranks=None, layer: Names = "layer") -> Update:
    """FRLoRA (ICLR 2025): every round the server averages the factors, folds what they add
    beyond the initial adapter into the base weight, and restarts LoRA from its initial factors:

        delta_w = B_bar A_bar - B_init A_init,   (A, B) <- (A_init, B_init),

    so the effective weight after the round is W0 + s delta_w + s B_init A_init = W0 + s B_bar A_bar
    (IAMJackYan/FRLoRA@c29baad label_skew_ours.py l. 167 average, l. 204-209 the fold into the base,
    l. 221-224 the reset; A_init, B_init from `frlora_init`, once). Its clients train B only
    (trainer.py l. 13-15: A stays A_init), which makes B_bar A_bar = sum_k p_k B_k A_k exact.
    Departures: p_k as given (its code averages uniformly, l. 174: the same when clients hold equal
    data); no regulariser (its `fedreg` trainer's term is built from detached copies, so it has no
    gradient, trainer.py l. 358-361, and the released runs use the plain trainer).
    A_init: (..., r, d_in), B_init: (..., d_out, r), as A and B without the client dim. Heterogeneous
    ranks are not defined for it (a truncated start would drop part of the base weight's top
    components) and are refused.
    """
    A, B, w, dtype = _check(A, B, w, layer)
    r = _padding(A, B, ranks, layer)
    if r is not None and (r != A.shape[-2]).any():
        raise ValueError(f"{_name(layer, -1)}: frlora is defined for one rank shared by every client, got ranks "
                         f"{r.tolist()}")
    lead = A.shape[:-3]
    if A_init is None or B_init is None:
        raise ValueError(f"{_name(layer, -1)}: frlora needs A_init and B_init, the adapter every round restarts from "
                         "(frlora_init)")
    if tuple(A_init.shape) != (*lead, *A.shape[-2:]) or tuple(B_init.shape) != (*lead, *B.shape[-2:]):
        raise ValueError(f"{_name(layer, -1)}: frlora's A_init {tuple(A_init.shape)} and B_init {tuple(B_init.shape)} "
                         f"must be shaped like one client's A and B with the leading dims: {(*lead, *A.shape[-2:])} and "
                         f"{(*lead, *B.shape[-2:])}")
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)                  # (..., r, d_in), (..., d_out, r)
    A0, B0 = A_init.to(A), B_init.to(B)
    delta_w = _dense(torch.cat([B_bar, -B0], -1), torch.cat([A_bar, A0], -2), dtype)   # (..., d_out, d_in)
    return _cast(Update(A0, B0, delta_w), dtype)


AGGREGATORS: dict[str, Callable[..., Update]] = {
    "fedit": fedit, "ffa": ffa, "flora": flora, "flexlora": flexlora,
    "fedex": fedex, "fedsa": fedsa, "rolora": rolora, "lorafair": lorafair,
    "hetlora": hetlora, "rbla": rbla, "florist": florist,
    "fedsvd": fedsvd, "spectral": spectral, "frlora": frlora,
}


def rescaled(method: str, A: Tensor, B: Tensor, w, scales, **options) -> Update:
    """Aggregate clients whose adapters scale differently, W = W0 + s_k B_k A_k with s_k = alpha_k / r_k
    (unequal whenever alpha is not proportional to r, e.g. alpha = max(8, 2 r) at small ranks).

    What is aggregated is what each adapter adds to the weight: s_k is folded into the factor the
    clients train (B; A in rolora's phase 'A', whose B is shared and frozen), the method runs in
    weight units (s = 1), and the Update is in weight units too. Client k takes that factor divided
    by its own s_k (`client_factors`), so that s_k B A is what the server meant.
    """
    s = torch.as_tensor(scales, dtype=torch.float64)
    K = A.shape[-3]
    if s.dim() != 1 or s.numel() != K or not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"scales must be {K} finite numbers > 0 (alpha_k / r_k), got {scales!r}")
    if method == "rolora" and options.get("phase") == "A":
        A = A * s.to(A)[:, None, None]                                      # (..., K, R, d_in)
    else:
        B = B * s.to(B)[:, None, None]                                      # (..., K, d_out, R)
    return get_aggregator(method)(A, B, w, **options)


def client_factors(update: Update, scale: float, rank: Optional[int] = None,
                   phase: Optional[str] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Client k's start from a weight-unit Update (`rescaled`): its leading `rank` rows of A and
    columns of B, the trained factor divided by its scale s_k."""
    A, B = update.A, update.B
    if rank is not None:
        A = None if A is None else A[..., :rank, :]
        B = None if B is None else B[..., :rank]
    if phase == "A":
        return (None if A is None else A / scale), B
    return A, (None if B is None else B / scale)


def get_aggregator(method: str) -> Callable[..., Update]:
    if method not in AGGREGATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(AGGREGATORS)}")
    return AGGREGATORS[method]
