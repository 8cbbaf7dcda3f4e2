"""Every method on a Llama's PEFT adapters (grouped-query shapes, ranks 2/4/8, bf16): loaded back
into PEFT, with delta_w folded into the base weights, each layer's effective weight is the one the
method defines, W0 + s (B_new A_new + delta_w), computed here densely in float64 from the uploads."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]
import federated_llm as llm  # noqa: E402
from aggregators import AGGREGATORS, eq8_minimiser, weighted_mean  # noqa: E402
from states import lora_pairs  # noqa: E402
from tests.reference import (dense_dW, dense_flexlora, dense_florist, dense_hetlora,  # noqa: E402
                             dense_rbla, dense_spectral)


def defined(method, A, B, w, ranks, A_prev, B_prev, client=0, phase="B"):
    """The update each method puts on W0 for the global model, in B @ A units, densely in float64
    (FedSA: `client`'s, with its own B)."""
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    hetero = len(set(ranks)) > 1
    if method == "fedit":
        return B_bar @ A_bar
    if method == "rolora" and phase == "A":               # B frozen and shared: A averaged
        return B_prev @ A_bar
    if method in ("ffa", "rolora", "fedsvd"):             # A frozen and shared (RoLoRA's phase B);
        return B_bar @ A_prev                             # FedSVD re-factorises B_bar A, product unchanged
    if method in ("flora", "fedex", "frlora"):            # exact: the stacked product
        return dense_dW(A, B, w)
    if method == "flexlora":
        a, b = dense_flexlora(A, B, w)
        return b @ a
    if method == "fedsa":
        return B[client] @ A_bar
    if method == "lorafair":
        return eq8_minimiser(A, B, w, lam=0.01) @ A_bar
    if method == "hetlora":
        a, b = dense_hetlora(A, B, w)
        return b @ a
    if method == "rbla":
        a, b = dense_rbla(A, B, w, ranks)
        return b @ a
    if method == "florist":
        return dense_florist(A, B, w, 0.9)[0]
    if method == "spectral":
        return dense_spectral(A, B, w, ranks if hetero else None)[0]
    raise AssertionError(method)


SIZES = [20, 32, 44]                                      # unequal n_k: p_k = n_k / sum_j n_j


def one_round(method, phase=None):
    """One round from a global adapter with B != 0 (so every factor matters): the base before it,
    the previous global, the padded uploads, the new global, and the base after its folds."""
    base = llm.base_model(0)
    glob, init = llm.start(base, method, 0)
    g = torch.Generator().manual_seed(1)
    for _, kb in lora_pairs(list(glob)).values():
        if method != "frlora":                            # FRLoRA starts from W0's top components
            glob[kb] = (0.05 * torch.randn(glob[kb].shape, generator=g)).to(glob[kb].dtype)
    W0 = {n: m.weight.detach().double().clone() for n, m in base.named_modules() if n.endswith(tuple(llm.TARGETS))}
    ranks = llm.ranks_of(method)
    states = [llm.train_client(base, glob, k, r, method, phase) for k, r in enumerate(ranks)]
    assert {s[k].dtype for s in states for k in s} == {torch.bfloat16}
    new, padded, got = llm.server(base, states, SIZES, method, glob, init, phase)
    assert got == ranks
    return base, W0, glob, padded, new


@pytest.mark.parametrize("method, phase", [(m, None) for m in AGGREGATORS if m != "rolora"]
                         + [("rolora", "B"), ("rolora", "A")])
def test_every_method_gives_the_effective_weights_it_defines(method, phase):
    """Each layer's effective weight, loaded back into PEFT (the folded base plus s B A, from the
    PEFT model's own parameters, in float64), against W0 + s E with E the method's update. The
    error may be 5% of the round's change s (E - B_prev A_prev), so a fold left out or applied
    twice is seen even where the change is small, plus, where the new factors are an aggregate,
    their rounding to bf16 (0.8% of s E; restarted factors, FLoRA's, FLoRIST's, FRLoRA's, are exact)."""
    from peft import set_peft_model_state_dict
    base, W0, glob, padded, new = one_round(method, phase)
    w = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
    ranks = llm.ranks_of(method)
    shapes, worst = set(), 0.0
    rounded = method not in ("flora", "florist", "frlora")
    for client in range(3) if method == "fedsa" else [0]:   # FedSA: every client, with its own B
        model = llm.adapted(base, max(ranks))
        own = {kb: padded[client][kb] for _, kb in lora_pairs(list(glob)).values()} if method == "fedsa" else {}
        set_peft_model_state_dict(model, {**new, **own})
        for prefix, (ka, kb) in lora_pairs(list(glob)).items():
            name = prefix.removeprefix("base_model.model.")
            layer = model.base_model.model.get_submodule(name)
            A_new, B_new = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            effective = layer.base_layer.weight.double() + layer.scaling["default"] * B_new @ A_new
            A = torch.stack([s[ka] for s in padded]).double()  # (K, R, d_in): the uploads as aggregated
            B = torch.stack([s[kb] for s in padded]).double()
            A_prev, B_prev = glob[ka].double(), glob[kb].double()
            E = defined(method, A, B, w, ranks, A_prev, B_prev, client, phase)
            change = llm.SCALE * (E - B_prev @ A_prev)
            bound = 0.05 * change.norm() + (8e-3 * (llm.SCALE * E).norm() if rounded else 0)
            err = ((effective - (W0[name] + llm.SCALE * E)).norm() / bound).item()
            assert err < 1, f"{method} {name}: {err:.3g} of the bound"
            worst = max(worst, err)
            shapes.add(tuple(effective.shape))
    assert shapes == {(64, 64), (32, 64), (176, 64), (64, 176)}   # 2 blocks x 7 layers, 4 shapes
    print(f"{method}: at most {worst:.2g} of the bound")


def test_the_check_tells_the_methods_apart():
    """FedIT's aggregate is not the exact dW here (drift and zero-padded ranks), so the references
    of the test above differ from method to method by far more than its tolerance."""
    base = llm.base_model(0)
    glob, _ = llm.start(base, "fedit", 0)
    g = torch.Generator().manual_seed(1)
    for _, kb in lora_pairs(list(glob)).values():
        glob[kb] = (0.05 * torch.randn(glob[kb].shape, generator=g)).to(glob[kb].dtype)
    states = [llm.train_client(base, glob, k, r, "fedit", None) for k, r in enumerate(llm.RANKS)]
    _, padded, _ = llm.server(base, states, [32, 32, 32], "fedit", glob, {}, None)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    ka, kb = next(iter(lora_pairs(list(glob)).values()))
    A, B = torch.stack([s[ka] for s in padded]).double(), torch.stack([s[kb] for s in padded]).double()
    fedit, exact = defined("fedit", A, B, w, llm.RANKS, None, None), dense_dW(A, B, w)
    assert (fedit - exact).norm() / exact.norm() > 0.1


def test_a_few_rounds_lower_the_clients_loss():
    losses = llm.run("lorafair", rounds=3)
    assert losses[-1] < losses[0] < 3.9


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_block_by_block_is_one_call(method):
    """The server aggregates and folds one block at a time; every method works layer by layer, so
    the new global adapter and the folded base weights are those of one call over the whole model
    (up to float32 rounding, seen through bf16: one ulp)."""
    phase = "B" if method == "rolora" else None
    runs = []
    for by_block in (True, False):
        base = llm.base_model(0)
        glob, init = llm.start(base, method, 0)
        states = [llm.train_client(base, glob, k, r, method, phase) for k, r in enumerate(llm.ranks_of(method))]
        new, _, _ = llm.server(base, states, SIZES, method, glob, init, phase, by_block=by_block)
        W = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(llm.TARGETS))}
        runs.append((new, W))
    (a, Wa), (b, Wb) = runs
    assert len(llm.blocks(a)) == 2 and a.keys() == b.keys() and Wa.keys() == Wb.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=8e-3, atol=1e-6)
    for n in Wa:
        torch.testing.assert_close(Wa[n], Wb[n], rtol=1e-6, atol=1e-6)


def test_blocks_keep_keys_outside_the_blocks():
    """A key outside the transformer blocks (a saved head) travels with the first block's call, so
    that call has LoRA pairs to aggregate and the head is FedAvg'd with them."""
    keys = ["base_model.model.lm_head.weight", "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.model.layers.10.x"]
    assert llm.blocks(dict.fromkeys(keys)) == [[keys[0], keys[2]], [keys[1]], [keys[3]]]
