"""Server step on the paper's ViT-B/16 geometry: factored solvers against their dense references.

12 x attn.proj (768 x 768) and 12 x mlp.fc2 (768 out, 3072 in), K = 6 clients, r = 16, float32.
Run: pytest bench/test_server.py   (timings and ratios are printed at the end)
"""
import pytest
import torch

from aggregators import AGGREGATORS, fedsvd, flexlora, frlora, lorafair, spectral
from tests.reference import dense_fedsvd, dense_flexlora, dense_frlora, dense_lorafair, dense_spectral

K, R, DEPTH = 6, 16, 12
GEOMETRY = [(768, 768), (768, 3072)]     # (d_out, d_in): attn.proj, mlp.fc2
DENSE_STEPS = 5                          # the dense solver costs ~0.2 s a step; timed per step


def layers(dtype=torch.float32, seed=0):
    """One batched (A, B) per layer shape, like aggregate_states builds: A (12, K, r, d_in)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d_out, d_in in GEOMETRY:
        A = torch.randn(DEPTH, K, R, d_in, generator=g, dtype=dtype) / d_in ** 0.5
        B = torch.randn(DEPTH, K, d_out, R, generator=g, dtype=dtype) * 1e-2
        out.append((A, B))
    return out


W = torch.full((K,), 1.0 / K)


def server_step(fn, data, **kw):
    return [fn(A, B, W.to(A.dtype), **kw) for A, B in data]


def test_lorafair_factored(benchmark, record):
    data = layers()
    benchmark.pedantic(server_step, args=(lorafair, data), kwargs={"solver": "sgd", "steps": 1000}, rounds=3,
                       iterations=1)
    record("lorafair factored, per SGD step", benchmark, per=1000)


def test_lorafair_fixed_point(benchmark, record, ratio):
    """The default solver (Eq. 8 to convergence, 20 fixed-point iterations) against the 1000-step
    SGD round it replaces, both factored, same run; not timed: its objective is below SGD's here."""
    data = layers()
    benchmark.pedantic(server_step, args=(lorafair, data), rounds=5, iterations=1, warmup_rounds=1)
    record("lorafair fixed-point (default), whole round", benchmark)
    ratio("lorafair fixed-point speed-up over the SGD round", "lorafair factored, per SGD step",
          "lorafair fixed-point (default), whole round", scale=1000)
    from states import eq8_from_factors
    for A, B in layers(torch.float64):
        w = W.double()
        f0, f = eq8_from_factors(lorafair(A, B, w), A, B, w, 0.01)
        _, f_sgd = eq8_from_factors(lorafair(A, B, w, solver="sgd"), A, B, w, 0.01)
        assert (f <= f0 + 1e-12).all() and (f <= f_sgd + 1e-12).all()


def test_lorafair_dense(benchmark, record, ratio):
    data = layers()
    benchmark.pedantic(server_step, args=(dense_lorafair_fn, data), kwargs={"steps": DENSE_STEPS}, rounds=2,
                       iterations=1, warmup_rounds=1)
    record("lorafair dense, per SGD step", benchmark, per=DENSE_STEPS)
    ratio("lorafair factored speed-up", "lorafair dense, per SGD step", "lorafair factored, per SGD step")


def test_lorafair_lsq_closed_form(benchmark, record, ratio):
    """LoRA-FAIR with objective='lsq': one r x r solve per layer against the 1000-step SGD round,
    both factored, same run; and in float64 its cosine is at least SGD's (the ceiling)."""
    data = layers()
    benchmark.pedantic(server_step, args=(lorafair, data), kwargs={"objective": "lsq", "lam": 0.01}, rounds=5,
                       iterations=1, warmup_rounds=1)
    record("lorafair lsq (closed form), whole round", benchmark)
    ratio("lorafair lsq speed-up over the 1000-step SGD round", "lorafair factored, per SGD step",
          "lorafair lsq (closed form), whole round", scale=1000)


def dense_lorafair_fn(A, B, w, **kw):
    return dense_lorafair(A, B, w, **kw)


def test_lorafair_same_dB_on_this_geometry():
    """Not timed: the factored and dense solvers give the same dB here, in float64."""
    for A, B in layers(torch.float64):
        w = W.double()
        fast = lorafair(A, B, w, solver="sgd", steps=20)
        _, slow = dense_lorafair(A, B, w, steps=20)
        dB = slow - torch.einsum("...kdr,k->...dr", B, w)
        assert (fast.B - slow).norm() < 1e-6 * dB.norm()


