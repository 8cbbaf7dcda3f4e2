"""train.py end to end on tiny data: every method, resume == unbroken run, bad input -> exit 2."""
import json

import pytest
import torch
from safetensors.torch import load_file

from aggregators import AGGREGATORS
from tests import layouts
from train import main, pretrained_shapes_backbone, shapes_vit

TINY = ["--no-pretrained", "--domains", "clipart,sketch", "--n-train", "24", "--n-test", "10",
        "--batch-size", "8", "--local-steps", "2", "--rank", "2", "--fair-steps", "10", "--no-progress",
        "--eval-every", "1"]


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


@pytest.mark.parametrize("method", ["lorafair", "fedsa", "flora", "fedit --client-init fresh",
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
