"""backbone.py: weights in the formats users bring, read by timm's loaders and fitted to the model
before it is built; hub weights from the local cache offline; the embedded backbone's pretraining."""
import os

import pytest
import torch
from safetensors.torch import load_file

from backbone import pretrained_shapes_backbone, shapes_vit
from tests.test_train import TINY, train
from train import main


def test_backbone_pretraining_is_cached_and_loadable(tmp_path):
    path = pretrained_shapes_backbone(epochs=1, per_domain=128, progress=False, cache=str(tmp_path / "cache"))
    stamp = (tmp_path / "cache").stat().st_mtime_ns, len(list((tmp_path / "cache").iterdir()))
    assert pretrained_shapes_backbone(epochs=1, per_domain=128, progress=False, cache=str(tmp_path / "cache")) == path
    assert ((tmp_path / "cache").stat().st_mtime_ns, len(list((tmp_path / "cache").iterdir()))) == stamp
    state = load_file(path)
    assert "head.weight" not in state and "blocks.0.attn.qkv.weight" in state
    # the cached file is accepted by --checkpoint and fits the model but for the new head
    assert train(tmp_path, "--checkpoint", path, "--rounds", "1", "--method", "fedit") == 0
    model = shapes_vit(10)
    missing, _ = model.load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"}


def test_backbone_pretraining_gives_the_same_weights_whatever_the_thread_count(tmp_path):
    # float sums split over threads differ in their last bits, and a pretrained backbone that differs
    # changes every result built on it: pretraining runs on 2 threads whatever the caller has set
    threads = torch.get_num_threads()
    files = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            files.append(pretrained_shapes_backbone(epochs=1, per_domain=130, progress=False,
                                                    cache=str(tmp_path / f"threads{n}")))
            assert torch.get_num_threads() == n                      # the caller's setting is given back
    finally:
        torch.set_num_threads(threads)
    one, three = (load_file(f) for f in files)
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)


def args_for(*extra):
    from train import get_args_parser, resolve
    return resolve(get_args_parser().parse_args([*TINY, "--rounds", "1", *extra]))


