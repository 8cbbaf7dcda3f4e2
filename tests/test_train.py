"""train.py end to end on tiny data: every method, resume == unbroken run, bad input -> exit 2."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from aggregators import AGGREGATORS
from tests import layouts
from backbone import shapes_vit
from train import main

TINY = ["--no-pretrained", "--domains", "clipart,sketch", "--n-train", "24", "--n-test", "10",
        "--batch-size", "8", "--local-steps", "2", "--rank", "2", "--no-progress",
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
                                    "fedit --client-init local", "fedsa --ranks 1,2", "flexlora --ranks 2,1",
                                    "fedsvd --ranks 2,1", "spectral", "frlora"])
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
    (["--ranks", "4,x"], "--ranks must be comma-separated integers such as 4,8,16, got '4,x'"),
    (["--ranks", "4,0"], "--ranks must all be >= 1"),
    (["--method", "florist", "--florist-tau", "0"], "florist tau must be in (0, 1], got 0.0 (set by --florist-tau)"),
    (["--method", "spectral", "--spectral-k", "0"], "spectral needs strategy 'i', 'w' or '0' and k None or an integer "
                                                    ">= 1, got strategy 'i', k 0 (set by --spectral-strategy"),
    (["--method", "frlora", "--ranks", "2,4"], "--method frlora with --ranks: its adapter starts as W0's top-r"),
    (["--fair-solver", "sgd", "--fair-lr", "-1"], "lorafair lr must be a finite number > 0, got -1.0 (set by"),
    (["--fair-solver", "sgd", "--fair-lr", "1", "--fair-lam", "2"], "lr * lam = 2 >= 1"),
    (["--fair-lr", "0.1"], "--fair-lr does not apply to --fair-solver fixed-point"),
    (["--fair-similarity", "column"], "--fair-similarity does not apply to --fair-solver fixed-point"),
    (["--fair-correct", "A"], "--fair-correct does not apply to --fair-solver fixed-point"),
    (["--fair-objective", "lsq", "--fair-solver", "sgd"], "--fair-solver does not apply to --fair-objective lsq"),
    (["--fair-objective", "lsq", "--fair-steps", "5"], "--fair-steps does not apply to --fair-objective lsq"),
    (["--fair-objective", "lsq", "--fair-lr", "0.1"], "--fair-lr does not apply to --fair-objective lsq"),
    (["--fair-objective", "lsq", "--fair-init", "xavier"], "--fair-init does not apply to --fair-objective lsq"),
    (["--fair-objective", "lsq", "--fair-similarity", "column"], "--fair-similarity does not apply to --fair-objective"),
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


def test_the_global_rank_is_the_largest_rank_a_client_gets(tmp_path, capsys):
    """--ranks 1,2,4 --rank-by domain over two domains: clients of ranks 1 and 2, so R = 2 (the 4
    goes to nobody): nothing of width 4 is trained, exported or used for the scaling."""
    assert train(tmp_path, "--method", "fedit", "--ranks", "1,2,4", "--rank-by", "domain", "--rounds", "1") == 0
    assert "the global rank R is 2" in capsys.readouterr().err
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["rank"] == 2
    final = load_file(tmp_path / "run" / "final.safetensors")
    assert all(v.shape[0] == 2 for k, v in final.items() if k.endswith("lora_A.weight"))
    adapter = json.load(open(tmp_path / "run" / "adapter" / "adapter_config.json"))
    assert adapter["r"] == 2 and adapter["lora_alpha"] / adapter["r"] == 4.0     # max(8, 2 R) / R at R = 2
    from train import get_args_parser, resolve                # --rank-by client: the clients, not the domains
    a = resolve(get_args_parser().parse_args([*TINY, "--ranks", "1,2,4,8,16", "--clients-per-domain", "2"]))
    assert a.rank == 8 and a.alpha == 16.0                     # 2 domains x 2 clients: ranks 1, 2, 4, 8; 16 unused



def test_amp_is_bf16_arithmetic_and_a_resume_must_keep_it(tmp_path, capsys):
    """--amp is bf16 autocast on the CPU too: it changes the numbers, so --resume refuses to switch it."""
    assert train(tmp_path, "--method", "fedit", "--rounds", "1", "--amp", name="amp") == 0
    assert train(tmp_path, "--method", "fedit", "--rounds", "1", name="f32") == 0
    a, b = (load_file(tmp_path / n / "final.safetensors") for n in ("amp", "f32"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert train(tmp_path, "--method", "fedit", "--rounds", "2", "--resume", name="amp") == 2
    assert "amp: True vs False" in capsys.readouterr().err
    assert train(tmp_path, "--method", "fedit", "--rounds", "2", "--resume", "--amp", name="amp") == 0


def test_resume_refuses_other_config_and_never_overwrites(tmp_path, capsys):
    assert train(tmp_path, "--rounds", "1") == 0
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    assert train(tmp_path, "--rounds", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train(tmp_path, "--rounds", "2", "--resume", "--method", "fedit") == 2
    assert "different configuration (method: 'lorafair' vs 'fedit')" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before
    assert train(tmp_path, "--rounds", "1", "--resume", name="empty") == 2


def test_resume_finishes_the_rounds_it_was_started_with_and_never_goes_back(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, "--method", "fedit", "--rounds", "2") == 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train(tmp_path, "--method", "fedit", "--resume", "--rounds", "1") == 2      # fewer than done: refused
    assert "has already run 2 rounds; pass --rounds >= 2, or leave --rounds out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files       # nothing written
    assert train(tmp_path, "--method", "fedit", "--resume") == 0                          # no --rounds: its own 2
    assert json.loads((run / "config.json").read_text())["rounds"] == 2
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert train(tmp_path, "--method", "fedit", "--resume", "--rounds", "2") == 0         # as many: nothing to run
    assert (run / "checkpoint.safetensors").read_bytes() == files["checkpoint.safetensors"]
    assert train(tmp_path, "--method", "fedit", "--resume", "--rounds", "3") == 0         # more: taken there
    assert json.loads((run / "config.json").read_text())["rounds"] == 3
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # stopped after round 1 of 3: a plain --resume finishes the 3, not the dataset's default 20
    assert train(tmp_path, "--method", "fedit", "--rounds", "1", name="part") == 0
    cfg = json.loads((tmp_path / "part" / "config.json").read_text())
    (tmp_path / "part" / "config.json").write_text(json.dumps({**cfg, "rounds": 3}))     # as a run killed there
    assert train(tmp_path, "--method", "fedit", "--resume", name="part") == 0
    assert [json.loads(x)["round"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert train(tmp_path, "--method", "fedit", "--rounds", "0", name="zero") == 2        # nothing to run
    assert "--rounds, --batch-size and --eval-every must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()


def test_a_run_that_diverges_or_is_interrupted_says_so_in_one_line_and_keeps_only_what_was_saved(
        tmp_path, capsys, monkeypatch):
    import fed
    import shlex
    import train as train_module
    # diverged in round 1: exit 3, one line that counts rounds as the log does, and --out is gone
    assert train(tmp_path, "--method", "fedit", "--rounds", "2", "--lr", "1e30", name="nan") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: round 1: every client's update was NaN/Inf, so training diverged; lower the "
                              "client lr (--lr 1e+30)") and "Traceback" not in "".join(err)
    assert "no round was saved, so" in err[-1] and not (tmp_path / "nan").exists()
    assert not any("NaN" in line for line in err[:-1])                   # no per-client warnings before it
    assert train(tmp_path, "--method", "fedit", "--rounds", "1", name="nan") == 0   # the corrected command works
    # an --out that existed stays, with what was there before (a splits/ folder of the user's) and nothing else
    (tmp_path / "mine" / "splits").mkdir(parents=True)
    (tmp_path / "mine" / "splits" / "clipart_train.txt").write_text("keep me\n")
    assert train(tmp_path, "--method", "fedit", "--lr", "1e30", "--rounds", "1", name="mine") == 3
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["splits"]
    assert (tmp_path / "mine" / "splits" / "clipart_train.txt").read_text() == "keep me\n"
    assert f"what it wrote in {tmp_path / 'mine'} was removed" in capsys.readouterr().err

    def fails_in_round(n, error):
        calls, real = [], fed.Federation.run_round

        def run_round(self):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(self)
        return run_round
    real = fed.Federation.run_round
    argv = [*TINY, "--out", str(tmp_path / "late"), "--method", "fedit", "--rounds", "3"]
    # diverged in round 2, after round 1's checkpoint: kept, with the exact command that starts again lower
    monkeypatch.setattr(fed.Federation, "run_round", fails_in_round(2, fed.Diverged("round 2: diverged")))
    assert train_module.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    restart = [f"{tmp_path / 'late'}-lr0.005" if a == str(tmp_path / "late") else a for a in argv] + ["--lr", "0.005"]
    assert err == (f"error: round 2: diverged; rounds 1-1 are saved in {tmp_path / 'late'}; start again at a lower "
                   f"lr with `{shlex.join(['python', 'train.py', *restart])}`")
    assert (tmp_path / "late" / "checkpoint.safetensors").is_file()
    # interrupted in round 2 of the resumed run: the line's command continues it
    monkeypatch.setattr(fed.Federation, "run_round", fails_in_round(1, KeyboardInterrupt()))
    assert train_module.main([*argv, "--resume"]) == 130
    again = shlex.join(["python", "train.py", *argv, "--resume"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: interrupted; rounds 1-1 are saved in {tmp_path / 'late'}: continue with `{again}`, or start "
        "again with another --out")
    monkeypatch.setattr(fed.Federation, "run_round", real)
    assert train_module.main([*argv, "--resume"]) == 0
    # Ctrl-C or SIGTERM in round 1 of a new run: exit 130 / 143, nothing left behind
    for error, code, name in ((KeyboardInterrupt(), 130, "ctrlc"), (train_module.Terminated(), 143, "term")):
        monkeypatch.setattr(fed.Federation, "run_round", fails_in_round(1, error))
        assert train(tmp_path, "--method", "fedit", "--rounds", "1", name=name) == code
        assert "no round was saved, so" in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / name).exists()
    # any other failure (out of memory, a bug): the same cleanup, then its traceback
    monkeypatch.setattr(fed.Federation, "run_round", fails_in_round(1, MemoryError()))
    with pytest.raises(MemoryError):
        train(tmp_path, "--method", "fedit", "--rounds", "1", name="oom")
    assert not (tmp_path / "oom").exists()


# ----------------------------------------------------------------------------- inputs as users bring them
# (weights: tests/test_backbone.py)

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


@pytest.mark.parametrize("method", ["lorafair", "fedex", "spectral", "frlora"])
def test_run_exports_a_peft_adapter_and_a_merged_timm_checkpoint(tmp_path, method):
    from peft import PeftModel
    from tests.test_backbone import args_for, source_vit
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
    if method in ("lorafair", "spectral"):     # the adapter alone carries the trained model
        torch.testing.assert_close(peft(x), ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
        assert not (out / "adapter" / "NOTE.txt").exists()
    else:                        # fedex, frlora folded updates into W0: the adapter says so, merged.safetensors has them
        assert "merged.safetensors" in (out / "adapter" / "NOTE.txt").read_text()
        assert (peft(x) - ours).abs().max() > 1e-4


def test_readmes_loading_lines_load_the_default_runs_outputs(tmp_path, monkeypatch):
    """README's own code block, run as written in a folder where `python train.py` (the embedded
    backbone, 10 classes; fewer images and steps) has just run."""
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## What a run leaves for other tools", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    assert main(["--domains", "clipart,sketch", "--n-train", "24", "--n-test", "10", "--batch-size", "8",
                 "--local-steps", "2", "--rounds", "1", "--no-progress"]) == 0
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        merged, peft = names["model"].eval()(x), names["peft_model"].eval()(x)
    torch.testing.assert_close(peft, merged, rtol=1e-5, atol=1e-5 * merged.abs().max().item())
    trained = load_file(tmp_path / "runs" / "latest" / "final.safetensors")
    assert torch.equal(names["model"].head.weight, trained["global/head.weight"])     # the trained model, not a new one


def test_help_shows_defaults_and_a_bad_flag_is_one_line_with_a_suggestion(capsys):
    from train import get_args_parser
    text = get_args_parser().format_help()
    for words in ("aggregation method (default: lorafair)", "LoRA rank r (default: 16)", "(default: runs/latest)"):
        assert words in " ".join(text.split())
    assert "20 on shapes" in " ".join(text.split()) and "0.05 on shapes" in " ".join(text.split())   # rounds, lr
    with pytest.raises(SystemExit) as e:
        main(["--method", "fedti"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument --method: invalid choice")
    assert "did you mean 'fedit'?" in err[0]


def test_a_logged_run_is_short_says_where_its_outputs_are_and_writes_readable_files(tmp_path, capsys):
    old = os.umask(0o022)
    try:   # stderr is not a terminal here (as in `python train.py > log 2>&1`): no progress bars
        assert main([*[a for a in TINY if a != "--no-progress"], "--local-steps", "20", "--rounds", "2",
                     "--ranks", "2,1", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) < 12, err
    assert any("ranks 2,1 (global rank 2)" in line for line in err)
    assert err[-1].startswith(f"outputs in {tmp_path / 'run'}/: config.json, metrics.jsonl, final.safetensors")
    for path in [*(tmp_path / "run").iterdir(), *(tmp_path / "run" / "adapter").iterdir()]:
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_fedsa_says_which_model_its_files_hold(tmp_path, capsys):
    assert train(tmp_path, "--method", "fedsa", "--rounds", "1") == 0
    note = (tmp_path / "run" / "adapter" / "NOTE.txt").read_text()
    assert "scores every client with its own B" in note and "the clients' B averaged" in note
    assert "adapter/NOTE.txt" in capsys.readouterr().err
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "merged.safetensors"), "pt") as f:
        assert f.metadata()["holds"] == "the global model: shared A, the clients' B averaged"


def test_rank_by_domain_gives_every_client_of_a_domain_its_rank():
    from train import build_data, get_args_parser, resolve
    args = resolve(get_args_parser().parse_args([*TINY, "--domains", "clipart,sketch,quickdraw",
                                                 "--clients-per-domain", "2", "--ranks", "4,2", "--rank-by", "domain"]))
    doms, clients = build_data(args, None)
    assert [(c.domain, c.rank) for c in clients] == [(0, 4), (0, 4), (1, 2), (1, 2), (2, 4), (2, 4)]
    assert [c.scale for c in clients] == [8 / 4, 8 / 4, 8 / 2, 8 / 2, 8 / 4, 8 / 4]   # alpha = max(8, 2 r)
    args.rank_by = "client"
    doms, clients = build_data(args, None)
    assert [c.rank for c in clients] == [4, 2, 4, 2, 4, 2]


@pytest.mark.parametrize("method, extra, options", [
    ("florist", ["--florist-tau", "0.5"], {"tau": 0.5}),
    ("hetlora", ["--hetlora-use-p"], {"use_p": True}),
    ("lorafair", ["--fair-lam", "0.2"], {"solver": "fixed-point", "steps": None, "lr": None, "lam": 0.2,
                                         "init": "zeros", "similarity": "flat", "correct": "B", "objective": "cosine"}),
    ("lorafair", ["--fair-solver", "sgd", "--fair-steps", "7"], {"solver": "sgd", "steps": 7, "lr": None, "lam": 0.01,
                                                                 "init": "zeros", "similarity": "flat", "correct": "B",
                                                                 "objective": "cosine"}),
    ("lorafair", ["--fair-objective", "lsq", "--fair-lam", "0"], {"solver": "fixed-point", "steps": None, "lr": None,
                                                                  "lam": 0.0, "init": "zeros", "similarity": "flat",
                                                                  "correct": "B", "objective": "lsq"}),
    ("fedit", [], {}),
])
def test_method_options_reach_the_aggregator(tmp_path, monkeypatch, method, extra, options):
    import fed
    seen = []
    real = fed.aggregate_states
    monkeypatch.setattr(fed, "aggregate_states", lambda s, w, m, **o: seen.append((m, o)) or real(s, w, m, **o))
    assert train(tmp_path, "--method", method, "--rounds", "1", *extra) == 0
    assert seen == [(method, options)]


# ----------------------------------------------------------------------------- option combinations

def expected_refusal(method, init, centralised, participation, fair):
    """Which flag a combination is refused over (None: defined), written out independently of train.py."""
    if (method, init) in {("flora", "local"), ("florist", "local"), ("fedex", "local"), ("rolora", "local"),
                          ("fedsa", "local"), ("fedsvd", "local"), ("frlora", "local"),
                          ("fedsa", "fresh"), ("rolora", "fresh"), ("frlora", "fresh")}:
        return "--client-init"
    if fair and method != "lorafair":
        return "--fair-lam"
    if centralised and participation < 1:
        return "--participation"
    return None


def combinations():
    from train import get_args_parser
    inits = next(a for a in get_args_parser()._actions if a.dest == "client_init").choices
    for method in AGGREGATORS:       # a new method or --client-init choice is enumerated here by itself
        for init in inits:
            for centralised in (False, True):
                for participation in (1.0, 0.5):
                    for fair in (False, True):
                        yield method, init, centralised, participation, fair


def combination_argv(method, init, centralised, participation, fair):
    return (["--method", method, "--client-init", init, "--participation", str(participation)]
            + ["--centralised"] * centralised + ["--fair-lam", "0.1"] * fair)


def test_every_combination_is_defined_or_refused_before_any_work(tmp_path, capsys):
    """Refused: exit 2 with one line naming the flag, and --out never created. Defined: resolve
    accepts it, and the run below (test_defined_combinations_run) carries it through."""
    from train import UserError, get_args_parser, resolve
    refused = defined = 0
    for combo in combinations():
        argv = [*TINY, "--rounds", "1", *combination_argv(*combo)]
        flag = expected_refusal(*combo)
        if flag is None:
            resolve(get_args_parser().parse_args(argv))
            defined += 1
            continue
        with pytest.raises(UserError) as e:
            resolve(get_args_parser().parse_args(argv))
        assert flag in str(e.value) and "\n" not in str(e.value), (combo, str(e.value))
        refused += 1
    assert main([*TINY, "--rounds", "1", "--out", str(tmp_path / "r"), "--method", "flora", "--client-init",
                 "local"]) == 2 and not (tmp_path / "r").exists()
    assert refused and defined


DEFINED = sorted({(m, i, c) for m, i, c, p, f in combinations() if expected_refusal(m, i, c, p, f) is None})


@pytest.mark.parametrize("method, init, centralised", DEFINED)
def test_defined_combinations_run(tmp_path, method, init, centralised):
    """Every defined (method, init, centralised) runs 2 rounds (half the clients a round where
    federated) with finite metrics, the sampled clients it should have, and the export note where
    updates were folded into the backbone."""
    part = [] if centralised else ["--participation", "0.5", "--domains", "clipart,sketch,quickdraw,real"]
    argv = combination_argv(method, init, centralised, 1.0, False)
    assert train(tmp_path, *argv, "--rounds", "2", *part) == 0
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert torch.isfinite(torch.tensor([r["train_loss"], r["cos"], r["rel_err"], r["acc"]["mean"]])).all()
        assert len(r["clients"]) == (1 if centralised else 2)
    folded = method in ("flora", "fedex", "florist", "frlora") or init == "fresh"
    note = (tmp_path / "run" / "adapter" / "NOTE.txt").read_text()          # TINY: --no-pretrained, said too
    assert ("folded updates into the backbone" in note) == folded and "drawn at random (--no-pretrained)" in note


@pytest.mark.parametrize("method", ["flora", "florist"])
def test_restarting_methods_with_fresh_clients_are_themselves(tmp_path, method):
    """FLoRA and FLoRIST restart every client from a fresh LoRA anyway: --client-init fresh is the same run."""
    assert train(tmp_path, "--method", method, "--rounds", "2", name="a") == 0
    assert train(tmp_path, "--method", method, "--client-init", "fresh", "--rounds", "2", name="b") == 0
    a, b = (load_file(tmp_path / n / "final.safetensors") for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--method", "fedit", "--florist-tau", "0.5"], "--florist-tau applies to --method florist, not fedit"),
    (["--method", "fedit", "--hetlora-use-p"], "--hetlora-use-p applies to --method hetlora, not fedit"),
    (["--centralised", "--ranks", "2,1"], "--ranks does not apply to --centralised"),
    (["--centralised", "--clients-per-domain", "2"], "--clients-per-domain does not apply to --centralised"),
    (["--rank-by", "domain"], "--rank-by needs --ranks"),
    (["--num-classes", "1"], "--num-classes on shapes must be in 2..100, got 1"),
    (["--device", "gpu"], "is not a device"),
    pytest.param(["--device", "cuda:0"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_more_refusals_before_any_work(tmp_path, capsys, args, message):
    assert main([*TINY, "--out", str(tmp_path / "run"), "--rounds", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and not (tmp_path / "run").exists()


def test_resume_updates_config_and_ignores_device_settings(tmp_path):
    assert train(tmp_path, "--rounds", "1", "--method", "fedsa") == 0
    assert train(tmp_path, "--rounds", "2", "--method", "fedsa", "--resume", "--workers", "0", "--device", "cpu") == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["rounds"] == 2 and cfg["workers"] == 0
    final = load_file(tmp_path / "run" / "final.safetensors")   # fedsa: each client's own B behind its accuracy
    assert {k.split("/")[0] for k in final} == {"global", "client0", "client1"}
    assert all(k.endswith("lora_B.weight") for k in final if k.startswith("client"))


def test_amp_and_workers_defaults(monkeypatch):
    from train import bf16_native, get_args_parser, resolve
    assert not bf16_native("cpu")
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert bf16_native("cuda:0") == native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = resolve(get_args_parser().parse_args([*TINY, "--device", "cuda:1"]))
    assert args.amp and args.workers == 0                        # shapes: in-memory tensors, no workers
    args = resolve(get_args_parser().parse_args(["--dataset", "domainnet", "--data-root", "x", "--device", "cuda"]))
    assert args.workers == 8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not resolve(get_args_parser().parse_args([*TINY, "--device", "cuda"])).amp
    with pytest.raises(Exception, match="this machine has 2 CUDA device"):
        resolve(get_args_parser().parse_args([*TINY, "--device", "cuda:2"]))


def test_deterministic_flag_is_set_for_the_run_and_restored(tmp_path, monkeypatch):
    seen = []
    import fed
    real = fed.Federation.run_round
    monkeypatch.setattr(fed.Federation, "run_round",
                        lambda self: seen.append(torch.are_deterministic_algorithms_enabled()) or real(self))
    assert train(tmp_path, "--rounds", "1", "--method", "fedit", "--deterministic") == 0
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


def test_lsq_objective_reaches_the_logged_ceiling_in_every_layer(tmp_path):
    assert train(tmp_path, "--method", "lorafair", "--fair-objective", "lsq", "--fair-lam", "0", "--rounds", "2") == 0
    for rec in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")):
        for layer in rec["layers"].values():
            assert layer["cos"] == pytest.approx(layer["ceiling"], abs=1e-5)
            assert layer["cos"] >= layer["cos_fedit"] - 1e-6


@pytest.mark.parametrize("method", ["fedit", "ffa", "rbla", "lorafair"])
def test_heterogeneous_ranks_with_partial_participation_lose_no_slot(tmp_path, method):
    """Ranks 1,1,1,2 over four domains, half of them a round: a round without the rank-2 client
    leaves slot 1 as it was, and the run ends with every slot alive in every layer; FFA-LoRA's A
    ends as it does at full participation (the initial A, bit for bit)."""
    domains = ["--domains", "clipart,sketch,quickdraw,painting", "--ranks", "1,1,1,2", "--rounds", "4"]
    assert train(tmp_path, "--method", method, *domains, "--participation", "0.5", name="half") == 0
    rounds = [json.loads(line)["clients"] for line in open(tmp_path / "half" / "metrics.jsonl")]
    assert any(3 not in r for r in rounds) and any(3 in r for r in rounds)   # the test means something
    final = load_file(tmp_path / "half" / "final.safetensors")
    for k, A in final.items():
        if k.endswith("lora_A.weight"):
            B = final[k.replace("lora_A", "lora_B")]
            assert (A.abs().sum(1) > 0).all() and (B.abs().sum(0) > 0).all(), k
    if method == "ffa":
        assert train(tmp_path, "--method", method, *domains, name="full") == 0
        full = load_file(tmp_path / "full" / "final.safetensors")
        assert all(torch.equal(final[k], full[k]) for k in final if k.endswith("lora_A.weight"))


def test_a_run_from_before_the_solver_option_resumes_as_the_sgd_it_ran(tmp_path, capsys):
    """A LoRA-FAIR config.json written before --fair-solver (no such key, steps 1000, lr 0.01) ran
    the SGD: it resumes with --fair-solver sgd, and is refused under the new default."""
    assert train(tmp_path, "--fair-solver", "sgd", "--fair-steps", "5", "--rounds", "1") == 0
    path = tmp_path / "run" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["fair_solver"]
    cfg["fair_lr"] = 0.01
    path.write_text(json.dumps(cfg))
    assert train(tmp_path, "--fair-steps", "5", "--rounds", "2", "--resume") == 2
    assert "fair_solver" in capsys.readouterr().err
    assert train(tmp_path, "--fair-solver", "sgd", "--fair-steps", "5", "--rounds", "2", "--resume") == 0
