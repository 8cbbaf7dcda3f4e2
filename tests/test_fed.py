"""Rounds on a tiny ViT: each method's client behaviour, FedAvg of the head, NaN clients left out."""
import pytest
import torch

from aggregators import AGGREGATORS
from backbone import shapes_vit
from data import DataError, load_shapes, partition
import fed as fed_module
from fed import Client, FedConfig, Federation
from states import aggregate_states as agg
from tests.reference import dense_florist
from lora import inject_lora, lora_layers, lora_state, trainable_state


def federation(method, per_domain=1, **kw):
    torch.manual_seed(0)
    model = inject_lora(shapes_vit(10), ["attn.qkv", "attn.proj"], r=2, alpha=4, seed=0)
    doms = load_shapes(["clipart", "sketch", "quickdraw"], 40, 10)
    clients = [Client(d, idx) for d, idx in partition(doms, per_domain, 1.0, min_size=5, seed=0)]
    cfg = FedConfig(method=method, lr=0.05, batch_size=8, local_steps=3, progress=False,
                    agg_options={"steps": 20} if method == "lorafair" else {}, **kw)
    return Federation(model, doms, clients, cfg, torch.device("cpu"))


def a_keys(fed):
    return [k for k in lora_state(fed.model) if k.endswith("lora_A.weight")]


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_round_runs_and_logs_diagnostics(method):
    fed = federation(method)
    rec = fed.run_round()
    assert rec["round"] == 1 and rec["clients"] == [0, 1, 2]
    assert -1 <= rec["cos"] <= 1 + 1e-6 and rec["rel_err"] >= 0
    if method in ("flora", "fedex", "ffa", "rolora", "fedsvd", "frlora"):      # exact methods
        assert rec["cos"] == pytest.approx(1.0, abs=1e-5) and rec["rel_err"] < 1e-3
    for layer in rec["layers"].values():                  # FedIT <= ceiling; LoRA-FAIR (keeps A_bar) <= ceiling
        assert layer["cos_fedit"] <= layer["ceiling"] + 1e-9 and layer["scale"] > 0
        if method == "lorafair":                          # Eq. 8 solved: never above dB = 0, never inflated
            assert layer["cos"] <= layer["ceiling"] + 1e-6
            assert layer["eq8"] <= layer["eq8_0"] + 1e-12 and layer["scale"] <= 2 * (1 + 1e-6)
        else:
            assert "eq8" not in layer
    assert ("eq8" in rec) == ("eq8_0" in rec) == (method == "lorafair")
    assert len(rec["layers"]) == len(a_keys(fed)) and rec["ceiling"] <= 1
    acc = fed.evaluate()
    assert set(acc) == {"clipart", "sketch", "quickdraw", "mean"}


def test_head_is_fedavg_of_client_heads():
    fed = federation("fedit", per_domain=2)
    uploads = []
    orig = fed.local.train

    def spy(client, seed):
        loss = orig(client, seed)
        uploads.append((client.n, {k: v.clone() for k, v in trainable_state(fed.model).items() if k.startswith("head")}))
        return loss
    fed.local.train = spy
    fed.run_round()
    n = torch.tensor([u[0] for u in uploads], dtype=torch.float32)
    for key in ("head.weight", "head.bias"):
        want = sum((n[i] / n.sum()) * u[1][key] for i, u in enumerate(uploads))
        torch.testing.assert_close(dict(fed.model.named_parameters())[key], want)


def test_ffa_never_changes_A():
    fed = federation("ffa")
    A0 = {k: v for k, v in lora_state(fed.model).items() if k in a_keys(fed)}
    fed.run_round(), fed.run_round()
    state = lora_state(fed.model)
    assert all(torch.equal(state[k], A0[k]) for k in A0)
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith("lora_B.weight"))


def test_flora_folds_the_stack_into_the_base_and_restarts_lora():
    fed = federation("flora")
    layers = lora_layers(fed.model)
    W0 = {p: (base.weight[rows].clone(), lora.scaling) for p, (lora, base, rows) in layers.items()}
    products = {p: [] for p in layers}
    orig = fed.local.train

    def spy(client, seed):
        loss = orig(client, seed)
        for p, (lora, _, _) in layers.items():
            products[p].append((client.n, lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()))
        return loss
    fed.local.train = spy
    fed.run_round()
    for p, (lora, base, rows) in layers.items():
        n = sum(c for c, _ in products[p])
        dW = sum(c / n * BA for c, BA in products[p])
        W, s = W0[p]
        torch.testing.assert_close(base.weight[rows], W + s * dW, rtol=1e-5, atol=1e-6)
        assert lora.lora_B.weight.abs().sum() == 0                 # re-initialised: B = 0


