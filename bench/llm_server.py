"""What each method costs a server at language-model scale: time and peak memory of one round's
aggregation (states.aggregate_states, diagnostics included), per method and factor dtype.

    python bench/llm_server.py            # writes bench/results/llm_server.md; about 15 minutes on 2 cores

Geometry (7B-like: Llama-2-7B's widths with grouped-query k/v): 32 blocks of seven adapted layers, d 4096,
d_kv 1024, d_ff 11008: q, o (4096 x 4096), k, v (1024 x 4096), gate, up (11008 x 4096), down
(4096 x 11008); 224 layers, rank 16, K = 10 clients. Each method runs in its own process on one
block (7 layers, the same shapes as every other block), one thread; its time is measured and x 32
gives the model's. Peak memory is the process's peak RSS above its inputs during the call. Methods
that fold (FLoRA, FedEx-LoRA, FLoRIST, FRLoRA) return a dense d_out x d_in update for every layer:
the model's total is computed (5.7e9 entries) and said where it exceeds this machine.
The dense reference (tests/reference.py: the method computed from the dense dW) is timed on one
k/v layer (1024 x 4096) only, where every dense SVD fits in seconds; the fast method's time on
the same layer is beside it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aggregators import AGGREGATORS  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
BLOCKS, K, R = 32, 10, 16
FOLDS = ("flora", "fedex", "florist", "frlora")
MEMORY_GB = int([x for x in open("/proc/meminfo") if x.startswith("MemTotal")][0].split()[1]) / 2**20

ONE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from states import aggregate_states
torch.manual_seed(0)
torch.set_num_threads(1)
dt, method, K, R = getattr(torch, {dtype!r}), {method!r}, {K}, {R}
shapes = {shapes!r}
shared = method in ("ffa", "fedsvd", "frlora", "rolora")          # clients share A (they trained B)
A0 = {{p: torch.randn(R, d_in) / d_in ** 0.5 for p, (d_out, d_in) in shapes.items()}}
states = []
for k in range(K):
    s = {{}}
    for p, (d_out, d_in) in shapes.items():
        s[p + ".lora_A.weight"] = (A0[p] if shared else torch.randn(R, d_in) / d_in ** 0.5).to(dt)
        s[p + ".lora_B.weight"] = (0.01 * torch.randn(d_out, R)).to(dt)
    states.append(s)
opts = {{"phase": "B"}} if method == "rolora" else {{}}
if method == "frlora":
    opts["init"] = {{k: v.clone() for k, v in states[0].items()}}
rss = lambda key: int([x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1]) / 2**20
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
tic = time.perf_counter()
out = aggregate_states(states, [1 / K] * K, method, **opts)
sec = time.perf_counter() - tic
print(sec, rss("VmHWM") - base, sum(v.numel() * v.element_size() for v in out.delta_w.values()) / 2**30)
"""

DENSE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from aggregators import AGGREGATORS, eq8_minimiser, weighted_mean
from tests import reference as ref
torch.manual_seed(0)
torch.set_num_threads(1)
method, K, R, (d_out, d_in) = {method!r}, {K}, {R}, {shape!r}
A, B = torch.randn(K, R, d_in) / d_in ** 0.5, 0.01 * torch.randn(K, d_out, R)
if method in ("ffa", "fedsvd", "frlora", "rolora"):
    A[:] = A[0]
w = torch.full((K,), 1 / K)
opts = {{"phase": "B"}} if method == "rolora" else {{}}
if method == "frlora":
    opts.update(A_init=A[0], B_init=B[0])
dense = {{
    "fedit": lambda: weighted_mean(B, w) @ weighted_mean(A, w), "ffa": lambda: weighted_mean(B, w) @ A[0],
    "rolora": lambda: weighted_mean(B, w) @ A[0], "flora": lambda: ref.dense_dW(A, B, w),
    "fedex": lambda: ref.dense_dW(A, B, w) - weighted_mean(B, w) @ weighted_mean(A, w),
    "fedsa": lambda: weighted_mean(A, w), "flexlora": lambda: ref.dense_flexlora(A, B, w),
    "lorafair": lambda: eq8_minimiser(A, B, w, 0.01, iters=100), "hetlora": lambda: ref.dense_hetlora(A, B, w),
    "rbla": lambda: ref.dense_rbla(A, B, w, [R] * K), "florist": lambda: ref.dense_florist(A, B, w, 0.9),
    "fedsvd": lambda: ref.dense_fedsvd(A, B, w), "spectral": lambda: ref.dense_spectral(A, B, w),
    "frlora": lambda: ref.dense_frlora(A, B, w, A[0], B[0])}}[method]
def best(f, n=2):
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        f()
        times.append(time.perf_counter() - tic)
    return min(times)
fast = best(lambda: AGGREGATORS[method](A, B, w, **opts))
print(fast, best(dense, 1))
"""


def run(code: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return [float(x) for x in res.stdout.split()]


def main() -> None:
    rows = {}
    for method in AGGREGATORS:
        rows[method] = {}
        for dtype in ("float32", "bfloat16"):
            sec, peak, dense_out = run(ONE.format(root=ROOT, dtype=dtype, method=method, K=K, R=R, shapes=SHAPES))
            rows[method][dtype] = {"block_s": sec, "block_peak_gb": peak, "returned_dense_gb": dense_out * BLOCKS}
        rows[method]["k_proj"] = dict(zip(("fast_s", "dense_s"), run(DENSE.format(root=ROOT, method=method, K=K, R=R,
                                                                                   shape=SHAPES["k_proj"]))))
        print(method, rows[method], file=sys.stderr)
    with open(os.path.join(ROOT, "bench", "results", "llm_server.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"Server step at 7B geometry ({BLOCKS} blocks x 7 layers: d 4096, d_kv 1024, d_ff 11008; r {R}, "
             f"K {K}); one block measured, model = x {BLOCKS}; one thread; machine memory {MEMORY_GB:.0f} GB.", "",
             "| method | model s (float32) | model s (bf16) | peak GB, one block (f32 / bf16) | dense returned, model "
             "(f32 / bf16) | k_proj: fast vs dense reference |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        f32, b16, kp = r["float32"], r["bfloat16"], r["k_proj"]
        dense = (f"{f32['returned_dense_gb']:.1f} / {b16['returned_dense_gb']:.1f} GB"
                 + (" (over this machine's memory: run it layer group by group)"
                    if f32["returned_dense_gb"] > 0.8 * MEMORY_GB else "")) if m in FOLDS else "none"
        lines.append(f"| {m} | {BLOCKS * f32['block_s']:.0f} | {BLOCKS * b16['block_s']:.0f} | "
                     f"{f32['block_peak_gb']:.2f} / {b16['block_peak_gb']:.2f} | {dense} | "
                     f"{kp['fast_s'] * 1e3:.0f} ms vs {kp['dense_s'] * 1e3:.0f} ms |")
    lines += ["", "Command: `python bench/llm_server.py`"]
    with open(os.path.join(ROOT, "bench", "results", "llm_server.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
