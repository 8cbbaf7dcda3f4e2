"""A Flower run (Flower's own simulation engine, Ray backend) equals train.py, bit for bit on CPU.

Both run in one thread per process (the ServerApp in this process, each ClientApp in a Ray
actor of one CPU), so every matrix product sums in the same order as train.py's. Marked `slow`:
the methods beyond the one CI runs (README: Test).
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]
os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])   # Ray's workers

TINY = ("--dataset shapes --no-pretrained --domains clipart,sketch,quickdraw --n-train 24 --n-test 10 "
        "--batch-size 8 --local-steps 2 --rank 2 --eval-every 1 --seed 3")


def simulate(train_args: str, out: str, clients: int, **config) -> None:
    from flwr.simulation import run_simulation
    from lorafair_flower import client_app, server_app
    run_simulation(server_app=server_app.make_app({"train-args": train_args, "out": out, **config}),
                   client_app=client_app.make_app(train_args), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


def equal_to_train_py(tmp_path, method: str, extra: str = "", clients: int = 3, rounds: int = 2) -> None:
    import train
    torch.set_num_threads(1)
    args = f"{TINY} --method {method} --rounds {rounds} {extra}"
    assert train.main([*args.split(), "--no-progress", "--out", str(tmp_path / "train")]) == 0
    simulate(args, str(tmp_path / "flower"), clients)
    want = load_file(tmp_path / "train" / "final.safetensors")
    got = load_file(tmp_path / "flower" / "final.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{method}: {k} differs by {(got[k] - want[k]).abs().max()}"
    ours = [json.loads(x) for x in open(tmp_path / "flower" / "metrics.jsonl")]
    theirs = [json.loads(x) for x in open(tmp_path / "train" / "metrics.jsonl")]
    for a, b in zip(ours, theirs):
        assert (a["round"], a["clients"], a["acc"], a["cos"], a["bytes"]) == \
               (b["round"], b["clients"], b["acc"], b["cos"], b["bytes"])


def test_the_app_is_a_valid_flower_app():
    from pathlib import Path
    from flwr.cli.config_utils import load_and_validate
    config, warnings = load_and_validate(Path(HERE) / "pyproject.toml", check_module=True)
    assert not warnings and config["tool"]["flwr"]["app"]["components"]["serverapp"] == \
        "lorafair_flower.server_app:app"


def test_lorafair_in_flower_equals_train_py(tmp_path):
    equal_to_train_py(tmp_path, "lorafair")


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("fedit", ""), ("flora", ""), ("fedsa", ""), ("rolora", "--rounds 3"),
                                           ("fedex", "--participation 0.67"), ("ffa", ""), ("flexlora", ""),
                                           ("hetlora", "--ranks 1,2"), ("florist", "--ranks 1,2"),
                                           ("fedit", "--ranks 1,2 --participation 0.67"), ("fedit", "--client-init fresh"),
                                           ("fedsvd", "--ranks 1,2"), ("spectral", "--ranks 1,2"), ("frlora", "")])
def test_every_method_in_flower_equals_train_py(tmp_path, method, extra):
    rounds = 3 if "--rounds 3" in extra else 2
    equal_to_train_py(tmp_path, method, extra.replace("--rounds 3", ""), rounds=rounds)


@pytest.mark.slow
def test_a_stopped_server_resumes_to_the_same_result(tmp_path):
    import train
    torch.set_num_threads(1)
    args = f"{TINY} --method fedsa"
    assert train.main([*f"{args} --rounds 2".split(), "--no-progress", "--out", str(tmp_path / "train")]) == 0
    simulate(f"{args} --rounds 1", str(tmp_path / "flower"), 3)
    simulate(f"{args} --rounds 2", str(tmp_path / "flower"), 3, resume=True)
    want, got = (load_file(tmp_path / n / "final.safetensors") for n in ("train", "flower"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_failing_client_is_left_out_and_the_weights_renormalised(tmp_path):
    """Node 1's ClientApp raises every round: its error reply is left out, the round goes on with
    clients 0 and 2 (p_k renormalised over them), as train.py leaves out a NaN client."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation
    from lorafair_flower import client_app, server_app
    torch.set_num_threads(1)
    args = f"{TINY} --method lorafair --rounds 2"
    inner = client_app.make_app(args)
    app = ClientApp()

    @app.query()
    def query(msg, context):
        return inner(msg, context)

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("this node fails")
        return inner(msg, context)
    run_simulation(server_app=server_app.make_app({"train-args": args, "out": str(tmp_path / "fl")}),
                   client_app=app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    recs = [json.loads(x) for x in open(tmp_path / "fl" / "metrics.jsonl")]
    assert [(r["clients"], r["dropped"]) for r in recs] == [([0, 2], [1]), ([0, 2], [1])]
    final = load_file(tmp_path / "fl" / "final.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_resume_refuses_a_run_of_other_train_args(tmp_path):
    """A checkpoint continues only as the run that made it: a LoRA-FAIR run (here train.py's, whose
    files the server shares) is not resumed as FedIT, one without config.json is not resumed at all,
    and a new run never lands on an old one. Refused before any node is contacted (grid unused)."""
    import shutil
    import train
    from lorafair_flower import server_app
    args = f"{TINY} --method lorafair --rounds 1"
    out = tmp_path / "run"
    assert train.main([*args.split(), "--no-progress", "--out", str(out)]) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="different configuration \\(method: 'lorafair' vs 'fedit'\\)"):
        server_app.serve(None, {"train-args": args.replace("lorafair", "fedit"), "out": str(out), "resume": True})
    with pytest.raises(RuntimeError, match="already holds a run"):
        server_app.serve(None, {"train-args": args, "out": str(out)})
    shutil.copytree(out, tmp_path / "bare")
    os.remove(tmp_path / "bare" / "config.json")
    with pytest.raises(RuntimeError, match="no config.json"):
        server_app.serve(None, {"train-args": args, "out": str(tmp_path / "bare"), "resume": True})
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert json.load(open(out / "config.json"))["method"] == "lorafair"

