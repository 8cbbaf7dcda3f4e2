"""Run by tests/test_distributed.py in several processes (torchrun, or plain env:// processes).

    dist_worker.py OUT all-methods   run 2 rounds of every method, one --out per method
    dist_worker.py OUT resume        lorafair: 1 round, then --resume to 2 rounds
    dist_worker.py OUT die           rank 1 dies during round 2 (no agent to kill rank 0 for it)
    dist_worker.py OUT dp            DP-SGD clients (tests/test_dp.py's DP_RUNS): 2 rounds each, one --out each
    dist_worker.py OUT images ROOT   fedit on the DomainNet tree ROOT (some images unreadable), 2 rounds
    dist_worker.py OUT slow-eval     fedit, every evaluated domain takes 4 s, --dist-timeout 6
    dist_worker.py OUT drift         fedex, flora, fedit --client-init fresh: rank 1 computes its folds
                                     slightly differently (as other hardware would); each rank saves
                                     its state after every round to OUT/<run>/rank<r>-round<t>.safetensors
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
if mode == "dp":
    from tests.test_dp import DP_RUNS
    dist.init_process_group("gloo")
    codes = [main([*TINY, *argv, "--rounds", "2", "--out", os.path.join(out, name)]) for name, argv in DP_RUNS.items()]
    dist.destroy_process_group()
    sys.exit(max(codes))
if mode == "images":
    sys.exit(main(IMAGES(sys.argv[3]) + ["--out", out]))
if mode == "slow-eval":
    import time
    orig_counts = fed.Federation.counts

    def counts(self, dataset):
        time.sleep(4)
        return orig_counts(self, dataset)
    fed.Federation.counts = counts
    sys.exit(main([*TINY, "--method", "fedit", "--rounds", "2", "--out", out, "--dist-timeout", "6"]))
if mode == "drift":
    from safetensors.torch import save_file
    real_aggregate, real_products, real_round = fed.aggregate_states, fed.LocalTraining.adapter_products, \
        fed.Federation.run_round
    nudge = (lambda d: {k: v + 1e-3 for k, v in d.items()}) if int(os.environ["RANK"]) == 1 else (lambda d: d)

    def aggregate_states(*a, **kw):
        agg = real_aggregate(*a, **kw)
        return agg._replace(state=nudge(agg.state), delta_w=nudge(agg.delta_w))

    def run_round(self):
        rec = real_round(self)
        save_file(self.state_tensors(), os.path.join(self.run_dir, f"rank{self.rank}-round{self.round}.safetensors"))
        return rec
    fed.aggregate_states = aggregate_states
    fed.LocalTraining.adapter_products = lambda self: nudge(real_products(self))
    fed.Federation.run_round = run_round
    dist.init_process_group("gloo")
    codes = []
    for name, extra in (("fedex", ["--method", "fedex"]), ("flora", ["--method", "flora"]),
                        ("fresh", ["--method", "fedit", "--client-init", "fresh"])):
        fed.Federation.run_dir = os.path.join(out, name)
        codes.append(main([*TINY, *extra, "--rounds", "3", "--out", os.path.join(out, name)]))
    dist.destroy_process_group()
    sys.exit(max(codes))
if mode == "die":
    orig = fed.Federation.train_client

    def train_client(self, k, glob, phase):
        if self.rank == 1 and self.round == 1:
            os._exit(17)
        return orig(self, k, glob, phase)
    fed.Federation.train_client = train_client
    sys.exit(main([*TINY, "--method", "fedit", "--rounds", "3", "--out", out, "--dist-timeout", "30"]))
