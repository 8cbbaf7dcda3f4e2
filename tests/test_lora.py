"""LoRA layers: no-op at init, merge == unmerged forward, k untouched, only LoRA + head train."""
import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from lora import (LoRALinear, LoRAQKV, fold_into_base, inject_lora, load_lora_state, lora_layers,
                  lora_state, reset_lora)


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                             patch_size=8, depth=2, **kw).double()


def randomise_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora, _, _ in lora_layers(model).values():
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g, dtype=torch.float64))


def test_fresh_adapter_is_bit_identical_to_base():
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()          # non-square
    x = torch.randn(3, 7, dtype=torch.float64)
    ref = base(x)
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.1).train()
    assert torch.equal(layer(x), ref)
    assert layer.lora_A.weight.abs().max() > 0 and layer.lora_A.weight.abs().max() <= 1 / 7 ** 0.5


def test_scaling_is_float_division():
    assert LoRALinear(nn.Linear(32, 32), r=16, alpha=8).scaling == 0.5


def test_linear_forward_is_W0_plus_sBA():
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = LoRALinear(base, r=3, alpha=4).double()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 7, dtype=torch.float64)
    W = base.weight + (4 / 3) * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ W.T + base.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrapper", [LoRALinear, LoRAQKV])
def test_merge_equals_unmerged_and_unmerge_restores(wrapper):
    torch.manual_seed(0)
    base = nn.Linear(6, 12).double()
    W0 = base.weight.clone()
    layer = wrapper(base, r=2, alpha=4).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.shape != W0.shape and p.dim() == 2:
                p.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    assert not torch.equal(base.weight, W0)
    layer.eval(), layer.train(), layer.eval()       # modes never merge or unmerge
    assert layer.merged
    with pytest.raises(RuntimeError):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, W0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_qkv_k_slice_never_changes():
    torch.manual_seed(0)
    d = 4
    base = nn.Linear(6, 3 * d).double()
    layer = LoRAQKV(base, r=2, alpha=2).double()
    with torch.no_grad():
        layer.q.lora_B.weight.normal_(), layer.v.lora_B.weight.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    y, y0 = layer(x), base(x)
    assert torch.equal(y[:, d:2 * d], y0[:, d:2 * d])
    torch.testing.assert_close(y[:, :d] - y0[:, :d], x @ layer.q.delta_weight().T)
    torch.testing.assert_close(y[:, 2 * d:] - y0[:, 2 * d:], x @ layer.v.delta_weight().T)
    W_k = base.weight[d:2 * d].clone()
    layer.merge()
    assert torch.equal(base.weight[d:2 * d], W_k)


def test_inject_vit_qv_and_plain_targets_only_lora_and_head_train():
    model = inject_lora(tiny_vit(), ["attn.qkv", "attn.proj", "mlp.fc2"], r=4, alpha=8)
    layers = lora_layers(model)
    assert set(layers) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv.q", "attn.qkv.v", "attn.proj", "mlp.fc2")}
    randomise_B(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == with_grad
    assert all(n.startswith("head.") or n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    assert sum(n.endswith("lora_A.weight") for n in trainable) == 8


def test_inject_mixer_targets():
    model = MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=16).double()
    inject_lora(model, ["mlp_tokens.fc2", "mlp_channels.fc2"], r=2, alpha=4)
    assert set(lora_layers(model)) == {f"blocks.{i}.{n}" for i in range(2) for n in ("mlp_tokens.fc2", "mlp_channels.fc2")}
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 5)


def test_inject_rejects_unknown_target_and_bad_rank():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        inject_lora(tiny_vit(), ["attn.nothing"], r=2, alpha=2)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(tiny_vit(), ["attn.proj"], r=1000, alpha=2)


