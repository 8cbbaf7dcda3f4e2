"""Server step of every method over geometries x K x r, next to its dense reference and the bound.

Geometries: the paper's ViT-B/16 (12 x attn.proj 768x768, 12 x mlp.fc2 768 out x 3072 in), q/v
LoRA of a 7B LLM (32 layers x {q, v}, 4096x4096) and a toy one (4 x 64x48); K in {6, 30, 100};
r in {8, 16, 64}; and heterogeneous rows (`test_server_step_heterogeneous`): client ranks cycled
over {4, 8, 16, 64}, zero-padded to R = 64, every method given `ranks`. The bound is what a perfect implementation would need on this machine:
max(FLOPs / matmul FLOP/s, bytes / copy bandwidth), both measured at the start of the run.
A configuration is skipped, with the reason printed, when its memory exceeds BENCH_MEM_GB
(default 12) or its bound exceeds BENCH_BUDGET_S / 20 (default 1 s); its reference is left out
('-') when predicted above BENCH_BUDGET_S.

    pytest bench/test_grid.py -s               # CPU float32; with CUDA the grid runs again on the GPU
"""
import os
import time

import pytest
import torch

from aggregators import AGGREGATORS
from tests.reference import (dense_dW, dense_fedsvd, dense_flexlora, dense_florist, dense_frlora, dense_hetlora,
                             dense_lorafair, dense_rbla, dense_spectral)

GEOMETRIES = {
    "toy": [(64, 48)] * 4,
    "vit_b16": [(768, 768)] * 12 + [(768, 3072)] * 12,
    "llm7b_qv": [(4096, 4096)] * 64,
}
KS, RS = (6, 30, 100), (8, 16, 64)
HETERO_RANKS = (4, 8, 16, 64)   # cycled over the clients, padded to R = 64
FAIR_STEPS = 20             # timed steps; LoRA-FAIR's 1000-step cost is reported per step
MEM_GB = float(os.environ.get("BENCH_MEM_GB", 12))
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 20))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS: list[dict] = []


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat=3, warmup=True):
    if warmup:
        fn()
        sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="module", params=DEVICES)
def machine(request):
    """Measured matmul FLOP/s (4096^2 float32 GEMM) and copy bandwidth (512 MiB) on this device."""
    dev = request.param
    n = 4096 if dev == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    flops = 2 * n ** 3 / timeit(lambda: a @ b, dev)
    x = torch.empty(128 * 2 ** 20, device=dev)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / timeit(lambda: y.copy_(x), dev)      # read + write
    return {"device": dev, "flops": flops, "bw": bw}


def cost(method, do, di, K, r):
    """(FLOPs, bytes) a perfect implementation needs for one layer, float32."""
    Kr = K * r
    inputs = K * r * (do + di)
    if method in ("fedit", "ffa", "fedsa", "rolora", "rbla"):
        return 2 * inputs, 4 * (inputs + r * (do + di))
    if method == "hetlora":    # + the K norms ||B_k A_k|| through the r x r Gram matrices
        return 2 * inputs + 2 * K * r * r * (do + di), 4 * (inputs + r * (do + di))
    if method in ("flora", "fedex"):
        return 2 * do * (Kr + (r if method == "fedex" else 0)) * di, 4 * (inputs + do * di)
    if method == "fedsvd":     # the average of B, A's QR, the (d_out x r) SVD, the new factors
        return 2 * inputs + 4 * di * r * r + 14 * do * r * r + 2 * (do + di) * r * r, 4 * (inputs + 2 * r * (do + di))
    if method == "frlora":     # the averages, then two dense products (the fold it returns)
        return 2 * inputs + 4 * do * r * di, 4 * (inputs + do * di)
    if method in ("flexlora", "spectral"):     # spectral: flexlora's SVD, then ScreeNOT on K r numbers
        m = min(Kr, do, di)
        return 4 * (do + di) * Kr * m + 22 * m ** 3 + 2 * (do + di) * m * r, 4 * (inputs + 2 * (do + di) * m)
    if method == "florist":    # flexlora's core SVD, then the dense truncated product it folds
        m = min(Kr, do, di)
        return 4 * (do + di) * Kr * m + 22 * m ** 3 + 2 * do * di * m, 4 * (inputs + 2 * (do + di) * m + do * di)
    if method == "lorafair":   # setup + FAIR_STEPS x (forward + backward ~ 3 x forward)
        if Kr * (do + di) > do * di:       # the solver forms dW densely (see aggregators.lorafair)
            setup = 2 * do * Kr * di + 2 * do * di * r
        else:
            setup = 2 * (do + di) * Kr * Kr + 2 * Kr * di * r + 2 * do * Kr * r
        per_step = 3 * (2 * do * r * r + 6 * do * r)
        return setup + FAIR_STEPS * per_step, 4 * (inputs + FAIR_STEPS * 8 * do * r)
    raise KeyError(method)


