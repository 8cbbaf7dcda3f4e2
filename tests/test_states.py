"""aggregate_states on whole client state dicts: the same numbers as per-layer calls, every key form
of HF PEFT, and a round trip through a real PEFT model; the bias diagnostics against dense ones."""
import os

import pytest
import torch

from aggregators import AGGREGATORS, eq8_objective, fedit, lorafair
from states import aggregate_states, bias_bounds, diagnostics
from tests.reference import dense_dW
from tests.test_aggregators import OPTS, R, avg, clients, product, run


def client_states(K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.proj": (8, 8), "blocks.1.attn.proj": (8, 8), "blocks.0.mlp.fc2": (8, 12)}
    states = []
    for _ in range(K):
        s = {}
        for p, (d_out, d_in) in shapes.items():
            s[p + ".lora_A.weight"] = torch.randn(R, d_in, generator=g, dtype=torch.float64)
            s[p + ".lora_B.weight"] = torch.randn(d_out, R, generator=g, dtype=torch.float64)
        s["head.weight"] = torch.randn(5, 8, generator=g, dtype=torch.float64)
        s["head.bias"] = torch.randn(5, generator=g, dtype=torch.float64)
        states.append(s)
    return states


@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora", "fedex", "fedsa", "lorafair"])
def test_aggregate_states_matches_per_layer_calls_and_fedavgs_the_head(method):
    states = client_states()
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    out = aggregate_states(states, w, method, **OPTS.get(method, {}))
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(out.state[key], sum(w[k] * states[k][key] for k in range(3)))
    for p in ("blocks.0.attn.proj", "blocks.1.attn.proj", "blocks.0.mlp.fc2"):
        A = torch.stack([s[p + ".lora_A.weight"] for s in states])
        B = torch.stack([s[p + ".lora_B.weight"] for s in states])
        u = run(method, A, B, w)
        for got, want in ((out.state.get(p + ".lora_A.weight"), u.A), (out.state.get(p + ".lora_B.weight"), u.B),
                          (out.delta_w.get(p), u.delta_w)):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        cos, rel, scale = diagnostics(u, A, B, w)
        assert out.cos[p] == pytest.approx(cos.item()) and out.rel_err[p] == pytest.approx(rel.item())
        applied = product(u, A, B, w)                     # ||dW_applied|| / ||dW||, formed here
        assert out.scale[p] == pytest.approx((applied.norm() / dense_dW(A, B, w).norm()).item(), rel=1e-9)
        if method == "lorafair":                          # Eq. 8 at dB = 0 and at its dB, formed densely
            want = [eq8_objective(A, B, w, X, 0.01).item() for X in (avg(B, w), u.B)]
            assert out.eq8[p] == pytest.approx(want, rel=1e-9, abs=1e-15) and out.eq8[p][1] <= out.eq8[p][0]
        else:
            assert p not in out.eq8


def test_aggregate_states_bad_input():
    states = client_states()
    w = [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match="unknown method"):
        aggregate_states(states, w, "fedprox")
    bad = [dict(s) for s in states]
    del bad[1]["head.bias"]
    with pytest.raises(ValueError, match="client 1's state dict has different keys"):
        aggregate_states(bad, w, "fedit")
    bad = [dict(s) for s in states]
    bad[2]["blocks.0.mlp.fc2.lora_A.weight"] = torch.zeros(R + 1, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer blocks.0.mlp.fc2: client 2's factors"):
        aggregate_states(bad, w, "fedit")
    bad = [{k: v for k, v in s.items() if k != "blocks.0.mlp.fc2.lora_B.weight"} for s in states]
    with pytest.raises(ValueError, match="no lora_B.weight"):
        aggregate_states(bad, w, "fedit")
    with pytest.raises(ValueError, match="3 clients"):
        aggregate_states(states, [0.5, 0.5], "fedit")
    bad = [dict(s) for s in states]
    bad[0]["blocks.1.attn.proj.lora_B.weight"] = torch.full((8, R), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="blocks.1.attn.proj: client 0's B"):
        aggregate_states(bad, w, "lorafair")


def peft_forms(states, adapter):
    """A state in the key form of a live PEFT model (`.lora_A.<adapter>.weight`, under base_model.model.)."""
    out = []
    for s in states:
        d = {}
        for k, v in s.items():
            k = "base_model.model." + k
            if adapter and (".lora_A." in k or ".lora_B." in k):
                k = k.replace(".weight", f".{adapter}.weight")
            d[k] = v
        out.append(d)
    return out


@pytest.mark.parametrize("adapter", [None, "default", "client_7"])
@pytest.mark.parametrize("method", ["fedit", "flora", "fedsa", "lorafair"])
def test_aggregate_states_takes_and_returns_peft_key_forms(method, adapter):
    states = client_states()
    w = [0.2, 0.3, 0.5]
    ours = aggregate_states(states, w, method, **OPTS.get(method, {}))
    theirs = aggregate_states(peft_forms(states, adapter), w, method, **OPTS.get(method, {}))
    assert theirs.state.keys() == peft_forms([ours.state], adapter)[0].keys()
    for k, v in peft_forms([ours.state], adapter)[0].items():
        assert torch.equal(theirs.state[k], v)
    assert {f"base_model.model.{p}": v for p, v in ours.cos.items()} == theirs.cos
    assert {f"base_model.model.{p}" for p in ours.delta_w} == set(theirs.delta_w)


def test_aggregate_states_without_any_lora_layer_is_an_error():
    states = [{"blocks.0.attn.proj.lora_down.weight": torch.ones(2, 3), "head.weight": torch.ones(4, 2)}] * 2
    with pytest.raises(ValueError, match=r"no LoRA layer found among the 2 keys \(e.g. \['blocks.0.attn.proj.lora_down"):
        aggregate_states(states, [0.5, 0.5], "fedit")
    two = [{"x.lora_A.a.weight": torch.ones(1, 3), "x.lora_B.a.weight": torch.ones(3, 1),
            "x.lora_A.b.weight": torch.ones(1, 3), "x.lora_B.b.weight": torch.ones(3, 1)}] * 2
    with pytest.raises(ValueError, match="layer x: several adapters"):
        aggregate_states(two, [0.5, 0.5], "fedit")


def test_aggregate_states_half_precision_head_and_factors():
    states = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in client_states()]
    w = [0.2, 0.3, 0.5]
    out = aggregate_states(states, w, "fedex")
    ref = aggregate_states([{k: v.float() for k, v in s.items()} for s in states], w, "fedex")
    for k, v in out.state.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref.state[k].to(torch.bfloat16))
    for p, v in out.delta_w.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref.delta_w[p].to(torch.bfloat16))


