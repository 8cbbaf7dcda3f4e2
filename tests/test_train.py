"""train.py end to end on tiny data: every method, resume == unbroken run, bad input -> exit 2."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from aggregators import AGGREGATORS
from tests import layouts
from backbone import pretrained_shapes_backbone, shapes_vit
from train import main

TINY = ["--no-pretrained", "--domains", "clipart,sketch", "--n-train", "24", "--n-test", "10",
        "--batch-size", "8", "--local-steps", "2", "--rank", "2", "--fair-steps", "10", "--no-progress",
        "--eval-every", "1"]


def IMAGES(root):   # noqa: N802 (a constant of one argument)
    """A run of fedit on a DomainNet tree made by tests/layouts.py (4 clients over 2 domains)."""
    return ["--dataset", "domainnet", "--data-root", root, "--domains", "clipart,sketch", "--model", "vit_shapes",
            "--no-pretrained", "--num-classes", "2", "--rounds", "2", "--batch-size", "4", "--rank", "2",
            "--clients-per-domain", "2", "--dirichlet", "100", "--no-progress", "--method", "fedit"]


def broken_domainnet(root):
    """tests/layouts.py's DomainNet with one unreadable training image per client and one test image."""
    layouts.domainnet(root, per_class=16)
    for rel in ["clipart/aircraft_carrier/clipart_001_000001.jpg", "clipart/airplane/clipart_002_000001.jpg",
                "sketch/aircraft_carrier/sketch_001_000003.jpg", "sketch/airplane/sketch_002_000004.jpg",
                "sketch/airplane/sketch_002_000016.jpg"]:
        with open(os.path.join(root, rel), "wb") as f:
            f.write(b"GIF89a truncated")
    return root


