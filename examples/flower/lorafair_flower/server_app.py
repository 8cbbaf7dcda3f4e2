"""The ServerApp and its strategy: any method of aggregators.py, as train.py runs it.

`AggregatorStrategy` is a Flower Strategy (configure/aggregate train, server-side evaluation)
whose server step is the server half of a train.py round (fed.Federation.begin_round and
finish_round: the sampled clients, RoLoRA's phase, the method's aggregation through
states.aggregate_states, folds into W0, FLoRA's re-initialisation). What a method keeps per
client lives here, keyed by the client's partition-id (stable across restarts, unlike node ids):
FedSA-LoRA's B and --client-init local's adapters, sent back to that client when it is sampled.
A reply that is an error, never comes within the timeout, or holds NaN/Inf is left out, and the
weights p_k are renormalised over the rest, as fed.py does. After every round the state goes to
<out>/checkpoint.safetensors; run config resume=true continues from it, if <out>/config.json (train.py's)
says it was run with the same train-args.
"""
from __future__ import annotations

import json
import os
import time
import warnings

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from lorafair_flower.task import DEFAULT_ARGS, build, model_state, record, tensors
import train  # noqa: E402 (on the path once task is imported)


class AggregatorStrategy(Strategy):
    def __init__(self, fed, args, out: str, node_of: dict[int, int]):
        self.fed, self.args, self.out, self.node_of = fed, args, out, node_of
        self.chosen, self.phase, self.glob, self.tic, self.rec = [], None, {}, 0.0, {}

    def summary(self) -> None:
        print(f"AggregatorStrategy: {self.args.method} over {len(self.fed.clients)} clients, {self.args.rounds} rounds")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The round's sampled clients get the global state, their own adapter, and the config."""
        self.chosen, self.phase, self.glob = self.fed.begin_round()
        state = record(model_state(self.fed))
        messages = []
        for k in self.chosen:
            content = RecordDict({"global": state, "config": ConfigRecord(
                {"round": self.fed.round, "client": k, "phase": self.phase or ""})})
            if self.fed.clients[k].state:
                content["own"] = record(self.fed.clients[k].state)
            messages.append(Message(content, dst_node_id=self.node_of[k], message_type=MessageType.TRAIN))
        self.tic = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies):
        results = []
        for msg in replies:
            if msg.has_error():
                warnings.warn(f"round {self.fed.round}: a client failed ({msg.error.reason}); left out")
                continue
            m = msg.content["metrics"]
            k = int(m["client"])
            if int(m["num-examples"]) != self.fed.clients[k].n:
                raise RuntimeError(f"client {k} trained on {int(m['num-examples'])} samples, the server's partition "
                                   f"has {self.fed.clients[k].n}: the nodes run with other train-args")
            results.append((k, tensors(msg.content["upload"], self.fed.device), float(m["loss"])))
        self.rec = self.fed.finish_round(self.chosen, self.phase, self.glob, results, time.perf_counter() - self.tic)
        return record(model_state(self.fed)), MetricRecord({"train_loss": self.rec["train_loss"],
                                                            "cos": self.rec["cos"]})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []                                   # evaluation happens on the server (evaluate below)

    def aggregate_evaluate(self, server_round, replies):
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each round: evaluate as train.py does (every --eval-every rounds and the last), log
        the round's record to <out>/metrics.jsonl, and checkpoint."""
        if server_round == 0:
            return None
        rec, t = self.rec, self.fed.round
        if t % self.args.eval_every == 0 or t == self.args.rounds:
            rec["acc"] = self.fed.evaluate()
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        save(self.fed, os.path.join(self.out, "checkpoint.safetensors"))
        return MetricRecord({"acc": rec["acc"]["mean"]}) if "acc" in rec else None


def save(fed, path: str, keep=None) -> None:
    state = {k: v for k, v in fed.state_tensors().items() if keep is None or k.startswith(keep)}
    train.save_tensors(state, path, {"round": str(fed.round)})     # atomic, readable as the umask allows


def discover(grid: Grid, n: int, timeout: float) -> dict[int, int]:
    """client index (partition-id) -> node id, asking every connected node which client it is."""
    deadline = time.time() + timeout
    while len(list(grid.get_node_ids())) < n:
        if time.time() > deadline:
            raise RuntimeError(f"{len(list(grid.get_node_ids()))} of {n} SuperNodes connected after {timeout} s")
        time.sleep(1)
    asks = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    node_of = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node_of[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
    if sorted(node_of) != list(range(n)):
        raise RuntimeError(f"the SuperNodes are partitions {sorted(node_of)}; train-args define {n} clients "
                           f"(partition-id 0..{n - 1})")
    return node_of


def serve(grid: Grid, config: dict) -> None:
    from safetensors import safe_open
    args, fed = build(str(config.get("train-args", DEFAULT_ARGS)))
    out = str(config.get("out", "runs/flower"))
    args.out = out
    metrics_path = os.path.join(out, "metrics.jsonl")
    ckpt, cfg_path = os.path.join(out, "checkpoint.safetensors"), os.path.join(out, "config.json")
    if config.get("resume") and os.path.isfile(cfg_path):   # as train.py --resume: the same run, or nothing
        with open(cfg_path) as f:
            diff = train.config_diff(json.load(f), args)
        if diff:
            raise RuntimeError(f"resume: {out} was run with a different configuration ({diff}); pass the "
                               "train-args it was started with, or another out")
    elif config.get("resume") and os.path.isfile(ckpt):
        raise RuntimeError(f"resume: {out} holds a checkpoint but no config.json, so what it was run with is "
                           "unknown; start a new run in another out")
    elif not config.get("resume") and (os.path.exists(cfg_path) or os.path.exists(metrics_path)):
        raise RuntimeError(f"{out} already holds a run; set resume=true to continue it, or another out")
    os.makedirs(out, exist_ok=True)                      # only once every check has passed
    if config.get("resume") and os.path.isfile(ckpt):
        with safe_open(ckpt, "pt") as f:
            done = int(f.metadata()["round"])
            fed.load_state_tensors({k: f.get_tensor(k).to(fed.device) for k in f.keys()}, done)
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line)["round"] <= done]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
    elif os.path.isfile(metrics_path):                    # resumed before its first checkpoint: from round 0
        os.remove(metrics_path)
    with open(cfg_path + ".tmp", "w") as f:       # train.py's config.json: rounds as now asked for
        json.dump(train.config_of(args), f, indent=1)
    os.replace(cfg_path + ".tmp", cfg_path)
    timeout = float(config.get("timeout", 3600))
    strategy = AggregatorStrategy(fed, args, out, discover(grid, len(fed.clients), timeout))
    if args.rounds > fed.round:
        strategy.start(grid, record(model_state(fed)), num_rounds=args.rounds - fed.round, timeout=timeout,
                       evaluate_fn=strategy.evaluate)
    save(fed, os.path.join(out, "final.safetensors"), keep=("global/", "base/", "client"))


def make_app(config: dict | None = None) -> ServerApp:
    """A ServerApp; `config` overrides the run config (train-args, out, resume, timeout)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        serve(grid, {**dict(context.run_config), **(config or {})})

    return app


app = make_app()