# ----------------------------------------------------------------------------- with HF PEFT

def readme_example() -> str:
    """The code block of README's 'Use the aggregators in your own code'."""
    import pathlib
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Use the aggregators in your own code", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs_and_aggregates_with_lorafair():
    code = readme_example()
    assert 15 <= len(code.strip().splitlines()) <= 30
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    from peft import get_peft_model_state_dict
    states, w, model = ns["states"], ns["w"], ns["model"]
    got = get_peft_model_state_dict(model)
    assert got.keys() == states[0].keys()
    for k in got:
        if k.endswith("lora_A.weight") or ".head." in k or k.endswith(("head.weight", "head.bias")):
            # LoRA-FAIR keeps A_bar; the head is FedAvg'd
            torch.testing.assert_close(got[k], sum(p * s[k] for p, s in zip(w.tolist(), states)))
    layer = next(k for k in got if k.endswith("lora_B.weight"))
    A = torch.stack([s[layer.replace("lora_B", "lora_A")] for s in states]).double()
    B = torch.stack([s[layer] for s in states]).double()
    cos = lambda X, Y: (X * Y).sum() / (X.norm() * Y.norm())           # noqa: E731
    dW = dense_dW(A, B, w)
    fair = cos(dW, got[layer].double() @ avg(A, w))
    assert fair >= cos(dW, avg(B, w) @ avg(A, w)) - 1e-9            # the residual only raises the cosine


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_peft_clients_aggregated_and_loaded_back(method):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    base = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["attn.proj", "mlp.fc2"],
                                            modules_to_save=["head"]))
    template = get_peft_model_state_dict(model)
    g = torch.Generator().manual_seed(1)
    states = [{k: torch.randn(v.shape, generator=g) for k, v in template.items()} for _ in range(3)]
    shared = "lora_A" if method in ("ffa", "rolora", "fedsvd", "frlora") else None   # one frozen A
    for s in states[1:]:
        for k in s:
            if shared and shared in k:
                s[k] = states[0][k].clone()
    w = [0.2, 0.3, 0.5]
    init = {k: v * 0.5 for k, v in states[0].items() if "lora_" in k}      # frlora: its initial adapter
    out = aggregate_states(states, w, method, **({"phase": "B"} if method == "rolora" else
                                                 {"steps": 50} if method == "lorafair" else
                                                 {"init": init} if method == "frlora" else {}))
    assert set(out.state) <= set(template)
    result = set_peft_model_state_dict(model, out.state)
    assert not result.unexpected_keys
    back = get_peft_model_state_dict(model)
    for k, v in out.state.items():
        assert torch.equal(back[k], v)
    scaling = 6 / 2
    for layer, dw in out.delta_w.items():                             # the caller's fold, as README shows
        model.get_submodule(layer).base_layer.weight.data += scaling * dw
    if method == "flora":
        for k in back:
            if "lora_B" in k:
                model.get_submodule(k.rsplit(".lora_B", 1)[0]).lora_B["default"].weight.data.zero_()
    if method in ("flora", "fedex", "frlora"):            # exact: W0 + s dW in every layer (frlora: its init + fold)
        for layer in out.delta_w:
            A = torch.stack([s[layer + ".lora_A.weight"] for s in states])
            B = torch.stack([s[layer + ".lora_B.weight"] for s in states])
            m = model.get_submodule(layer)
            eff = m.base_layer.weight + scaling * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            name = layer[len("base_model.model."):] + ".weight"
            want = W0[name] + scaling * dense_dW(A.double(), B.double(), torch.tensor(w, dtype=torch.float64))
            torch.testing.assert_close(eff.double(), want, rtol=1e-5, atol=1e-5)


