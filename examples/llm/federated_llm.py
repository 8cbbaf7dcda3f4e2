"""Every method of aggregators.py on the PEFT adapters of a Hugging Face causal language model.

    python examples/llm/federated_llm.py --method lorafair --rounds 4

The model is a Llama built from a small config (random weights, nothing downloaded) with
grouped-query attention, so one block's adapted layers have four shapes: q/o (d x d), k/v
(d_kv x d), gate/up (d_ff x d) and down (d x d_ff). PEFT LoRA sits on all seven projections, in
bf16. Three clients of ranks 2, 4 and 8 (alpha = 2 r, so one scaling s = 2) each learn their own
offline text task: token sequences counting up by the client's own stride.

A round, as a PEFT user writes it around states.py:
  1. each client loads the global adapter cut to its rank (`states.at_rank`), trains, and uploads
     `get_peft_model_state_dict`;
  2. the server pads the uploads to the largest rank (`states.pad_ranks`), aggregates them
     (`states.aggregate_states`, with `ranks=` and `previous=` the round's global state), folds any
     `delta_w` into the base weights (`W0 += s delta_w`, as README shows) and restarts the adapters
     where the method does (FLoRA, FLoRIST: B = 0; FRLoRA: its initial adapter). It does so one
     transformer block at a time, as a 7B model's folding methods need (bench/README.md).
FRLoRA is defined for one rank shared by all clients: it runs with every client at rank 8.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from aggregators import AGGREGATORS, frlora_init  # noqa: E402
from states import aggregate_states, at_rank, lora_pairs, pad_ranks  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = [2, 4, 8]
SCALE = 2.0                        # lora_alpha / r for every client
VOCAB, LENGTH = 48, 16
FROZEN_A = ("ffa", "fedsvd", "frlora")   # clients train B only
RESTART = ("flora", "florist")           # B = 0 again after the fold


def ranks_of(method: str) -> list[int]:
    return [max(RANKS)] * len(RANKS) if method == "frlora" else RANKS


def base_model(seed: int = 0):
    """A 2-block Llama, d 64, d_kv 32 (4 query heads, 2 key/value heads), d_ff 176; random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def task(k: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    """Client k's text: n sequences of LENGTH tokens counting up by stride k + 1 (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed + k))
    return (start + (k + 1) * torch.arange(LENGTH)) % VOCAB                     # (n, LENGTH)


def adapted(base, r: int, dtype=torch.bfloat16):
    """A PEFT model of rank r (alpha 2 r) on a copy of `base`, its LoRA factors in `dtype`."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=SCALE * r, target_modules=TARGETS,
                                                           lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    return model


def start(base, method: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The round-0 global adapter (rank max r_k) and, for FRLoRA, its initial adapter: W0's top-r
    components, which leave the base weights (aggregators.frlora_init)."""
    from peft import get_peft_model_state_dict
    torch.manual_seed(seed)
    glob = get_peft_model_state_dict(adapted(base, max(ranks_of(method))))
    if method != "frlora":
        return glob, {}
    for prefix, (ka, kb) in lora_pairs(list(glob)).items():
        layer = base.get_submodule(prefix.removeprefix("base_model.model."))
        A0, B0, rest = frlora_init(layer.weight.data, glob[ka].shape[0], SCALE)
        glob[ka], glob[kb] = A0.to(glob[ka].dtype), B0.to(glob[kb].dtype)
        layer.weight.data = rest
    return glob, dict(glob)


def train_client(base, glob: dict, k: int, r: int, method: str, phase, steps: int = 5, lr: float = 1.0) -> dict:
    """Client k: the global adapter at its rank, a few SGD steps on its task; its PEFT state dict."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    model = adapted(base, r)
    set_peft_model_state_dict(model, at_rank(glob, r))
    for name, p in model.named_parameters():
        if "lora_A" in name and (method in FROZEN_A or phase == "B"):
            p.requires_grad_(False)
        if "lora_B" in name and phase == "A":
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = task(k)
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return get_peft_model_state_dict(model)


def blocks(state: dict) -> list[list[str]]:
    """The state's keys block by block (the `.layers.<i>.` in their names), in the model's order;
    keys outside the blocks (e.g. a head in PEFT's modules_to_save) go with the first block."""
    out: dict[int, list[str]] = {}
    for key in state:
        m = re.search(r"\.layers\.(\d+)\.", key)
        out.setdefault(int(m.group(1)) if m else -1, []).append(key)
    order = sorted(i for i in out if i >= 0)
    if not order:
        return [out[-1]]
    out[order[0]] = out.pop(-1, []) + out[order[0]]
    return [out[i] for i in order]


@torch.no_grad()
def server(base, states: list[dict], sizes: list[int], method: str, glob: dict, init: dict, phase,
           by_block: bool = True):
    """pad_ranks, aggregate_states, the fold into W0, the restart; returns (new global, padded
    uploads, ranks) and changes `base` in place where the method folds. by_block: aggregate and
    fold one transformer block at a time, so that at most one block's dense updates exist at once
    (what a 7B model needs for FLoRA, FedEx-LoRA, FLoRIST and FRLoRA: 21.1 GiB in float32 at once)."""
    padded, ranks = pad_ranks(states)
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    options = {"ranks": ranks} if len(set(ranks)) > 1 else {}
    options.update({"phase": phase} if method == "rolora" else {})
    out = dict(glob)
    for keys in blocks(padded[0]) if by_block else [list(padded[0])]:
        def part(state: dict) -> dict:                       # this block's keys
            return {k: state[k] for k in keys}
        new = aggregate_states([part(s) for s in padded], w, method, previous=part(glob),
                               **options, **({"init": part(init)} if init else {}))
        for prefix, dw in new.delta_w.items():              # W0 += s delta_w, layer by layer
            layer = base.get_submodule(prefix.removeprefix("base_model.model."))
            layer.weight += SCALE * dw.to(layer.weight.dtype)
        out.update(new.state)
        del new                                              # folded: gone before the next block's
    if method in RESTART:                                    # a fresh adapter: B = 0 (A is kept: with B = 0 the
        out.update({kb: torch.zeros_like(glob[kb]) for _, kb in lora_pairs(list(glob)).values()})   # product is 0)
    return out, padded, ranks


def run(method: str, rounds: int = 4, seed: int = 0) -> list[float]:
    """`rounds` rounds of `method`; the clients' mean loss on their tasks after each."""
    base = base_model(seed)
    glob, init = start(base, method, seed)
    own = {}                                                 # FedSA: each client's own B
    losses = []
    for t in range(rounds):
        phase = ("B" if t % 2 == 0 else "A") if method == "rolora" else None
        states = []
        for k, r in enumerate(ranks_of(method)):
            mine = {**glob, **own.get(k, {})}
            states.append(train_client(base, mine, k, r, method, phase))
            if method == "fedsa":
                at_R = pad_ranks([states[k]], rank=max(RANKS))[0][0]          # its B at the global rank
                own[k] = {kb: at_R[kb] for _, kb in lora_pairs(list(at_R)).values()}
        glob, _, _ = server(base, states, [32] * len(states), method, glob, init, phase)
        losses.append(evaluate(base, glob, own, method))
        print(f"{method} round {t + 1}: mean loss {losses[-1]:.3f}")
    return losses


@torch.no_grad()
def evaluate(base, glob: dict, own: dict, method: str) -> float:
    """Each client's loss on its task with the global adapter (FedSA: with its own B)."""
    from peft import set_peft_model_state_dict
    total = 0.0
    for k in range(len(RANKS)):
        model = adapted(base, max(ranks_of(method)))
        set_peft_model_state_dict(model, {**glob, **own.get(k, {})})
        total += model(input_ids=task(k), labels=task(k)).loss.item()
    return total / len(RANKS)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lorafair", choices=list(AGGREGATORS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run(a.method, a.rounds, a.seed)