def reference(method, ranks=None):
    """The obvious implementation: per-client loops, dense dW, dense SVD, dense per-step solver."""
    avg = lambda X, w: sum(w[k] * X[..., k, :, :] for k in range(X.shape[-3]))   # noqa: E731
    return {
        "fedit": lambda A, B, w: (avg(A, w), avg(B, w)),
        "ffa": lambda A, B, w: (A[..., 0, :, :], avg(B, w)),
        "fedsa": lambda A, B, w: avg(A, w),
        "rolora": lambda A, B, w: (avg(A, w), B[..., 0, :, :]),
        "flora": dense_dW,
        "fedex": lambda A, B, w: dense_dW(A, B, w) - avg(B, w) @ avg(A, w),
        "flexlora": dense_flexlora,
        "lorafair": lambda A, B, w: dense_lorafair(A, B, w, steps=FAIR_STEPS),
        "hetlora": dense_hetlora,
        "rbla": lambda A, B, w: dense_rbla(A, B, w, ranks or [A.shape[-2]] * A.shape[-3]),
        "florist": lambda A, B, w: dense_florist(A, B, w, 0.9),
        "fedsvd": dense_fedsvd,
        "spectral": lambda A, B, w: dense_spectral(A, B, w, ranks),
        "frlora": lambda A, B, w: dense_frlora(A, B, w, A[..., 0, :, :], 0.5 * B[..., 0, :, :]),
    }[method]


def options(method, A, B):
    """Keyword arguments a method needs beyond (A, B, w): FRLoRA's initial adapter (a fixed one)."""
    return {"A_init": A[..., 0, :, :], "B_init": 0.5 * B[..., 0, :, :]} if method == "frlora" else {}


def inputs(geometry, K, r, method, device, ranks=None):
    """Per layer shape: A (L, K, r, d_in), B (L, K, d_out, r); with ranks, client k's zero-padded."""
    g = torch.Generator().manual_seed(0)
    groups = {}
    for shape in GEOMETRIES[geometry]:
        groups[shape] = groups.get(shape, 0) + 1
    data = []
    for (do, di), L in groups.items():
        A = (torch.randn(L, K, r, di, generator=g) / di ** 0.5).to(device)
        B = (torch.randn(L, K, do, r, generator=g) * 1e-2).to(device)
        if method in ("ffa", "fedsvd", "frlora"):
            A[:] = A[:, :1]
        if method == "rolora":
            B[:] = B[:, :1]
        if ranks is not None:
            keep = (torch.arange(r) < torch.tensor(ranks)[:, None]).float().to(device)       # (K, r)
            A, B = A * keep[:, :, None], B * keep[:, None, :]
        data.append((A, B))
    return data


def predicted(method, geometry, K, r, m, dense=False):
    f = b = 0
    for do, di in GEOMETRIES[geometry]:
        fl, by = cost(method, do, di, K, r)
        if dense and method == "lorafair":    # forms dW once and (B_bar + dB) A_bar at every step, fwd + bwd
            fl = 2 * do * di * K * r + FAIR_STEPS * 6 * do * di * r
        if dense and method in ("flexlora", "florist", "spectral"):   # dense dW, then a dense SVD (~14 d_out d_in min)
            fl = 2 * do * di * K * r + 14 * do * di * min(do, di)
        if dense and method == "fedsvd":                  # the dense B_bar A, then its dense SVD
            fl = 2 * do * di * r + 14 * do * di * min(do, di)
        f, b = f + fl, b + by
    return max(f / m["flops"], b / m["bw"])