def test_aggregators_and_states_work_copied_alone(tmp_path):
    """Copied into an empty folder, the two files import with torch and the standard library only
    (every other module of this project and every other third-party package is blocked)."""
    import pathlib
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).parents[1]
    for name in ("aggregators.py", "states.py"):
        shutil.copy(root / name, tmp_path / name)
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in ('aggregators', 'states', 'torch') or top in sys.stdlib_module_names:\n"
        "            return None\n"
        "        raise ImportError(f'blocked: {name}')\n"
        "import torch\n"                       # torch's own optional imports happen before the block
        "sys.meta_path.insert(0, Block())\n"
        "from states import aggregate_states\n"
        "s = [{'l.lora_A.weight': torch.ones(1, 3) * k, 'l.lora_B.weight': torch.ones(2, 1)} for k in (1, 3)]\n"
        "out = aggregate_states(s, [0.5, 0.5], 'lorafair')\n"
        "assert torch.equal(out.state['l.lora_A.weight'], torch.full((1, 3), 2.0))\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    import ast                                # and modules torch already loaded (numpy) are not used either
    for name in ("aggregators.py", "states.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                tops = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
                    [(node.module or "").split(".")[0]]
                for top in tops:
                    assert top in ("torch", "aggregators", "__future__") or top in sys.stdlib_module_names, \
                        f"{name} imports {top}"


# ----------------------------------------------------------------------------- diagnostics

def test_bias_bounds_against_the_dense_projection():
    A, B, w = clients(K=4, lead=(3,), d_out=11, d_in=8, r=3)
    fedit_cos, ceiling = bias_bounds(A, B, w)
    dW = dense_dW(A, B, w)
    A_bar = avg(A, w)
    P = A_bar.mT @ torch.linalg.pinv(A_bar @ A_bar.mT) @ A_bar                  # (3, d_in, d_in)
    cos = lambda X, Y: (X * Y).sum((-2, -1)) / (X.flatten(-2).norm(dim=-1) * Y.flatten(-2).norm(dim=-1))  # noqa
    torch.testing.assert_close(ceiling, cos(dW, dW @ P), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fedit_cos, cos(dW, avg(B, w) @ A_bar), rtol=1e-10, atol=1e-12)
    assert (fedit_cos <= ceiling + 1e-12).all() and (ceiling < 1 - 1e-3).all()   # d_in > r: a real ceiling
    B_star = dW @ A_bar.mT @ torch.linalg.pinv(A_bar @ A_bar.mT)                 # the B' that reaches it
    torch.testing.assert_close(cos(dW, B_star @ A_bar), ceiling, rtol=1e-10, atol=1e-12)
    for seed in range(20):                                                      # and no B' goes beyond
        Bp = torch.randn(B_star.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert (cos(dW, (B_star + 0.1 * Bp) @ A_bar) <= ceiling + 1e-12).all()
    for fair in (lorafair(A, B, w, solver="sgd", steps=300, lr=0.5, lam=0.0), lorafair(A, B, w, lam=0.0)):
        assert (cos(dW, fair.B @ fair.A) <= ceiling + 1e-12).all()
        assert (cos(dW, fair.B @ fair.A) > fedit_cos).all()
    torch.testing.assert_close(cos(dW, fair.B @ fair.A), ceiling, rtol=1e-12, atol=1e-12)   # solved: reached
    A_low = A.clone()
    A_low[..., 2, :] = A_low[..., 1, :]                                         # rank-deficient A_bar: pinv
    _, ceiling_low = bias_bounds(A_low, B, w)
    A_bar = avg(A_low, w)
    P = A_bar.mT @ torch.linalg.pinv(A_bar @ A_bar.mT, hermitian=True) @ A_bar
    torch.testing.assert_close(ceiling_low, cos(dense_dW(A_low, B, w), dense_dW(A_low, B, w) @ P),
                               rtol=1e-8, atol=1e-10)


def test_diagnostics_measure_the_bias():
    A, B, w = clients(K=4)
    cos, rel, _ = diagnostics(fedit(A, B, w), A, B, w)
    assert cos < 0.99 and rel > 0.05
    for method in ("flora", "fedex"):
        cos, rel, scale = diagnostics(run(method, A, B, w), A, B, w)
        assert cos == pytest.approx(1.0, abs=1e-12) and rel < 1e-12
    cos_fair, *_ = diagnostics(lorafair(A, B, w), A, B, w)
    assert cos_fair > diagnostics(fedit(A, B, w), A, B, w)[0]


@pytest.mark.parametrize("method", ["fedit", "ffa", "rbla", "lorafair", "flexlora"])
def test_aggregate_states_with_the_previous_state_keeps_what_no_client_trained(method):
    """Clients of ranks 1 and 2 in a rank-3 adapter: slot 2 is nobody's. Given the previous global
    state it keeps its value there (per-slot methods), and FFA-LoRA's A is the previous one bit for
    bit; without it, the aggregators return zeros there."""
    g = torch.Generator().manual_seed(0)
    prev = {"l.lora_A.weight": torch.randn(3, 7, generator=g, dtype=torch.float64),
            "l.lora_B.weight": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    states = []
    for r in (1, 2):
        A = prev["l.lora_A.weight"].clone() if method == "ffa" else torch.randn(3, 7, generator=g, dtype=torch.float64)
        B = torch.randn(5, 3, generator=g, dtype=torch.float64)
        A[r:], B[:, r:] = 0, 0
        states.append({"l.lora_A.weight": A, "l.lora_B.weight": B})
    bare = aggregate_states(states, [0.4, 0.6], method, ranks=[1, 2])
    kept = aggregate_states(states, [0.4, 0.6], method, ranks=[1, 2], previous=prev)
    A, B = kept.state["l.lora_A.weight"], kept.state["l.lora_B.weight"]
    if method == "flexlora":                                   # re-factorised: nothing carried
        assert all(torch.equal(bare.state[k], kept.state[k]) for k in bare.state)
        return
    assert bare.state["l.lora_A.weight"][2].abs().max() == 0 and bare.state["l.lora_B.weight"][:, 2].abs().max() == 0
    assert torch.equal(A[2], prev["l.lora_A.weight"][2]) and torch.equal(B[:, 2], prev["l.lora_B.weight"][:, 2])
    assert torch.equal(A[:2], bare.state["l.lora_A.weight"][:2]) and torch.equal(B[:, :2], bare.state["l.lora_B.weight"][:, :2])
    if method == "ffa":
        assert torch.equal(A, prev["l.lora_A.weight"])


MEASURED = """
import sys, torch
sys.path.insert(0, {root!r})
from states import aggregate_states
torch.manual_seed(0)
{setup}
inputs = sum({{x.data_ptr(): x.numel() * x.element_size() for s in states for x in s.values()}}.values()) / 2**20
with open("/proc/self/clear_refs", "w") as f:    # the peak from here on
    f.write("5")
rss = lambda key: int([x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1])
before = rss("VmRSS")
out = aggregate_states(states, [1 / K] * K, {method!r}, **opts)
returned = sum(x.numel() * x.element_size() for x in out.delta_w.values()) / 2**20
print((rss("VmHWM") - before) / 1024, returned, inputs, len(out.cos))
"""
STACK = """
L, K, r, d, dt = 32, 4, 4, 1024, getattr(torch, {dtype!r})   # 32 same-shape layers: one stack
shared = {{i: torch.randn(r, d).to(dt) for i in range(L)}}   # a shared A where the method needs one
own = {method!r} not in ("ffa", "rolora", "fedsvd", "frlora")
states = [{{f"blocks.{{i}}.mlp.fc1.lora_A.weight": torch.randn(r, d).to(dt) if own else shared[i] for i in range(L)}}
          for _ in range(K)]
for s in states:
    s.update({{f"blocks.{{i}}.mlp.fc1.lora_B.weight": torch.randn(d, r).to(dt) for i in range(L)}})
opts = {{"phase": "B"}} if {method!r} == "rolora" else {{"init": dict(states[0])}} if {method!r} == "frlora" else {{}}
"""
GROUPS = """
K, r, d_out, opts = 8, 16, 256, {{}}              # 6 shape groups (d_in) of 16 layers, 10-30 MiB of factors each
states = [{{}} for _ in range(K)]
for g, d_in in enumerate((1024, 1536, 2048, 2560, 3072, 3584)):
    for i in range(16):
        for s in states:
            s[f"g{{g}}.l{{i}}.lora_A.weight"], s[f"g{{g}}.l{{i}}.lora_B.weight"] = torch.randn(r, d_in), torch.randn(d_out, r)
"""
FOLDS = ("flora", "fedex", "florist", "frlora")
linux_rss = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux's /proc")


def _measure(setup: str, method: str, dtype: str = "float32") -> tuple[float, float, float, int]:
    """aggregate_states on the states `setup` makes, in a fresh process: its peak RSS above the
    inputs, what it returned dense, the inputs (MiB), and the layers measured."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = MEASURED.format(root=root, method=method, setup=setup.format(method=method, dtype=dtype))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         # a fixed mmap threshold: freed blocks leave RSS rather than linger in the heap
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert res.returncode == 0, res.stderr[-2000:]
    peak, returned, inputs, layers = (float(x) for x in res.stdout.split())
    return peak, returned, inputs, int(layers)


@linux_rss
@pytest.mark.parametrize("method", [m for m in AGGREGATORS if m not in FOLDS])
def test_a_stack_of_layers_is_measured_one_dense_layer_at_a_time(method):
    """aggregate_states on 32 layers of 1024 x 1024: one dense layer is 4 MiB in float32, the stack
    128 MiB a tensor (the diagnostics formed several: about 400 MiB at the peak). The peak above
    the inputs stays below one stack tensor, whatever the stack's size."""
    peak, returned, _, layers = _measure(STACK, method)
    assert layers == 32 and returned == 0 and peak < 96, peak             # one stack tensor: 128 MiB


@linux_rss
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", FOLDS)
def test_a_folding_method_holds_its_dense_result_and_one_layer_more(method, dtype):
    """The methods that fold return a dense d_out x d_in update for every layer (128 MiB here in
    float32, 64 MiB in bf16); beyond that, the peak stays below half of one float32 stack tensor
    (about 30 MiB: one layer's dense temporaries). In bf16 they computed the stack in float32 and
    then cast it, 128 MiB more."""
    peak, returned, _, layers = _measure(STACK, method, dtype)
    assert layers == 32 and returned == 32 * 1024 * 1024 * (4 if dtype == "float32" else 2) / 2**20
    assert peak - returned < 64, (peak, returned)


@linux_rss
@pytest.mark.parametrize("method", ["fedit", "lorafair", "flexlora"])
def test_shape_groups_are_stacked_one_at_a_time(method):
    """aggregate_states stacks each shape group's factors (a copy) for one batched call; the groups
    are handled one after another, so the peak above the inputs is one group's copy and what the
    method takes on it (QR, float64 solver), plus the results (an eighth of the inputs): 0.3-0.85x
    the inputs here. Stacked all at once, with a second copy while stacking, it was 1.9-2x."""
    peak, _, inputs, layers = _measure(GROUPS, method)
    assert layers == 96 and peak < 1.25 * inputs, (peak, inputs)


@pytest.mark.parametrize("method", ["fedit", "hetlora", "rbla", "flexlora", "flora"])
def test_peft_states_of_different_ranks_are_padded_aggregated_and_cut_back(method):
    """PEFT clients of ranks 2, 4, 3: pad_ranks gives the aggregators zero-padded factors at R = 4
    (dW unchanged), and at_rank hands each client the leading slots of the result."""
    from states import at_rank, pad_ranks
    g = torch.Generator().manual_seed(0)
    ranks, layers = [2, 4, 3], ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"]
    shapes = {"model.layers.0.self_attn.k_proj": (8, 16), "model.layers.0.mlp.up_proj": (24, 16)}
    states = [{**{f"base_model.model.{p}.lora_A.weight": torch.randn(r, shapes[p][1], generator=g, dtype=torch.float64)
                  for p in layers},
               **{f"base_model.model.{p}.lora_B.weight": torch.randn(shapes[p][0], r, generator=g, dtype=torch.float64)
                  for p in layers}} for r in ranks]
    with pytest.raises(ValueError, match="shapes"):
        aggregate_states(states, [1 / 3] * 3, method)                    # unequal ranks: refused as they are
    padded, got = pad_ranks(states)
    assert got == ranks
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    out = aggregate_states(padded, w, method, ranks=ranks)
    for p in layers:
        ka, kb = f"base_model.model.{p}.lora_A.weight", f"base_model.model.{p}.lora_B.weight"
        dW = sum(w[k] * states[k][kb] @ states[k][ka] for k in range(3))          # the unpadded clients' dW
        A, B = torch.stack([s[ka] for s in padded]), torch.stack([s[kb] for s in padded])
        torch.testing.assert_close(dense_dW(A, B, w), dW, rtol=1e-12, atol=1e-12)  # padding adds nothing
        u = run(method, A, B, w, ranks=ranks)
        for key, want in ((ka, u.A), (kb, u.B)):
            if want is not None:
                torch.testing.assert_close(out.state[key], want, rtol=1e-10, atol=1e-12)
        for k, r in enumerate(ranks):
            mine = at_rank(out.state, r)
            if u.A is not None:
                assert mine[ka].shape == (r, shapes[p][1]) and torch.equal(mine[ka], out.state[ka][:r])
                assert mine[kb].shape == (shapes[p][0], r) and torch.equal(mine[kb], out.state[kb][:, :r])
    mixed = dict(states[0])
    mixed["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(3, 16, dtype=torch.float64)
    mixed["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(24, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="client 0: its layers have ranks \\[2, 3\\]"):
        pad_ranks([mixed, states[1]])
    padded8, _ = pad_ranks(states, rank=8)                # the global rank, above every client's
    assert all(s[k].shape[0] == 8 for s in padded8 for k in s if k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="below the 9 asked"):
        at_rank(padded8[0], 9)
    fedsa = aggregate_states(padded, w, "fedsa", ranks=ranks)  # no B in the result: cut A alone
    assert all(v.shape[0] == 2 for k, v in at_rank(fedsa.state, 2).items() if k.endswith("lora_A.weight"))


@pytest.mark.parametrize("method", ["fedit", "flora", "lorafair"])
def test_diagnose_false_returns_the_same_update_without_measurements(method):
    g = torch.Generator().manual_seed(0)
    states = [{f"b{i}.lora_A.weight": torch.randn(2, 6, generator=g) for i in range(3)} for _ in range(3)]
    for s in states:
        s.update({f"b{i}.lora_B.weight": torch.randn(5, 2, generator=g) for i in range(3)}, head=torch.randn(4, generator=g))
    full = aggregate_states(states, [0.2, 0.3, 0.5], method)
    bare = aggregate_states(states, [0.2, 0.3, 0.5], method, diagnose=False)
    assert full.state.keys() == bare.state.keys() and all(torch.equal(full.state[k], bare.state[k]) for k in full.state)
    assert full.delta_w.keys() == bare.delta_w.keys() and all(torch.equal(full.delta_w[k], bare.delta_w[k])
                                                              for k in full.delta_w)
    assert len(full.cos) == 3 and not any((bare.cos, bare.rel_err, bare.cos_fedit, bare.ceiling, bare.scale, bare.eq8))