def backbone_of(model) -> dict:
    """The model's weights under timm's own names (LoRA wrappers keep the frozen layer as `.base`)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def source_vit(seed=1, **kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(**{**dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                                       num_classes=30), **kw})


def save_google_npz(model, path):
    """A ViT in the layout of Google's released .npz checkpoints (the names and transposes that
    timm's VisionTransformer.load_pretrained reads back)."""
    import numpy as np
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        for name, W, bias in zip(("query", "key", "value"), np.split(sd[b + "attn.qkv.weight"], 3),
                                 np.split(sd[b + "attn.qkv.bias"], 3)):
            w[att + f"{name}/kernel"], w[att + f"{name}/bias"] = W.T.reshape(D, H, D // H), bias.reshape(H, D // H)
        w[att + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, H, D // H).transpose(1, 2, 0)
        w[att + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[p + f"{ln}/scale"], w[p + f"{ln}/bias"] = sd[b + f"{norm}.weight"], sd[b + f"{norm}.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def save_as(fmt, model, tmp_path):
    """`model`'s weights in one of the formats users bring, written by the library that makes them."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, tmp_path / "w.safetensors")
        return tmp_path / "w.safetensors"
    if fmt == "ddp-pth":                    # torch.save({'state_dict': DDP(model).state_dict()})
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pth")
        return tmp_path / "w.pth"
    if fmt == "timm-train":                 # timm's train.py: CheckpointSaver, argparse Namespace inside
        import argparse
        from timm.utils import CheckpointSaver
        saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                args=argparse.Namespace(model="vit_shapes", lr=0.1), checkpoint_dir=str(tmp_path),
                                recovery_dir=str(tmp_path), max_history=1)
        saver.save_checkpoint(epoch=0, metric=1.0)
        return tmp_path / "model_best.pth.tar"
    if fmt == "hf-folder":                  # a folder as the hub stores a model: model.safetensors inside
        (tmp_path / "snapshot").mkdir()
        save_file(state, tmp_path / "snapshot" / "model.safetensors")
        return tmp_path / "snapshot"
    if fmt == "npz":
        save_google_npz(model, tmp_path / "ViT-S_32.npz")
        return tmp_path / "ViT-S_32.npz"
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "ddp-pth", "timm-train", "hf-folder", "npz"])
def test_checkpoint_formats_load_through_timm(tmp_path, fmt):
    from backbone import build_model, check_weights
    src = source_vit()
    path = save_as(fmt, src, tmp_path)
    args = args_for("--checkpoint", str(path))
    model, _ = build_model(args, check_weights(args))
    got, want = backbone_of(model), src.state_dict()
    assert set(got) == set(want)
    for k in want:
        if not k.startswith("head."):       # the head is new: 10 classes, not the checkpoint's 30
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    assert got["head.weight"].shape == (10, 96)
    # the same logits as the source backbone with the new head
    src.reset_classifier(10)
    src.head.load_state_dict({"weight": got["head.weight"], "bias": got["head.bias"]})
    x = torch.randn(2, 3, 32, 32)
    model.eval(), src.eval()
    torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_position_embedding_is_resized_by_timm(tmp_path):
    from timm.layers import resample_abs_pos_embed
    from backbone import build_model, check_weights
    src = source_vit(img_size=48)                                          # 12 x 12 patches, the model has 8 x 8
    path = save_as("safetensors", src, tmp_path)
    args = args_for("--checkpoint", str(path))
    model, _ = build_model(args, check_weights(args))
    want = resample_abs_pos_embed(src.pos_embed.detach(), (8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    torch.testing.assert_close(backbone_of(model)["blocks.3.mlp.fc2.weight"], src.blocks[3].mlp.fc2.weight.detach())


def _bad_checkpoints(tmp_path):
    from safetensors.torch import save_file
    from timm.models.mlp_mixer import MlpMixer
    out = {}
    save_file(source_vit(embed_dim=64, depth=2, num_heads=2).state_dict(), tmp_path / "narrow.safetensors")
    out["narrow"] = (tmp_path / "narrow.safetensors",
                     "it looks like a ViT of width 64, depth 2, patch 4 at 32 px (cls_token: (1, 1, 64) vs (1, 1, 96)); "
                     "pass weights of a vit_shapes")
    import timm
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), tmp_path / "tiny.safetensors")
    out["timm-vit"] = (tmp_path / "tiny.safetensors", "looks like a ViT of width 192, depth 12, patch 16 at 224 px")
    out["timm-vit-name"] = (tmp_path / "tiny.safetensors", "; pass --model vit_tiny_patch16_224")
    torch.save(MlpMixer(img_size=32, patch_size=4, embed_dim=64, num_blocks=2).state_dict(), tmp_path / "mixer.pth")
    out["mixer"] = (tmp_path / "mixer.pth", "it looks like an MLP-Mixer of width 64, depth 2, patch 4 at 32 px")
    torch.save(source_vit(), tmp_path / "whole_model.pth")                 # torch.save(model), not its state_dict
    out["pickled-model"] = (tmp_path / "whole_model.pth", "holds pickled Python objects (13 classes such as timm.")
    (tmp_path / "truncated.pth").write_bytes(open(tmp_path / "mixer.pth", "rb").read()[:300])
    out["truncated"] = (tmp_path / "truncated.pth", "could not be read")
    save_google_npz(source_vit(embed_dim=64, depth=2, num_heads=2), tmp_path / "narrow.npz")
    out["npz"] = (tmp_path / "narrow.npz", "holds ViT .npz weights of width 64, depth 2, patch 4")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights-best.pth").write_bytes(b"")
    out["folder"] = (tmp_path / "folder", "is a folder without model.safetensors or pytorch_model.bin; pass the weights "
                                          "file itself (it holds weights-best.pth)")
    out["missing"] = (tmp_path / "nope.pth", "does not exist")
    return out


BAD_CHECKPOINTS = ["narrow", "timm-vit", "timm-vit-name", "mixer", "pickled-model", "truncated", "npz", "folder",
                   "missing"]


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_checkpoint_that_cannot_fit_is_one_line_and_nothing_written(tmp_path, capsys, monkeypatch, case):
    path, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr("backbone.pretrained_shapes_backbone", lambda **kw: pytest.fail("built the model"))
    rc = main([*TINY, "--rounds", "1", "--checkpoint", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --checkpoint {path}") and message in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_runs_output_is_not_a_backbone(tmp_path, capsys):
    assert train(tmp_path, "--rounds", "1") == 0
    rc = main([*TINY, "--rounds", "1", "--checkpoint", str(tmp_path / "run" / "final.safetensors"),
               "--out", str(tmp_path / "again")])
    assert rc == 2 and "the output of a train.py run (adapter and head), not backbone weights" in capsys.readouterr().err


def fake_hub_cache(cache, repo, state):
    """The Hugging Face hub cache as huggingface_hub writes it: blobs, a snapshot symlink, refs/main."""
    from safetensors.torch import save_file
    base, commit = cache / f"models--{repo.replace('/', '--')}", "0123456789abcdef0123456789abcdef01234567"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, base / "blobs" / "d3adb33f")
    (base / "snapshots" / commit / "model.safetensors").symlink_to(base / "blobs" / "d3adb33f")
    (base / "refs" / "main").write_text(commit)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache in tmp_path / 'hub'; creating a model with pretrained=True fails."""
    import timm
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    create = timm.create_model

    def no_download(*a, **kw):
        assert not kw.get("pretrained"), "tried to download weights"
        return create(*a, **kw)
    monkeypatch.setattr(timm, "create_model", no_download)
    return tmp_path / "hub"


def test_pretrained_weights_in_the_hub_cache_load_offline(tmp_path, offline):
    import timm
    torch.manual_seed(3)
    src = timm.create_model("test_vit.r160_in1k")
    fake_hub_cache(offline, "timm/test_vit.r160_in1k", src.state_dict())
    out = tmp_path / "run"
    assert main([*[a for a in TINY if a != "--no-pretrained"], "--model", "test_vit.r160_in1k", "--rounds", "1",
                 "--out", str(out), "--method", "fedit"]) == 0
    from backbone import build_model, check_weights
    args = args_for("--model", "test_vit.r160_in1k", "--pretrained")
    kind, state, path = check_weights(args)
    assert kind == "file" and path.startswith(str(offline)) and path.endswith("model.safetensors")
    model, _ = build_model(args, (kind, state, path))
    got = backbone_of(model)
    for k, v in src.state_dict().items():
        if not k.startswith(("head.", "pos_embed")):                 # new head; 32 px instead of 160
            torch.testing.assert_close(got[k], v, msg=k)


def test_pretrained_weights_not_cached_offline_fail_fast(tmp_path, offline, capsys):
    out = tmp_path / "run"
    rc = main([*[a for a in TINY if a != "--no-pretrained"], "--model", "test_vit.r160_in1k", "--rounds", "1",
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not in the local cache" in err[0] and str(offline) in err[0]
    assert "pass --checkpoint PATH (local weights) or --no-pretrained" in err[0] and not out.exists()


def test_hub_probe_fails_fast_on_an_unreachable_endpoint(monkeypatch):
    import huggingface_hub.constants as hf
    from backbone import hub_reachable
    with socket_server() as port:
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable()
    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")      # closed now: refused at once
    assert not hub_reachable()
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert not hub_reachable()


class socket_server:
    def __enter__(self):
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        self.s.listen()
        return self.s.getsockname()[1]

    def __exit__(self, *exc):
        self.s.close()


def test_the_shipped_backbone_is_loaded_not_trained(tmp_path, monkeypatch):
    """The default recipe's ViT weights ship with the repository: returned from backbones/ as they
    are (no training, nothing cached), and refused if their bytes are not the recorded ones."""
    import hashlib
    import shutil
    import backbone
    monkeypatch.setattr(backbone, "_pretrain", lambda *a, **k: pytest.fail("trained instead of loading"))
    path = pretrained_shapes_backbone(progress=False, cache=str(tmp_path / "cache"), model="vit_shapes")
    assert os.path.dirname(path) == backbone.SHIPPED_DIR and not (tmp_path / "cache").exists()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == backbone.SHIPPED[os.path.basename(path)]
    bad = tmp_path / "backbones"
    bad.mkdir()
    shutil.copy(path, bad)
    with open(bad / os.path.basename(path), "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(backbone, "SHIPPED_DIR", str(bad))
    with pytest.raises(backbone.ModelError, match="not the shipped"):
        pretrained_shapes_backbone(progress=False, model="vit_shapes")
