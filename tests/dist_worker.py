"""Run by tests/test_distributed.py in several processes (torchrun, or plain env:// processes).

    dist_worker.py OUT all-methods   run 2 rounds of every method, one --out per method
    dist_worker.py OUT resume        lorafair: 1 round, then --resume to 2 rounds
    dist_worker.py OUT die           rank 1 dies during round 2 (no agent to kill rank 0 for it)
    dist_worker.py OUT images ROOT   fedit on the DomainNet tree ROOT (some images unreadable), 2 rounds
"""
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fed  # noqa: E402
from aggregators import AGGREGATORS  # noqa: E402
from tests.test_train import IMAGES, TINY  # noqa: E402
from train import main  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
if mode == "all-methods":
    dist.init_process_group("gloo")          # once, shared by the runs below
    codes = [main([*TINY, "--method", m, "--rounds", "2", "--out", os.path.join(out, m)]) for m in AGGREGATORS]
    dist.destroy_process_group()
    sys.exit(max(codes))
if mode == "resume":
    dist.init_process_group("gloo")
    args = [*TINY, "--method", "lorafair", "--out", out]
    codes = [main([*args, "--rounds", "1"]), main([*args, "--rounds", "2", "--resume"])]
    dist.destroy_process_group()
    sys.exit(max(codes))
if mode == "images":
    sys.exit(main(IMAGES(sys.argv[3]) + ["--out", out]))
if mode == "die":
    orig = fed.Federation.local_train

    def local_train(self, client, seed):
        if self.rank == 1 and self.round == 1:
            os._exit(17)
        return orig(self, client, seed)
    fed.Federation.local_train = local_train
    sys.exit(main([*TINY, "--method", "fedit", "--rounds", "3", "--out", out, "--dist-timeout", "30"]))