def test_fedsa_keeps_B_per_client():
    fed = federation("fedsa")
    fed.run_round()
    Bs = [c.state for c in fed.clients]
    assert all(Bs) and all(k.endswith("lora_B.weight") for k in Bs[0])
    key = next(iter(Bs[0]))
    assert not torch.equal(Bs[0][key], Bs[1][key])
    # next round, a client starts from the global A and its own B
    glob = trainable_state(fed.model)
    fed.local.start(fed.clients[1], glob)
    assert torch.equal(dict(fed.model.named_parameters())[key], Bs[1][key])
    a = next(k for k in glob if k.endswith("lora_A.weight"))
    assert torch.equal(dict(fed.model.named_parameters())[a], glob[a])


def test_rolora_alternates_the_trained_factor():
    fed = federation("rolora")
    s0 = lora_state(fed.model)
    fed.run_round()                      # round 0 trains B only
    s1 = lora_state(fed.model)
    assert all(torch.equal(s0[k], s1[k]) for k in a_keys(fed))
    fed.run_round()                      # round 1 trains A only
    s2 = lora_state(fed.model)
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.endswith("lora_B.weight"))
    assert not all(torch.equal(s1[k], s2[k]) for k in a_keys(fed))


def test_nan_client_is_left_out_and_weights_renormalised():
    fed = federation("fedit")
    heads = {}
    orig = fed.local.train

    def poisoned(client, seed):
        loss = orig(client, seed)
        params = dict(fed.model.named_parameters())
        if client is fed.clients[1]:
            with torch.no_grad():
                params["blocks.0.attn.proj.lora_B.weight"].fill_(float("nan"))
        heads[id(client)] = (client.n, params["head.weight"].detach().clone())
        return loss
    fed.local.train = poisoned
    with pytest.warns(UserWarning, match=r"round 1: the updates of clients \[1\] are NaN/Inf"):
        rec = fed.run_round()
    assert rec["clients"] == [0, 2] and rec["dropped"] == [1]
    (n0, h0), (n2, h2) = heads[id(fed.clients[0])], heads[id(fed.clients[2])]
    want = (n0 * h0 + n2 * h2) / (n0 + n2)             # p_k renormalised over the two finite clients
    torch.testing.assert_close(dict(fed.model.named_parameters())["head.weight"], want)
    assert all(torch.isfinite(v).all() for v in trainable_state(fed.model).values())


def test_round_is_reproducible():
    a, b = federation("lorafair"), federation("lorafair")
    a.run_round(), b.run_round()
    sa, sb = trainable_state(a.model), trainable_state(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_client_init_local_keeps_each_clients_adapter():
    fed = federation("fedit", client_init="local")
    fed.run_round()
    states = [c.state for c in fed.clients]
    assert all(len(s) == len(fed.a_keys) + len(fed.b_keys) for s in states)
    fed.local.start(fed.clients[2], trainable_state(fed.model))
    now = dict(fed.model.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in states[2].items())


def test_client_init_fresh_folds_the_global_adapter_first():
    fed = federation("lorafair", client_init="fresh")
    fed.run_round()
    x = torch.randn(2, 3, 32, 32)
    fed.model.eval()
    with torch.no_grad():
        before = fed.model(x)
    seen = []
    orig = fed.local.train

    def spy(client, seed):
        fed.model.eval()
        with torch.no_grad():
            seen.append((lora_state(fed.model), fed.model(x)))
        return orig(client, seed)
    fed.local.train = spy
    fed.run_round()
    state, out = seen[0]
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith("lora_B.weight"))   # fresh LoRA
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-5)   # the same function: adapter folded in W0


def test_centralised_client_sees_every_domain():
    fed = federation("fedit")
    fed.clients = [Client(-1, list(range(sum(len(d.train) for d in fed.domains))))]
    assert len(fed.local.train_set(fed.clients[0])) == 120
    rec = fed.run_round()
    assert rec["clients"] == [0] and rec["cos"] == pytest.approx(1.0, abs=1e-6)