def test_state_round_trip_and_peft_keys():
    a = inject_lora(tiny_vit(), ["attn.qkv", "mlp.fc2"], r=4, alpha=8, seed=0)
    randomise_B(a, seed=3)
    state = lora_state(a)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state) and len(state) == 2 * 2 * 3
    b = inject_lora(tiny_vit(), ["attn.qkv", "mlp.fc2"], r=4, alpha=8, seed=1)
    assert not all(torch.equal(state[k], v) for k, v in lora_state(b).items())
    load_lora_state(b, state)
    assert all(torch.equal(state[k], v) for k, v in lora_state(b).items())
    with pytest.raises(ValueError, match="not a parameter"):
        load_lora_state(b, {"blocks.0.nothing.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="rank"):
        load_lora_state(b, {"blocks.0.mlp.fc2.lora_A.weight": torch.zeros(2, 768)})


def test_same_seed_same_init_and_reset_zeroes_B():
    a = inject_lora(tiny_vit(), ["attn.proj"], r=2, alpha=2, seed=7)
    b = inject_lora(tiny_vit(), ["attn.proj"], r=2, alpha=2, seed=7)
    assert all(torch.equal(v, lora_state(b)[k]) for k, v in lora_state(a).items())
    randomise_B(a)
    reset_lora(a, 7)
    assert all(torch.equal(v, lora_state(b)[k]) for k, v in lora_state(a).items())


def test_fold_into_base_adds_scaled_delta_to_the_right_rows():
    model = inject_lora(tiny_vit(), ["attn.qkv"], r=2, alpha=6)
    lora, base, rows = lora_layers(model)["blocks.0.attn.qkv.v"]
    W = base.weight.clone()
    delta = torch.randn(base.out_features // 3, base.in_features, dtype=torch.float64)
    fold_into_base(model, {"blocks.0.attn.qkv.v": delta})
    torch.testing.assert_close(base.weight[rows], W[rows] + 3.0 * delta)
    assert torch.equal(base.weight[: 2 * base.out_features // 3], W[: 2 * base.out_features // 3])


def test_frlora_start_keeps_the_models_outputs_and_holds_the_top_components():
    from lora import frlora_start
    model = inject_lora(tiny_vit(), ["attn.qkv", "attn.proj", "mlp.fc2"], r=3, alpha=6).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        W = {p: base.weight[rows].clone() for p, (_, base, rows) in lora_layers(model).items()}
        init = frlora_start(model)
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)    # the layer still computes W
    for p, (lora, base, rows) in lora_layers(model).items():
        assert torch.equal(lora.lora_A.weight, init[f"{p}.lora_A.weight"])
        U, S, Vh = torch.linalg.svd(W[p], full_matrices=False)
        torch.testing.assert_close(lora.delta_weight(), (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(base.weight[rows] + lora.delta_weight(), W[p], rtol=0, atol=1e-12)


def test_a_rank_that_varies_by_layer_is_exported_with_peft_rank_pattern(tmp_path):
    """B with trailing zero columns (SpecTraL keeps fewer components than r in a layer): the layer
    is exported at the rank it holds, with the same scaling, and PEFT loads it to the same outputs."""
    import json
    from peft import PeftModel
    from safetensors.torch import save_file
    from lora import peft_adapter
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2)
    base_state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = inject_lora(plain, ["attn.proj", "mlp.fc2"], r=4, alpha=8).eval()
    randomise_B(model)
    layers = lora_layers(model)
    with torch.no_grad():
        for lora, _, _ in layers.values():
            lora.lora_B.weight.copy_(lora.lora_B.weight.float())
        layers["blocks.0.mlp.fc2"][0].lora_B.weight[:, 2:] = 0                       # holds rank 2
        layers["blocks.1.attn.proj"][0].lora_B.weight[:, 1:] = 0                     # holds rank 1
    config, tensors = peft_adapter(model)
    assert config["rank_pattern"] == {"blocks.0.mlp.fc2": 2, "blocks.1.attn.proj": 1}
    assert config["alpha_pattern"] == {"blocks.0.mlp.fc2": 4.0, "blocks.1.attn.proj": 2.0}
    assert tensors["base_model.model.blocks.0.mlp.fc2.lora_A.weight"].shape == (2, 768)          # fc2: d_in 4 x 192
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2)
    fresh.load_state_dict(base_state)
    peft = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft(x), model.float()(x), rtol=1e-5, atol=1e-5)
