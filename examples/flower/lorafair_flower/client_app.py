"""The ClientApp: one SuperNode is one client of train.py's partition (its partition-id).

A train message carries the global model state (task.model_state), the client's own adapter
where its method keeps one on the server (FedSA-LoRA's B, --client-init local), and the round's
config (round, client index, RoLoRA's phase). The client trains with fed.py's local training,
seeded by (seed, round, client) as train.py seeds it, and replies with its trainable tensors,
its loss and n_k. The Federation is built once per process and reused across rounds.
"""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lorafair_flower.task import DEFAULT_ARGS, build, load_state, record, tensors
from lora import trainable_state   # importable once task has put the repository on sys.path

_BUILT: dict[str, tuple] = {}


def federation(train_args: str):
    if train_args not in _BUILT:
        _BUILT.clear()
        _BUILT[train_args] = build(train_args)
    return _BUILT[train_args]


def make_app(train_args: str | None = None) -> ClientApp:
    """A ClientApp for train.py's arguments `train_args` (default: the run config's 'train-args')."""
    app = ClientApp()

    def settings(context: Context) -> str:
        return train_args or str(context.run_config.get("train-args", DEFAULT_ARGS))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which client of the partition this node is."""
        return Message(RecordDict({"node": ConfigRecord({"partition-id": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _, fed = federation(settings(context))
        cfg = msg.content["config"]
        k, t, phase = int(cfg["client"]), int(cfg["round"]), str(cfg["phase"]) or None
        if k != int(context.node_config["partition-id"]):
            raise ValueError(f"this node is client {context.node_config['partition-id']}, asked to train client {k}")
        load_state(fed, tensors(msg.content["global"], fed.device))
        own = msg.content["own"] if "own" in msg.content else ArrayRecord()
        fed.clients[k].state = tensors(own, fed.device)
        fed.round = t
        fed.local.set_trainable_factors(phase)
        upload, loss = fed.train_client(k, trainable_state(fed.model), phase)   # what the server's glob was
        return Message(RecordDict({"upload": record(upload), "metrics": MetricRecord(
            {"loss": float(loss), "num-examples": fed.clients[k].n, "client": k})}), reply_to=msg)

    return app


app = make_app()
