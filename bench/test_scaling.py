"""Round wall time of the embedded default with 1 process against torchrun with 2 (CPU, gloo).

    pytest bench/test_scaling.py -s

Both runs split the machine's cores evenly between their processes (OMP_NUM_THREADS), train the
same 6 clients for 3 rounds and report the mean seconds per round (training + aggregation, from
metrics.jsonl, rounds 2-3 so start-up is excluded).
"""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--rounds", "3", "--eval-every", "100", "--no-progress", "--fair-solver", "sgd", "--fair-steps", "1000"]


def round_seconds(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    return sum(r["seconds"]["train"] + r["seconds"]["aggregate"] for r in recs) / len(recs)


def test_one_vs_two_processes(tmp_path):
    cores = os.cpu_count()
    times = {}
    for procs in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
        out = str(tmp_path / f"p{procs}")
        if procs == 1:
            cmd = [sys.executable, "train.py", *ARGS, "--out", out]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", *ARGS, "--out", out]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=1200)
        times[procs] = round_seconds(out)
    print(f"\nembedded default, seconds per round: 1 process {times[1]:.2f}, 2 processes {times[2]:.2f} "
          f"(speed-up {times[1] / times[2]:.2f}x on {cores} cores)")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "scaling.json"), "w") as f:
        json.dump({"cores": cores, "seconds_per_round": times}, f)
