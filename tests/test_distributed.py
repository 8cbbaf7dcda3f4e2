"""torchrun: 2 gloo processes on CPU give the 1-process result; a dead rank ends the run, bounded."""
import json
import os
import socket
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from aggregators import AGGREGATORS
from tests.test_train import IMAGES, TINY, broken_domainnet
from train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_for_every_method(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, str(tmp_path / "two"), "all-methods"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.set_num_threads(1)
    for m in AGGREGATORS:
        assert main([*TINY, "--method", m, "--rounds", "2", "--out", str(tmp_path / "one" / m)]) == 0
        one = load_file(tmp_path / "one" / m / "final.safetensors")
        two = load_file(tmp_path / "two" / m / "final.safetensors")
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{m}: {k}")
        assert (tmp_path / "two" / m / "metrics.jsonl").read_text().count("\n") == 2


def test_distributed_resume_equals_unbroken_single_process_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, str(tmp_path / "two"), "resume"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr and res.stderr.count("lorafair on shapes") == 2   # rank 0 logs, once a run
    torch.set_num_threads(1)
    assert main([*TINY, "--method", "lorafair", "--rounds", "2", "--out", str(tmp_path / "one")]) == 0
    one, two = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_unreadable_images_are_counted_across_processes(tmp_path):
    root = broken_domainnet(str(tmp_path / "dn"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, str(tmp_path / "two"), "images", root]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.set_num_threads(1)
    assert main([*IMAGES(root), "--out", str(tmp_path / "one")]) == 0
    one, two = ([json.loads(x) for x in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two"))
    expected = {"clipart": {"train": 2, "test": 0}, "sketch": {"train": 2, "test": 1}}
    assert one[-1]["unreadable"] == two[-1]["unreadable"] == expected
    assert [r["acc"] for r in one] == [r["acc"] for r in two]


def test_a_dead_rank_ends_the_run_with_an_error(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / "run"), "die"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    tic = time.time()
    out0 = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=60)
    assert procs[1].returncode == 17
    assert procs[0].returncode == 1 and time.time() - tic < 90
    assert "error: rank 0 of 2: lost the other processes" in out0[1], out0[1][-3000:]
    ckpt = load_file(tmp_path / "run" / "checkpoint.safetensors")          # round 1's, intact
    assert any(k.endswith("lora_A.weight") for k in ckpt)