def train(tmp_path, *extra, name="run"):
    return main([*TINY, "--out", str(tmp_path / name), *extra])


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_one_round_of_every_method(tmp_path, method):
    assert train(tmp_path, "--method", method, "--rounds", "1") == 0
    (rec,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rec["round"] == 1 and set(rec["acc"]) == {"clipart", "sketch", "mean"}
    assert set(rec["seconds"]) == {"train", "aggregate", "eval"} and "cos" in rec and "rel_err" in rec
    final = load_file(tmp_path / "run" / "final.safetensors")
    assert any(k.endswith("lora_A.weight") for k in final) and "global/head.weight" in final


@pytest.mark.parametrize("method", ["lorafair", "fedsa", "fedsa --local-head", "flora", "fedit --client-init fresh",
                                    "fedit --client-init local"])
def test_resume_equals_unbroken_run(tmp_path, method):
    m = ["--method", *method.split()]
    assert train(tmp_path, *m, "--rounds", "3", name="full") == 0
    assert train(tmp_path, *m, "--rounds", "2", name="split") == 0
    assert train(tmp_path, *m, "--rounds", "3", "--resume", name="split") == 0
    a = load_file(tmp_path / "full" / "checkpoint.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x)["acc"] for x in open(tmp_path / "full" / "metrics.jsonl")]
    rb = [json.loads(x)["acc"] for x in open(tmp_path / "split" / "metrics.jsonl")]
    assert ra == rb and len(ra) == 3


def test_same_seed_same_result(tmp_path):
    train(tmp_path, "--rounds", "1", name="a"), train(tmp_path, "--rounds", "1", name="b")
    a, b = (load_file(tmp_path / n / "final.safetensors") for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_domainnet_tree_end_to_end(tmp_path):
    root = layouts.domainnet(str(tmp_path / "dn"), per_class=4)
    (tmp_path / "dn/clipart/aircraft_carrier/clipart_001_000001.jpg").write_bytes(b"not a jpeg")   # train
    (tmp_path / "dn/sketch/airplane/sketch_002_000004.jpg").write_bytes(b"")                        # test
    rc = main(["--dataset", "domainnet", "--data-root", root, "--model", "vit_shapes", "--no-pretrained",
               "--domains", "clipart,sketch", "--num-classes", "2", "--rounds", "1", "--batch-size", "4",
               "--rank", "2", "--no-progress", "--out", str(tmp_path / "run"), "--fair-steps", "5"])
    assert rc == 0
    (rec,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rec["unreadable"] == {"clipart": {"train": 1, "test": 0}, "sketch": {"train": 0, "test": 1}}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "domainnet"], "needs --data-root"),
    (["--dataset", "domainnet", "--data-root", "/nonexistent"], "not a directory"),
    (["--domains", "photo"], "unknown shapes domain 'photo'"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--rank", "0"], "--rank must be > 0"),
    (["--rank", "1000"], "rank r = 1000"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--local-head"], "--local-head applies to --method fedsa (its clients keep their own B), not lorafair"),
    (["--clients-per-domain", "5"], "too few for 5 clients"),
    (["--model", "vit_tiny_patch16_224", "--pretrained"], "pass --checkpoint PATH"),
    (["--checkpoint", "/nonexistent.pth"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # fail fast instead of retrying the hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    argv = [a for a in TINY if a != "--no-pretrained"] if "--pretrained" in args else TINY
    rc = main([*argv, "--out", str(tmp_path / "run"), "--rounds", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--method", "fedavg"])
    assert e.value.code == 2 and "invalid choice: 'fedavg'" in capsys.readouterr().err


def test_resume_refuses_other_config_and_never_overwrites(tmp_path, capsys):
    assert train(tmp_path, "--rounds", "1") == 0
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    assert train(tmp_path, "--rounds", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train(tmp_path, "--rounds", "2", "--resume", "--method", "fedit") == 2
    assert "different configuration (method: 'lorafair' vs 'fedit')" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before
    assert train(tmp_path, "--rounds", "1", "--resume", name="empty") == 2


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


# ----------------------------------------------------------------------------- inputs as users bring them

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


def test_data_is_checked_before_weights_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("train.check_weights", lambda args: pytest.fail("looked at weights first"))
    out = tmp_path / "run"
    rc = main(["--dataset", "domainnet", "--data-root", str(tmp_path / "WRONG"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--data-root" in err[0] and "is not a directory" in err[0]
    assert not out.exists()
    # a refused run leaves --out as it was, so the corrected command simply works
    root = layouts.domainnet(str(tmp_path / "dn"), classes=["aircraft_carrier", "airplane"])
    (tmp_path / "dn/sketch/airplane/sketch_002_000002.jpg").unlink()
    rc = main(["--dataset", "domainnet", "--data-root", root, "--domains", "clipart,sketch", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1 of 16 listed images are missing" in err[0] and not out.exists()
    monkeypatch.undo()
    layouts.image(str(tmp_path / "dn/sketch/airplane/sketch_002_000002.jpg"), 1)
    rc = main(["--dataset", "domainnet", "--data-root", root, "--domains", "clipart,sketch", "--model", "vit_shapes",
               "--no-pretrained", "--num-classes", "2", "--rounds", "1", "--batch-size", "4", "--rank", "2", "--no-progress",
               "--out", str(out), "--fair-steps", "5"])
    assert rc == 0 and "kept 16 of 16 lines" in capsys.readouterr().err


def test_resume_says_what_is_missing(tmp_path, capsys):
    assert train(tmp_path, "--rounds", "1", "--resume", name="never") == 2
    assert "--resume: " + str(tmp_path / "never") + " does not exist; start the run without --resume" in \
        capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert train(tmp_path, "--rounds", "1", "--resume", name="other") == 2
    assert "has no config.json, so no run of train.py was started there" in capsys.readouterr().err
    (tmp_path / "other" / "metrics.jsonl").write_text("")
    assert train(tmp_path, "--rounds", "1", name="other") == 2
    assert "holds metrics.jsonl but no config.json; pass a new --out" in capsys.readouterr().err
    # stopped during round 1 (config.json, no checkpoint): --resume starts it again from round 0
    assert train(tmp_path, "--rounds", "2", name="full") == 0
    assert train(tmp_path, "--rounds", "1", name="cut") == 0
    (tmp_path / "cut" / "checkpoint.safetensors").unlink()
    (tmp_path / "cut" / "final.safetensors").unlink()
    assert train(tmp_path, "--rounds", "2", "--resume", name="cut") == 0
    assert "resuming " + str(tmp_path / "cut") + " after round 0 (it stopped before its first checkpoint)" in \
        capsys.readouterr().err
    a, b = (load_file(tmp_path / n / "final.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nicopp_challenge_download_end_to_end(tmp_path, capsys):
    root = layouts.nicopp_challenge(str(tmp_path / "nico"))
    run = ["--dataset", "nicopp", "--data-root", root, "--domains", "autumn,rock", "--model", "vit_shapes",
           "--no-pretrained", "--batch-size", "4", "--rank", "2", "--no-progress", "--fair-steps", "5"]
    assert main([*run, "--rounds", "1", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"reuse with --splits {tmp_path / 'a'}/splits" in err and "kept 40 of 40 lines" in err
    written = sorted(p.name for p in (tmp_path / "a" / "splits").iterdir())
    assert written == ["autumn_test.txt", "autumn_train.txt", "rock_test.txt", "rock_train.txt"]
    assert main([*run, "--rounds", "2", "--resume", "--out", str(tmp_path / "a")]) == 0
    assert f"split files in {tmp_path / 'a'}/splits" in capsys.readouterr().err
    # the written split is the one a new run makes, and reusable as it is
    assert main([*run, "--rounds", "2", "--splits", str(tmp_path / "a" / "splits"), "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(tmp_path / n / "final.safetensors") for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case, message", [
    ("negative label", "clipart_train.txt:3: label -1 is outside 0..344"),
    ("one level too high", "one level too high: pass --data-root {root}"),
    ("nicopp layout absent", "no NICO++ images under {root}"),
    ("num classes", "--num-classes must be in 1..345 for domainnet, got 400"),
])
def test_bad_data_is_one_line_exit_2_before_any_model(tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.setattr("train.check_weights", lambda args: pytest.fail("looked at weights first"))
    root = layouts.domainnet(str(tmp_path / "dn"), domains=("clipart", "sketch"))
    argv, data_root = ["--dataset", "domainnet", "--domains", "clipart,sketch"], root
    if case == "negative label":
        lines = (tmp_path / "dn" / "clipart_train.txt").read_text().splitlines()
        lines[2] = lines[2].rsplit(" ", 1)[0] + " -1"
        (tmp_path / "dn" / "clipart_train.txt").write_text("\n".join(lines) + "\n")
    elif case == "one level too high":
        data_root = str(tmp_path)
    elif case == "nicopp layout absent":
        argv = ["--dataset", "nicopp"]
    else:
        argv += ["--num-classes", "400"]
    rc = main([*argv, "--data-root", data_root, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message.format(root=root) in err[0], err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- outputs other tools read

def project_model(args, out):
    """The run's final global model rebuilt the project's way: backbone, LoRA, final.safetensors."""
    from lora import lora_layers, load_lora_state
    from backbone import build_model, check_weights
    model, _ = build_model(args, check_weights(args))
    final = load_file(out / "final.safetensors")
    load_lora_state(model, {k[len("global/"):]: v for k, v in final.items() if k.startswith("global/")})
    layers = lora_layers(model)
    with torch.no_grad():
        for k, v in final.items():
            if k.startswith("base/"):
                layers[k[len("base/"):]][1].weight.copy_(v)
    return model.eval()


@pytest.mark.parametrize("method", ["lorafair", "fedex"])
def test_run_exports_a_peft_adapter_and_a_merged_timm_checkpoint(tmp_path, method):
    from peft import PeftModel
    from safetensors.torch import save_file
    save_file(source_vit().state_dict(), tmp_path / "backbone.safetensors")
    extra = ["--checkpoint", str(tmp_path / "backbone.safetensors"), "--lora-targets", "attn.qkv,attn.proj,mlp.fc2",
             "--method", method, "--rounds", "2"]
    out = tmp_path / "run"
    assert main([*TINY, *extra, "--out", str(out)]) == 0
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ours = project_model(args_for(*extra), out)(x)
        merged = shapes_vit(10)                          # a bare timm ViT takes merged.safetensors as it is
        merged.load_state_dict(load_file(out / "merged.safetensors"))
        torch.testing.assert_close(merged.eval()(x), ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
        base = shapes_vit(10)                            # the same backbone weights, as a PEFT user has them
        base.load_state_dict({k: v for k, v in source_vit().state_dict().items() if not k.startswith("head.")},
                             strict=False)
        peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "attn.proj", "mlp.fc2")]
    assert config["rank_pattern"]["blocks.0.attn.qkv"] == 4 and config["alpha_pattern"]["blocks.0.attn.qkv"] == 16
    assert config["r"] == 2 and config["lora_alpha"] == 8 and config["modules_to_save"] == ["head"]
    if method == "lorafair":     # the adapter alone carries the trained model
        torch.testing.assert_close(peft(x), ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
        assert not (out / "adapter" / "NOTE.txt").exists()
    else:                        # fedex folded residuals into W0: the adapter says so, merged.safetensors has them
        assert "merged.safetensors" in (out / "adapter" / "NOTE.txt").read_text()
        assert (peft(x) - ours).abs().max() > 1e-4
