"""torchrun: 2 gloo processes on CPU give the 1-process result; a dead rank ends the run, bounded."""
import json
import os
import socket
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

import exchange
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


def torchrun(tmp_path, *worker_args, timeout=600):
    """2 processes of tests/dist_worker.py; torchrun's log folder goes under tmp_path, not /tmp."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, *worker_args]
    env = {**ENV, "TMPDIR": str(tmp_path)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_equal_one_for_every_method(tmp_path):
    res = torchrun(tmp_path, str(tmp_path / "two"), "all-methods")
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
    res = torchrun(tmp_path, str(tmp_path / "two"), "resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr and res.stderr.count("lorafair on shapes") == 2   # rank 0 logs, once a run
    torch.set_num_threads(1)
    assert main([*TINY, "--method", "lorafair", "--rounds", "2", "--out", str(tmp_path / "one")]) == 0
    one, two = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_dp_clients_give_the_one_process_result_and_ledger(tmp_path):
    from tests.test_dp import DP_RUNS
    res = torchrun(tmp_path, str(tmp_path / "two"), "dp")
    assert res.returncode == 0, res.stderr[-3000:]
    torch.set_num_threads(1)
    for name, argv in DP_RUNS.items():
        assert main([*TINY, *argv, "--rounds", "2", "--out", str(tmp_path / "one" / name)]) == 0
        one = load_file(tmp_path / "one" / name / "checkpoint.safetensors")
        two = load_file(tmp_path / "two" / name / "checkpoint.safetensors")
        assert one.keys() == two.keys() and "dp/steps" in one
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        dp_one, dp_two = ([json.loads(x)["dp"] for x in open(tmp_path / n / name / "metrics.jsonl")]
                          for n in ("one", "two"))
        assert dp_one == dp_two and len(dp_one) == 2


def test_unreadable_images_are_counted_across_processes(tmp_path):
    root = broken_domainnet(str(tmp_path / "dn"))
    res = torchrun(tmp_path, str(tmp_path / "two"), "images", root)
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


def test_exchange_is_exact_for_any_dtype_and_stored_state_owns_its_memory(tmp_path):
    """A bf16 model's uploads cross the wire in bf16, the client index and loss in float64 (client
    257 stays 257, the loss keeps every bit), and what comes out owns its storage."""
    import torch.distributed as dist
    from tests.test_fed import federation
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fed = federation("fedit")
        like = {k: v.to(torch.bfloat16) for k, v in fed.model.state_dict().items() if "lora_" in k}
        like["head.weight"] = torch.zeros(3, 4, dtype=torch.float32)              # mixed dtypes
        g = torch.Generator().manual_seed(0)
        ups = [{k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in like.items()} for _ in range(2)]
        results = [(257, ups[0], 1.2345678901234567), (4099, ups[1], float(2 ** 30 + 1))]
        out = exchange.gather_uploads(results, 2, like, 1, fed.device)
        assert [(k, loss) for k, _, loss in out] == [(257, 1.2345678901234567), (4099, float(2 ** 30 + 1))]
        for (_, got, _), want in zip(out, ups):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key])
                assert got[key].untyped_storage().nbytes() == got[key].numel() * got[key].element_size()
    finally:
        dist.destroy_process_group()


def test_a_slow_evaluation_does_not_kill_the_job(tmp_path):
    """Evaluating takes 4 s a domain, twice the 2 domains' share; --dist-timeout is 6 s. Evaluated by
    rank 0 alone (8 s a round) the other rank's wait would pass the timeout; shared, nobody waits."""
    res = torchrun(tmp_path, str(tmp_path / "run"), "slow-eval")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["round"] for r in recs] == [1, 2] and all("acc" in r for r in recs)
    torch.set_num_threads(1)
    assert main([*TINY, "--method", "fedit", "--rounds", "2", "--out", str(tmp_path / "one")]) == 0
    assert [r["acc"] for r in recs] == [json.loads(x)["acc"] for x in open(tmp_path / "one" / "metrics.jsonl")]


def test_folds_reach_every_rank_from_one_source(tmp_path):
    """Rank 1 computes every fold 1e-3 off (as different hardware rounds differently); after every
    round both ranks still hold rank 0's adapter and base weights, bit for bit."""
    res = torchrun(tmp_path, str(tmp_path), "drift")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("fedex", "flora", "fresh"):
        for t in (1, 2, 3):
            a = load_file(tmp_path / name / f"rank0-round{t}.safetensors")
            b = load_file(tmp_path / name / f"rank1-round{t}.safetensors")
            assert any(k.startswith("base/") for k in a), name
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, t)