def test_flexlora_factored(benchmark, record):
    benchmark.pedantic(server_step, args=(flexlora, layers()), rounds=5, iterations=1)
    record("flexlora factored (QR + core SVD)", benchmark)


def test_flexlora_dense(benchmark, record, ratio):
    benchmark.pedantic(server_step, args=(lambda A, B, w: dense_flexlora(A, B, w), layers()), rounds=2,
                       iterations=1)
    record("flexlora dense torch.linalg.svd", benchmark)
    ratio("flexlora factored speed-up", "flexlora dense torch.linalg.svd", "flexlora factored (QR + core SVD)")
    data = layers(torch.float64)
    for (A, B), u, (a, b) in zip(data, server_step(flexlora, data), [dense_flexlora(A, B, W.double()) for A, B in data]):
        assert torch.allclose(u.B @ u.A, b @ a, rtol=1e-8, atol=1e-10)


def shared_A(data):
    """FedSVD's and FRLoRA's clients train B only: one A for every client."""
    return [(A[:, :1].expand_as(A).contiguous(), B) for A, B in data]


def init_of(A, B):
    """FRLoRA's initial adapter for these layers (any fixed one: its cost does not depend on it)."""
    return {"A_init": A[:, 0], "B_init": 0.5 * B[:, 0]}


NEWER = {   # method: (the factored function, its dense reference, inputs, keyword arguments)
    "fedsvd": (fedsvd, lambda A, B, w: dense_fedsvd(A, B, w), shared_A, lambda A, B: {}),
    "spectral": (spectral, lambda A, B, w: dense_spectral(A, B, w), lambda d: d, lambda A, B: {}),
    "frlora": (frlora, lambda A, B, w, A_init, B_init: dense_frlora(A, B, w, A_init, B_init), shared_A, init_of),
}


@pytest.mark.parametrize("method", list(NEWER))
def test_newer_factored(benchmark, record, method):
    fn, _, prepare, kw = NEWER[method]
    data = prepare(layers())
    benchmark.pedantic(lambda: [fn(A, B, W, **kw(A, B)) for A, B in data], rounds=5, iterations=1, warmup_rounds=1)
    record(f"{method} factored", benchmark)


@pytest.mark.parametrize("method", list(NEWER))
def test_newer_dense(benchmark, record, ratio, method):
    """The dense reference of each (tests/reference.py: the product formed, dense SVD, and for
    SpecTraL the ScreeNOT package a layer at a time), and in float64 the same product."""
    fn, ref, prepare, kw = NEWER[method]
    data = prepare(layers())
    benchmark.pedantic(lambda: [ref(A, B, W, **kw(A, B)) for A, B in data], rounds=2, iterations=1)
    record(f"{method} dense reference", benchmark)
    ratio(f"{method} factored speed-up", f"{method} dense reference", f"{method} factored")
    w = torch.full((K,), 1.0 / K, dtype=torch.float64)                      # sums to 1 in float64 too
    for A, B in prepare(layers(torch.float64)):
        u, want = fn(A, B, w, **kw(A, B)), ref(A, B, w, **kw(A, B))
        got = u.delta_w if method == "frlora" else u.B @ u.A
        want = want if method == "frlora" else want[0] if method == "spectral" else want[1] @ want[0]
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["fedit", "ffa", "flora", "fedex", "fedsa", "rolora"])
def test_other_methods(benchmark, record, method):
    data = layers()
    if method == "ffa":
        data = [(A[:, :1].expand_as(A).contiguous(), B) for A, B in data]
    if method == "rolora":
        data = [(A, B[:, :1].expand_as(B).contiguous()) for A, B in data]
    kw = {"phase": "A"} if method == "rolora" else {}
    benchmark.pedantic(server_step, args=(AGGREGATORS[method], data), kwargs=kw, rounds=5, iterations=1,
                       warmup_rounds=1)
    record(f"{method}, whole geometry", benchmark)


def test_dense_product_floor(benchmark, record):
    """The dense dW = U V alone: a floor for flora and fedex, whose output is that d_out x d_in matrix."""
    data = [(A.movedim(-3, -2).reshape(DEPTH, R * K, -1), B.movedim(-3, -1).reshape(DEPTH, -1, R * K))
            for A, B in layers()]
    benchmark.pedantic(lambda: [U @ V for V, U in data], rounds=5, iterations=1, warmup_rounds=1)
    record("dense U @ V only (floor for flora/fedex)", benchmark)
