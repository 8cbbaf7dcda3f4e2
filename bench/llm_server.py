"""What each method costs a server at language-model scale: time and peak memory of one round's
aggregation of a whole 7B-like model (states.aggregate_states, with and without its per-layer
diagnostics), per method and factor dtype, and each method against its dense reference, shape by
shape. Sizes in GiB (2^30 bytes).

    python bench/llm_server.py            # writes bench/results/llm_server.md and .json; about 45 minutes
    python bench/llm_server.py --table    # the table again from bench/results/llm_server.json

Geometry (Llama-2-7B's widths with grouped-query k/v): 32 blocks of seven adapted layers, d 4096,
d_kv 1024, d_ff 11008: q, o (4096 x 4096), k, v (1024 x 4096), gate, up (11008 x 4096), down
(4096 x 11008); 224 layers, rank 16, K = 10 clients, random factors. One thread, each measurement
in its own process; peak memory is the process's peak RSS above its inputs during the call.

The whole model: one aggregate_states call over all 224 layers' states (1.37 GiB of client
factors in float32). The methods that fold (FOLDS) return a dense d_out x d_in update per layer,
5.7e9 entries for the model: where that and the inputs do not fit in this machine's memory (with
HEADROOM GiB to spare), the model is aggregated block by block, as a user would to fold each block
into the base before the next (each block's updates are dropped here): all 32 blocks are run and
timed either way, and the table says which, with what one call would need.

Dense references (tests/reference.py: the method computed from the dense dW; LoRA-FAIR's Eq. 8 by
L-BFGS) are timed, with their peak memory, on each of the four layer shapes, smallest first, and
capped: a shape is
measured only if the time the cost model predicts from the last measured shape is under CAP_S
seconds, and its dense inputs fit; above that it is extrapolated with the cost model (d_out d_in
per layer, times min(d_out, d_in) for references that take a dense SVD; memory by d_out d_in) and
marked so. The model's dense time is the per-shape times summed over its 224 layers; its memory,
one layer at a time, the largest layer's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aggregators import AGGREGATORS  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
KINDS = {"k/v": (1024, 4096), "q/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}  # by cost
PER_BLOCK = {"k/v": 2, "q/o": 2, "gate/up": 2, "down": 1}
BLOCKS, K, R = 32, 10, 16
FOLDS = ("flora", "fedex", "florist", "frlora")
SVD_REFS = ("flexlora", "florist", "fedsvd", "spectral")   # their dense references take an SVD of a dense matrix
CAP_S, HEADROOM = 60.0, 4.0                                # seconds, GiB
GB = 2**30
MEMORY_GB = int([x for x in open("/proc/meminfo") if x.startswith("MemTotal")][0].split()[1]) / 2**20

MODEL = """
import sys, time, torch
sys.path.insert(0, {root!r})
from states import aggregate_states
torch.manual_seed(0)
torch.set_num_threads(1)
dt, method, K, R, blocks, one_call, diagnose = getattr(torch, {dtype!r}), {method!r}, {K}, {R}, {blocks}, {one_call}, {diagnose}
shapes = {shapes!r}
shared = method in ("ffa", "fedsvd", "frlora", "rolora")          # clients share A (they trained B)
mlp = ("gate_proj", "up_proj", "down_proj")
layers = [(f"model.layers.{{b}}.{{'mlp' if p in mlp else 'self_attn'}}.{{p}}", s) for b in range(blocks) for p, s in shapes.items()]
A0 = {{n: (torch.randn(R, d_in) / d_in ** 0.5).to(dt) for n, (d_out, d_in) in layers}}
states = [{{}} for _ in range(K)]
for n, (d_out, d_in) in layers:
    for s in states:
        s[n + ".lora_A.weight"] = A0[n] if shared else (torch.randn(R, d_in) / d_in ** 0.5).to(dt)
        s[n + ".lora_B.weight"] = (0.01 * torch.randn(d_out, R)).to(dt)
opts = {{"phase": "B"}} if method == "rolora" else {{}}
if method == "frlora":
    opts["init"] = dict(states[0])