class ReadsRed(torch.nn.Module):
    """A perfect classifier for the images of tests/layouts.py, whose red channel is 8 * label."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))     # something for local SGD to hold

    def forward(self, x):                                # x: (N, 3, H, W), normalised by mean 0.5, std 0.5
        label = (x[:, 0].mean((1, 2)) * 0.5 + 0.5) * 255 / 8                      # (N,)
        return -(torch.arange(10) - label[:, None]).abs() + 0 * self.w           # (N, 10), peak at the label


def image_federation(tmp_path, broken_train=(), broken_test=(), centralised=False):
    from data import _Transform, image_domains, list_images
    from tests import layouts
    root = layouts.domainnet(str(tmp_path), per_class=4)
    lst = list_images("domainnet", root, ["clipart", "sketch"], 100)
    for d, split, i in [(d, "train", i) for d, i in broken_train] + [(d, "test", i) for d, i in broken_test]:
        (tmp_path / lst.items[d][split][i][0]).write_bytes(b"\x89PNG broken")
    doms = image_domains(lst, _Transform(8, (0.5,) * 3, (0.5,) * 3))
    clients = ([Client(-1, list(range(24)))] if centralised else [Client(0, list(range(12))), Client(1, list(range(12)))])
    cfg = FedConfig(method="fedit", lr=0.0, batch_size=5, local_epochs=2, progress=False)
    return Federation(ReadsRed(), doms, clients, cfg, torch.device("cpu"))


def test_unreadable_test_images_are_left_out_not_scored_wrong(tmp_path):
    fed = image_federation(tmp_path, broken_test=[("sketch", 0), ("sketch", 2)])
    acc = fed.evaluate()
    assert acc == {"clipart": 1.0, "sketch": 1.0, "mean": 1.0}     # not 0.5: the 2 broken of 4 are not counted
    assert fed.unreadable() == {"sketch": {"train": 0, "test": 2}}
    for i in (1, 3):
        (tmp_path / fed.domains[1].test.items[i][0]).write_bytes(b"")
    with pytest.raises(DataError, match="every one of the 4 test images of sketch could not be decoded"):
        fed.evaluate()


@pytest.mark.parametrize("centralised", [False, True])
def test_unreadable_training_images_are_counted_once_per_domain(tmp_path, centralised):
    fed = image_federation(tmp_path, broken_train=[("clipart", 3), ("sketch", 0), ("sketch", 11)],
                           centralised=centralised)
    for _ in range(2):                                # 2 visits of 2 local epochs: every image is met 4 times
        for k, c in enumerate(fed.clients):
            fed.local.train(c, seed=k)
    assert fed.unreadable() == {"clipart": {"train": 1, "test": 0}, "sketch": {"train": 2, "test": 0}}
    assert fed.unreadable_images.train == {"clipart": {3}, "sketch": {0, 11}}
    again = image_federation(tmp_path / "again", centralised=centralised)
    again.load_state_tensors(fed.state_tensors(), 0)                  # carried by checkpoints
    assert again.unreadable_images.train == fed.unreadable_images.train


def test_fedsa_local_head_is_kept_and_scored_per_client():
    fed = federation("fedsa", local_head=True)
    fed.run_round()
    heads = [{k: v for k, v in c.state.items() if k.startswith("head.")} for c in fed.clients]
    assert all(set(h) == {"head.weight", "head.bias"} for h in heads)
    assert not torch.equal(heads[0]["head.weight"], heads[1]["head.weight"])
    glob = trainable_state(fed.model)                      # the global head is the FedAvg of the clients'
    n = torch.tensor([c.n for c in fed.clients], dtype=torch.float64)
    mean = sum(p * h["head.weight"] for p, h in zip((n / n.sum()).tolist(), heads))
    torch.testing.assert_close(glob["head.weight"], mean)
    acc = fed.evaluate()
    for d, c in enumerate(fed.clients):                    # one client per domain: scored with its own B and head
        fed.local.start(c, glob)
        right, ok, _ = fed.counts(fed.domains[d].test)
        assert acc[fed.domains[d].name] == right / ok
        assert torch.equal(dict(fed.model.named_parameters())["head.bias"], heads[d]["head.bias"])
    shared = federation("fedsa")
    shared.run_round()
    assert all(not any(k.startswith("head.") for k in c.state) for c in shared.clients)


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_bytes_on_the_wire_per_method(method, monkeypatch):
    fed = federation(method, per_domain=2)                 # 6 clients, 2 LoRA layers per block, r = 2
    seen = []
    monkeypatch.setattr(fed_module, "aggregate_states", lambda s, w, *a, **k: seen.append((s, w)) or agg(s, w, *a, **k))
    rec = fed.run_round()
    K = len(rec["clients"])
    up0 = trainable_state(fed.model)
    size = lambda pred: sum(v.numel() * 4 for k, v in up0.items() if pred(k))   # noqa: E731 (float32)
    A, B = size(lambda k: "lora_A" in k), size(lambda k: "lora_B" in k)
    head = size(lambda k: k.startswith("head."))
    per = {"ffa": B, "fedsa": A, "rolora": B, "fedsvd": B, "frlora": B}.get(method, A + B) + head   # rolora: round 0: B
    assert rec["bytes"]["up"] == K * per
    if method == "flora":      # every client receives the K stacked adapters it folds in
        assert rec["bytes"]["down"] == K * (K * (A + B) + head)
    elif method == "florist":  # and the rank-m factors of each layer's truncated dW (m from tau = 0.9)
        states, w = seen[0]
        per_layer = 0
        for a in fed.a_keys:
            b = a.replace("lora_A", "lora_B")
            A_, B_ = (torch.stack([u[key] for u in states]).double() for key in (a, b))
            per_layer += dense_florist(A_, B_, w, 0.9)[1] * (B_.shape[-2] + A_.shape[-1]) * 4
        assert rec["bytes"]["down"] == K * (per_layer + head)
    elif method == "fedsvd":   # and the server's re-factorised A
        assert rec["bytes"]["down"] == K * (A + B + head)
    elif method == "fedex":    # and the dense residual, d_out x d_in per layer
        residual = sum(b.weight[rows].numel() * 4 for _, b, rows in lora_layers(fed.model).values())
        assert rec["bytes"]["down"] == K * (per + residual)
    else:
        assert rec["bytes"]["down"] == K * per
    if method == "lorafair":   # the paper's claim: LoRA-FAIR moves what FedIT moves
        fedit = federation("fedit", per_domain=2).run_round()
        assert fedit["bytes"] == rec["bytes"]


def test_a_lower_rank_client_trains_exactly_at_its_own_rank_and_scaling():
    """A rank-1 client (alpha 8: s = 8) inside the rank-2 global model (alpha 4: s_G = 2) trains
    exactly what a rank-1 LoRA at scaling 8 trains from its truncation of the global adapter."""
    fed = federation("fedit")
    with torch.no_grad():                                 # a global adapter with a non-zero B
        for lora, _, _ in lora_layers(fed.model).values():
            lora.lora_B.weight.normal_(0, 0.05)
    glob = trainable_state(fed.model)
    client = fed.clients[0]
    client.rank, client.scale = 1, 8.0
    fed.local.start(client, glob)
    fed.local.train(client, seed=5)
    up = fed.local.to_global_units(client, trainable_state(fed.model), None)
    fed.local.set_scaling(fed.scale)

    torch.manual_seed(0)
    small = inject_lora(shapes_vit(10), ["attn.qkv", "attn.proj"], r=1, alpha=8, seed=0)
    start = {k: (v[:1] if "lora_A" in k else v[:, :1] * (2.0 / 8.0) if "lora_B" in k else v) for k, v in glob.items()}
    ref = Federation(small, fed.domains, [Client(0, client.indices)], fed.cfg, torch.device("cpu"))
    ref.local.start(ref.clients[0], start)
    ref.local.train(ref.clients[0], seed=5)
    got = trainable_state(small)
    for k, v in up.items():
        if "lora_A" in k:
            torch.testing.assert_close(v[:1], got[k], rtol=1e-5, atol=1e-6)
            assert v[1:].abs().max() == 0
        elif "lora_B" in k:                                # uploaded in global units: x s_k / s_G
            torch.testing.assert_close(v[:, :1], got[k] * (8.0 / 2.0), rtol=1e-5, atol=1e-6)
            assert v[:, 1:].abs().max() == 0
        else:
            torch.testing.assert_close(v, got[k], rtol=1e-5, atol=1e-6)


HETERO = [m for m in AGGREGATORS if m != "frlora"]   # frlora defines one rank (refused: test below)


def test_frlora_refuses_clients_of_other_ranks():
    fed = federation("frlora")
    fed.clients[0].rank = 1
    with pytest.raises(ValueError, match="frlora is defined for one rank"):     # a round: the aggregator's check
        fed.run_round()
    with pytest.raises(ValueError, match="frlora is defined for one rank"):     # built so: Federation's own
        Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device)


@pytest.mark.parametrize("method", HETERO)
def test_heterogeneous_rank_rounds_keep_each_client_at_its_rank(method):
    fed = federation(method)
    for c, (r, s) in zip(fed.clients, [(1, 8.0), (2, 2.0), (2, 4.0)]):
        c.rank, c.scale = r, s
    rec = fed.run_round()
    rec2 = fed.run_round()
    assert rec2["round"] == 2 and -1 <= rec["cos"] <= 1 + 1e-6
    assert all(lora.scaling == fed.scale for lora, _, _ in lora_layers(fed.model).values())
    if method == "fedsa":                                  # the rank-1 client's own B stays rank 1
        assert all(v[:, 1:].abs().max() == 0 for k, v in fed.clients[0].state.items() if "lora_B" in k)
    fed.evaluate()


# ----------------------------------------------------------------------------- absent clients, unheld slots

def manual_round(fed, chosen, nan=()):
    """Round fed.round with the clients `chosen` (not the sampler's); those in `nan` upload NaN."""
    _, phase, glob = fed.begin_round()
    results = []
    for k in chosen:
        up, loss = fed.train_client(k, glob, phase)
        if k in nan:
            up = {key: v.clone().fill_(float("nan")) if "lora_B" in key else v for key, v in up.items()}
        results.append((k, up, loss))
    return glob, phase, fed.finish_round(chosen, phase, glob, results, 0.0)


def hetero(method, **kw):
    """Three clients of ranks 1, 1, 2 (alpha 4, 4, 4: s_k = 4, 4, 2) in a rank-2 model."""
    fed = federation(method, **kw)
    for c, (r, s) in zip(fed.clients, [(1, 4.0), (1, 4.0), (2, 2.0)]):
        c.rank, c.scale = r, s
    return fed


def slots(fed):
    """Per adapted layer, which rank slots are alive: (A row i != 0, B column i != 0)."""
    p = dict(fed.model.named_parameters())
    return [((p[a].abs().sum(1) > 0).tolist(), (p[b].abs().sum(0) > 0).tolist()) for a, b in zip(fed.a_keys, fed.b_keys)]


@pytest.mark.parametrize("absent", ["not sampled", "NaN"])
@pytest.mark.parametrize("method", HETERO)
def test_a_slot_no_participant_holds_keeps_its_global_value(method, absent):
    fed = hetero(method)
    with torch.no_grad():                                  # a global adapter with every slot in use
        for lora, _, _ in lora_layers(fed.model).values():
            lora.lora_B.weight.normal_(0, 0.05)
    chosen, nan = ([0, 1], ()) if absent == "not sampled" else ([0, 1, 2], (2,))
    glob, phase, rec = manual_round(fed, chosen, nan)
    assert rec["clients"] == [0, 1]
    new = dict(fed.model.named_parameters())
    frozen = {"ffa": fed.a_keys, "rolora": fed.a_keys}.get(method, [])   # rolora's round 0 trains B
    for a, b in zip(fed.a_keys, fed.b_keys):
        if method in ("flora", "florist"):                 # a fresh LoRA: every A row drawn, B = 0
            assert (new[a].abs().sum(1) > 0).all() and new[b].abs().max() == 0
        elif method in ("flexlora", "fedsvd"):             # re-factorised: every A row a singular vector
            assert (new[a].norm(dim=1) - 1).abs().max() < 1e-5
        elif method == "spectral":                         # a singular vector, or a drawn row with B's column 0
            kept = new[b].abs().sum(0) > 0
            assert ((new[a].norm(dim=1) - 1).abs() < 1e-5)[kept].all() and kept[0]
        else:                                              # slot 1: held by nobody, bit for bit the global
            assert torch.equal(new[a][1:], glob[a][1:]) and torch.equal(new[b][:, 1:], glob[b][:, 1:])
            assert not torch.equal(new[b][:, :1], glob[b][:, :1])           # slot 0 was trained
        if a in frozen:                                    # never a participant's (masked) copy
            assert torch.equal(new[a], glob[a])
    if method == "rolora":                                 # round 1 (phase 'A'): B is the frozen one
        glob, phase, _ = manual_round(fed, chosen, nan)
        assert phase == "A"
        new = dict(fed.model.named_parameters())
        assert all(torch.equal(new[b], glob[b]) for b in fed.b_keys)
        assert all(torch.equal(new[a][1:], glob[a][1:]) for a in fed.a_keys)


@pytest.mark.parametrize("method", [m for m in HETERO if m != "spectral"])   # spectral: ScreeNOT picks the rank
def test_a_top_rank_client_absent_in_round_1_leaves_the_rank_structure_of_full_participation(method):
    partial, full = hetero(method), hetero(method)
    manual_round(partial, [0, 1])                         # the rank-2 client is not drawn
    manual_round(full, [0, 1, 2])
    for _ in range(2 if method == "rolora" else 1):       # rolora: B trains again in round 3 (phase 'B')
        manual_round(partial, [0, 1, 2])
        manual_round(full, [0, 1, 2])
    assert slots(partial) == slots(full)
    if method not in ("flora", "florist"):                # (their B restarts at 0 every round)
        assert all(all(a) and all(b) for a, b in slots(partial))
    elif method == "flora":                               # what it folds once the rank-2 client is back:
        W = {p: base.weight[rows].clone() for p, (_, base, rows) in lora_layers(partial.model).items()}
        manual_round(partial, [0, 1, 2])                  # an update of rank > 1 (florist: its energy share m)
        folds = [torch.linalg.svdvals(base.weight[rows] - W[p]) for p, (_, base, rows) in lora_layers(partial.model).items()]
        assert any(S[1] > 1e-3 * S[0] for S in folds)


def test_ffa_A_is_the_initial_A_bit_for_bit_under_heterogeneous_partial_rounds():
    fed = hetero("ffa")
    A0 = {k: v.clone() for k, v in dict(fed.model.named_parameters()).items() if k in fed.a_keys}
    for chosen in ([0, 1], [1], [0, 1, 2], [2]):
        manual_round(fed, chosen)
    assert all(torch.equal(dict(fed.model.named_parameters())[k], v) for k, v in A0.items())


@pytest.mark.parametrize("ranks", [False, True])
@pytest.mark.parametrize("local_head", [False, True])
def test_fedsa_client_drawn_for_the_first_time_starts_from_its_initial_B(local_head, ranks):
    """FedSA-LoRA's per-client models: a client that never trained has its own initial B (zero)
    and head, not the average of the other clients' B; and is scored with them."""
    fed = hetero("fedsa", local_head=local_head) if ranks else federation("fedsa", local_head=local_head)
    init = {k: v.clone() for k, v in trainable_state(fed.model).items()}
    manual_round(fed, [0, 1])
    glob = trainable_state(fed.model)
    assert any(glob[k].abs().max() > 0 for k in fed.b_keys)            # B_bar is not zero any more
    fed.local.start(fed.clients[2], glob)
    now = trainable_state(fed.model)
    for k in fed.b_keys + (fed.head_keys if local_head else []):
        assert torch.equal(now[k], init[k])
    for k in fed.a_keys + ([] if local_head else fed.head_keys):       # the shared parts are the global ones
        assert torch.equal(now[k], glob[k])
    fed.local.start(fed.clients[0], glob)                             # a returning client: its own B
    assert all(torch.equal(trainable_state(fed.model)[k], fed.clients[0].state[k]) for k in fed.b_keys)
    fed.load_state_tensors(fed.state_tensors(), fed.round)
    fed.local.set_scaling(fed.scale)
    acc = fed.evaluate()                                              # client 2's domain: its initial B and head
    fed.local.start(fed.clients[2], glob)
    right, ok, _ = fed.counts(fed.domains[2].test)
    assert acc[fed.domains[2].name] == right / ok