@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_server_step(benchmark, machine, method, geometry, K, r):
    dev = machine["device"]
    if r > min(min(shape) for shape in GEOMETRIES[geometry]):
        pytest.skip(f"r = {r} exceeds the layers' size")

    def gb(dense):       # inputs plus `dense` d_out x d_in matrices per layer, float32
        return sum(4 * K * r * (do + di) + 4 * dense * do * di for do, di in GEOMETRIES[geometry]) / 2 ** 30
    dense_fast = 1 if method in ("flora", "fedex", "florist", "frlora") or (method == "lorafair" and K * r > 2048) else 0
    dense_ref = 3 if method in ("flora", "fedex", "flexlora", "lorafair", "fedsvd", "spectral", "frlora") else 0
    if gb(dense_fast) > MEM_GB:
        pytest.skip(f"inputs and output {gb(dense_fast):.1f} GB > BENCH_MEM_GB={MEM_GB}")
    bound = predicted(method, geometry, K, r, machine)
    if bound > BUDGET_S / 20:
        pytest.skip(f"even a perfect implementation needs {bound:.1f} s a call here (BENCH_BUDGET_S={BUDGET_S})")
    data = inputs(geometry, K, r, method, dev)
    w = torch.full((K,), 1.0 / K, device=dev)
    fn, kw = AGGREGATORS[method], {"phase": "A"} if method == "rolora" else {}
    if method == "lorafair":
        kw = {"solver": "sgd", "steps": FAIR_STEPS}
    benchmark.pedantic(lambda: [fn(A, B, w, **kw, **options(method, A, B)) for A, B in data] and sync(dev), rounds=2,
                       iterations=1, warmup_rounds=1)
    fast = benchmark.stats.stats.min
    ref_pred = predicted(method, geometry, K, r, machine, dense=True) * 3    # dense code runs ~3x its bound
    ref_fn = reference(method)
    ref = None
    if ref_pred < BUDGET_S and gb(dense_ref) < MEM_GB:
        ref = timeit(lambda: [ref_fn(A, B, w) for A, B in data], dev, repeat=1, warmup=False)
    ROWS.append(dict(device=dev, method=method, geometry=geometry, K=K, r=r, fast=fast, ref=ref, bound=bound))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("geometry", ["toy", "vit_b16"])
@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_server_step_heterogeneous(benchmark, machine, method, geometry, K):
    """Client ranks cycled over HETERO_RANKS, zero-padded to R = 64: cost as at r = R, plus the checks."""
    dev, R = machine["device"], max(HETERO_RANKS)
    if method == "frlora":
        pytest.skip("frlora is defined for one rank shared by every client")
    if R > min(min(shape) for shape in GEOMETRIES[geometry]):
        pytest.skip(f"R = {R} exceeds the layers' size")
    ranks = [HETERO_RANKS[k % len(HETERO_RANKS)] for k in range(K)]
    bound = predicted(method, geometry, K, R, machine)
    if bound > BUDGET_S / 20:
        pytest.skip(f"even a perfect implementation needs {bound:.1f} s a call here (BENCH_BUDGET_S={BUDGET_S})")
    data = inputs(geometry, K, R, method, dev, ranks)
    w = torch.full((K,), 1.0 / K, device=dev)
    fn = AGGREGATORS[method]
    kw = {"phase": "B" if method == "rolora" else None, "steps": FAIR_STEPS if method == "lorafair" else None,
          "solver": "sgd" if method == "lorafair" else None}
    kw = {k: v for k, v in kw.items() if v is not None}
    if method == "rolora":        # phase 'B' shares A; the inputs share B, so take phase 'A'
        kw["phase"] = "A"
    benchmark.pedantic(lambda: [fn(A, B, w, ranks=ranks, **kw) for A, B in data] and sync(dev), rounds=2,
                       iterations=1, warmup_rounds=1)
    fast = benchmark.stats.stats.min
    ref = None
    if predicted(method, geometry, K, R, machine, dense=True) * 3 < BUDGET_S:
        ref_fn = reference(method, ranks)
        ref = timeit(lambda: [ref_fn(A, B, w) for A, B in data], dev, repeat=1, warmup=False)
    ROWS.append(dict(device=dev, method=method, geometry=geometry, K=K, r=f"{'/'.join(map(str, HETERO_RANKS))}",
                     fast=fast, ref=ref, bound=bound))


LSQ_ROWS: list[dict] = []


