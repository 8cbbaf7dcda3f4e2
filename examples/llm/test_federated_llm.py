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


def defined(method, A, B, w, ranks, A_prev, B_prev):
    """The update each method puts on W0 for the global model, in B @ A units, densely in float64
    (FedSA: client 0's, with its own B)."""
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    hetero = len(set(ranks)) > 1
    if method == "fedit":
        return B_bar @ A_bar
    if method in ("ffa", "rolora", "fedsvd"):             # A frozen and shared (RoLoRA's round 1 trains B);
        return B_bar @ A_prev                             # FedSVD re-factorises B_bar A, product unchanged
    if method in ("flora", "fedex", "frlora"):            # exact: the stacked product
        return dense_dW(A, B, w)
    if method == "flexlora":
        a, b = dense_flexlora(A, B, w)
        return b @ a
    if method == "fedsa":
        return B[0] @ A_bar
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


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_every_method_gives_the_effective_weights_it_defines(method):
    from peft import set_peft_model_state_dict
    base = llm.base_model(0)
    glob, init = llm.start(base, method, 0)
    g = torch.Generator().manual_seed(1)
    for _, kb in lora_pairs(list(glob)).values():        # B != 0: every factor matters from round 1
        if method != "frlora":
            glob[kb] = (0.05 * torch.randn(glob[kb].shape, generator=g)).to(glob[kb].dtype)
    W0 = {n: m.weight.detach().double().clone() for n, m in base.named_modules() if n.endswith(tuple(llm.TARGETS))}
    phase = "B" if method == "rolora" else None
    ranks = llm.ranks_of(method)
    states = [llm.train_client(base, glob, k, r, method, phase) for k, r in enumerate(ranks)]
    assert {s[k].dtype for s in states for k in s} == {torch.bfloat16}
    new, padded, got = llm.server(base, states, [32, 32, 32], method, glob, init, phase)
    assert got == ranks
    model = llm.adapted(base, max(ranks))                 # the result, loaded back into PEFT
    own = {kb: padded[0][kb] for _, kb in lora_pairs(list(glob)).values()} if method == "fedsa" else {}
    set_peft_model_state_dict(model, {**new, **own})
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    shapes, checked = set(), 0
    for prefix, (ka, kb) in lora_pairs(list(glob)).items():
        name = prefix.removeprefix("base_model.model.")
        layer = model.base_model.model.get_submodule(name)
        effective = layer.base_layer.weight.double() + layer.get_delta_weight("default").double()
        A = torch.stack([s[ka] for s in padded]).double()  # (K, R, d_in): the uploads as aggregated
        B = torch.stack([s[kb] for s in padded]).double()
        E = defined(method, A, B, w, ranks, glob[ka].double(), glob[kb].double())
        want = W0[name] + llm.SCALE * E
        err = (effective - want).norm() / (llm.SCALE * E).norm()
        assert err < 2e-2, f"{method} {name}: {err:.3g}"  # bf16 factors: 1.6e-3 to 3.2e-3 here
        shapes.add(tuple(effective.shape))
        checked += 1
    assert checked == 14 and shapes == {(64, 64), (32, 64), (176, 64), (64, 176)}   # 2 blocks x 7; 4 shapes


def test_the_check_tells_the_methods_apart():
    """FedIT's aggregate is not the exact dW here (clients drift), so the test above can fail."""
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