inputs = sum({{x.data_ptr(): x.numel() * x.element_size() for s in states for x in s.values()}}.values())  # shared A once
rss = lambda key: int([x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, returned = rss("VmRSS"), 0
tic = time.perf_counter()
for part in ([None] if one_call else range(blocks)):
    mine = lambda key: part is None or key.startswith(f"model.layers.{{part}}.")
    out = aggregate_states([{{k: v for k, v in s.items() if mine(k)}} for s in states], [1 / K] * K, method,
                           diagnose=diagnose,
                           **{{k: ({{n: x for n, x in v.items() if mine(n)}} if k == "init" else v) for k, v in opts.items()}})
    returned += sum(v.numel() * v.element_size() for v in out.delta_w.values())
    assert len(out.cos) == (len(layers) if part is None else len(shapes)) * diagnose
    del out                                     # block by block: the user folds this block's updates, then drops them
sec = time.perf_counter() - tic
print(sec, rss("VmHWM") - base, returned, inputs)
"""

DENSE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from aggregators import AGGREGATORS, eq8_minimiser, weighted_mean
from tests import reference as ref
torch.manual_seed(0)
torch.set_num_threads(1)
method, K, R, (d_out, d_in), measure_dense = {method!r}, {K}, {R}, {shape!r}, {measure_dense}
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
rss = lambda key: int([x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
print(fast, best(dense, 1) if measure_dense else -1, rss("VmHWM") - base if measure_dense else -1)
"""


def run(code: str) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return [float(x) for x in res.stdout.split()]


def available_gb() -> float:
    return int([x for x in open("/proc/meminfo") if x.startswith("MemAvailable")][0].split()[1]) / 2**20


def dense_gb(dtype: str) -> float:
    """The folded updates of the whole model, GiB."""
    return BLOCKS * sum(o * i for o, i in SHAPES.values()) * (4 if dtype == "float32" else 2) / GB


def cost(method: str, shape: tuple[int, int]) -> float:
    """The dense reference's cost model, up to a constant: d_out d_in (x min(d_out, d_in) for an SVD)."""
    return shape[0] * shape[1] * (min(shape) if method in SVD_REFS else 1)


def references(method: str) -> dict:
    """Fast method and dense reference on each layer shape; dense measured under the cap (time, and
    peak memory above the inputs), else extrapolated from the last measured shape."""
    out, last = {}, None
    for kind, shape in KINDS.items():
        fits = 8 * shape[0] * shape[1] * 6 < 0.25 * MEMORY_GB * GB           # dense dW and an SVD's workspace
        if last is None:
            measure, predicted, peak = fits, None, None
        else:
            predicted = out[last]["dense_s"] * cost(method, shape) / cost(method, KINDS[last])
            peak = out[last]["dense_gb"] * shape[0] * shape[1] / (KINDS[last][0] * KINDS[last][1])
            measure = fits and predicted < CAP_S
        fast, dense, rss = run(DENSE.format(root=ROOT, method=method, K=K, R=R, shape=shape, measure_dense=measure))
        out[kind] = {"fast_s": fast, "dense_s": dense if measure else predicted,
                     "dense_gb": rss / GB if measure else peak, "extrapolated": not measure}
        if measure:
            last = kind
    return out


def inputs_gb(dtype: str) -> float:
    """The clients' factors for the whole model, GiB."""
    return BLOCKS * K * R * sum(o + i for o, i in SHAPES.values()) * (4 if dtype == "float32" else 2) / GB


def model(method: str, dtype: str, diagnose: bool = True) -> dict:
    need = dense_gb(dtype) + 2 * inputs_gb(dtype) if method in FOLDS else 0.0   # updates, inputs and their stack
    one_call = method not in FOLDS or need + HEADROOM < available_gb()
    sec, peak, returned, inputs = run(MODEL.format(root=ROOT, dtype=dtype, method=method, K=K, R=R, blocks=BLOCKS,
                                                   shapes=SHAPES, one_call=one_call, diagnose=diagnose))
    return {"s": sec, "peak_gb": peak / GB, "returned_gb": returned / GB, "inputs_gb": inputs / GB,
            "one_call": one_call, "one_call_needs_gb": need}


def num(x, fmt: str, star: bool = False) -> str:
    return "does not fit" if x is None else format(x, fmt) + ("*" if star else "")


def table(rows: dict) -> list[str]:
    """The two tables of bench/README.md from the measured rows."""
    b = lambda x: "" if x["one_call"] else " b"                              # noqa: E731
    lines = [f"Whole model, one round: {BLOCKS} blocks x 7 layers (d 4096, d_kv 1024, d_ff 11008), r {R}, K {K}; "
             f"one thread; this machine's memory {MEMORY_GB:.1f} GiB.", "",
             "| method | s (float32) | s (bf16) | s (float32, diagnose=False) | peak GiB above inputs (f32 / bf16) "
             "| dense updates returned (f32 / bf16) |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        f, h, q = r["float32"], r["bfloat16"], r["float32, diagnose=False"]
        ret = "none" if m not in FOLDS else " / ".join(
            f"{x['returned_gb']:.1f} GiB" + ("" if x["one_call"] else f" (one call needs {x['one_call_needs_gb']:.1f}: "
                                             "block by block)") for x in (f, h))
        lines.append(f"| {m} | {f['s']:.0f}{b(f)} | {h['s']:.0f}{b(h)} | {q['s']:.1f}{b(q)} | {f['peak_gb']:.2f}{b(f)} / "
                     f"{h['peak_gb']:.2f}{b(h)} | {ret} |")
    lines += ["", "b: aggregated block by block (each block's dense updates dropped before the next). Inputs: "
              f"{rows['fedit']['float32']['inputs_gb']:.2f} GiB (float32), {rows['fedit']['bfloat16']['inputs_gb']:.2f} "
              "GiB (bf16).", "", "Each method against its dense reference, float32, one layer of each shape: seconds "
              f"(* extrapolated: the cost model's prediction passed {CAP_S:.0f} s); model: summed over the 224 layers.", "",
              "| method | k/v: fast / dense | q/o | gate/up | down | model: method alone / dense reference "
              "| dense reference's peak GiB, gate/up layer |", "|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        ref = r["reference"]
        cell = lambda x: f"{x['fast_s']:.3f} / {num(x['dense_s'], '.2f', x['extrapolated'])}"   # noqa: E731
        known = all(ref[k]["dense_s"] is not None for k in KINDS)
        total = {key: BLOCKS * sum(PER_BLOCK[k] * ref[k][key] for k in KINDS) if key == "fast_s" or known else None
                 for key in ("fast_s", "dense_s")}
        star = any(ref[k]["extrapolated"] for k in KINDS)
        lines.append(f"| {m} | " + " | ".join(cell(ref[k]) for k in KINDS)
                     + f" | {total['fast_s']:.1f} / {num(total['dense_s'], '.0f', star)} | "
                     f"{num(ref['gate/up']['dense_gb'], '.2f', ref['gate/up']['extrapolated'])} |")
    return lines + ["", "Command: `python bench/llm_server.py`"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="print the tables again from the committed figures")
    args = p.parse_args()
    path = os.path.join(ROOT, "bench", "results", "llm_server.json")
    if args.table:
        with open(path) as f:
            print("\n".join(table(json.load(f))))
        return
    rows = {}
    for method in AGGREGATORS:
        rows[method] = {dtype: model(method, dtype) for dtype in ("float32", "bfloat16")}
        rows[method]["float32, diagnose=False"] = model(method, "float32", diagnose=False)
        rows[method]["reference"] = references(method)
        print(method, rows[method], file=sys.stderr, flush=True)
        with open(path + ".partial", "w") as f:        # the committed figures stay until the run completes
            json.dump(rows, f, indent=1)
    os.replace(path + ".partial", path)
    lines = table(rows)
    with open(os.path.join(ROOT, "bench", "results", "llm_server.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