@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_lorafair_lsq_against_the_sgd_round(benchmark, machine, geometry, K, r):
    """objective='lsq' (one r x r solve per layer) against objective='cosine' (1000 SGD steps: setup
    and per-step time separated by timing FAIR_STEPS and 2 FAIR_STEPS steps), same inputs, same run."""
    dev = machine["device"]
    if r > min(min(shape) for shape in GEOMETRIES[geometry]):
        pytest.skip(f"r = {r} exceeds the layers' size")
    if predicted("lorafair", geometry, K, r, machine) > BUDGET_S / 20:
        pytest.skip(f"the SGD round needs over {BUDGET_S / 20:.1f} s a call here (BENCH_BUDGET_S={BUDGET_S})")
    data = inputs(geometry, K, r, "lorafair", dev)
    w = torch.full((K,), 1.0 / K, device=dev)
    fn = AGGREGATORS["lorafair"]
    benchmark.pedantic(lambda: [fn(A, B, w, objective="lsq", lam=0.01) for A, B in data] and sync(dev), rounds=2,
                       iterations=1, warmup_rounds=1)
    t1, t2 = (timeit(lambda: [fn(A, B, w, solver="sgd", steps=n) for A, B in data] and sync(dev), dev, repeat=2)
              for n in (FAIR_STEPS, 2 * FAIR_STEPS))
    sgd = t1 + (1000 - FAIR_STEPS) * max(t2 - t1, 0) / FAIR_STEPS      # setup once, then 1000 steps
    LSQ_ROWS.append(dict(device=dev, geometry=geometry, K=K, r=r, lsq=benchmark.stats.stats.min, sgd=sgd))


@pytest.fixture(scope="module", autouse=True)
def write_table():
    """After the grid: markdown tables in bench/results/server_grid.md (equal ranks) and
    server_grid_hetero.md (heterogeneous ranks), also printed; a file is rewritten only by a run
    that measured its rows."""
    yield
    from bench.conftest import machine as describe
    for name, rows in (("server_grid.md", [r for r in ROWS if not isinstance(r["r"], str)]),
                       ("server_grid_hetero.md", [r for r in ROWS if isinstance(r["r"], str)])):
        if not rows:
            continue
        lines = [f"Machine: {describe()}. Times are the best of 2 calls (float32); lorafair runs {FAIR_STEPS} SGD "
                 "steps (x50 for a 1000-step round). ref: the obvious implementation (tests/reference.py, per-client "
                 "loops, no input checks); '-' where it would exceed the time budget. bound: max(FLOPs / matmul "
                 "FLOP/s, bytes / copy bandwidth) measured in the same run.", "",
                 "| device | geometry | K | r | method | fast (ms) | ref (ms) | ref / fast | % of bound |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            ref = f"{row['ref'] * 1e3:.1f}" if row["ref"] else "-"
            ratio = f"{row['ref'] / row['fast']:.1f}x" if row["ref"] else "-"
            lines.append(f"| {row['device']} | {row['geometry']} | {row['K']} | {row['r']} | {row['method']} | "
                         f"{row['fast'] * 1e3:.2f} | {ref} | {ratio} | {100 * row['bound'] / row['fast']:.1f}% |")
        os.makedirs("bench/results", exist_ok=True)
        with open(os.path.join("bench/results", name), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))
    if LSQ_ROWS:
        lines = [f"Machine: {describe()}. LoRA-FAIR's server step, float32, best of 2: objective='lsq' (closed "
                 f"form) against objective='cosine' (1000 SGD steps: the time at {FAIR_STEPS} steps plus {1000 - FAIR_STEPS} times the "
                 f"per-step time, from the difference between {FAIR_STEPS} and {2 * FAIR_STEPS} steps).", "",
                 "| device | geometry | K | r | lsq (ms) | SGD round (ms) | SGD / lsq |", "|---|---|---|---|---|---|---|"]
        for row in LSQ_ROWS:
            lines.append(f"| {row['device']} | {row['geometry']} | {row['K']} | {row['r']} | {row['lsq'] * 1e3:.2f} | "
                         f"{row['sgd'] * 1e3:.1f} | {row['sgd'] / row['lsq']:.0f}x |")
        with open(os.path.join("bench/results", "server_grid_lsq.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))
