"""DP-SGD on the clients (dp.py): per-record gradients, clipping, noise, the accountant's numbers,
padding, every method, resume, refusals, and no Opacus without --dp-epsilon."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dp
import fed as fed_module
from aggregators import AGGREGATORS
from backbone import shapes_mixer, shapes_vit
from fed import Federation, plan_privacy
from lora import inject_lora, trainable_state
from tests.test_fed import federation, hetero
from tests.test_train import TINY
from train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP = ["--dp-epsilon", "6"]
DP_RUNS = {"fedit-ranks": [*DP, "--method", "fedit", "--ranks", "2,1"], "ffa": [*DP, "--method", "ffa"],
           "rolora": [*DP, "--method", "rolora"]}   # torchrun: tests/test_distributed.py


def lora_model(backbone, targets, frozen_a=False):
    torch.manual_seed(0)
    model = inject_lora(backbone(10), targets, r=2, alpha=4, dropout=0.0, seed=0)
    with torch.no_grad():                                  # B != 0, so A has a gradient too
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.2)
            if frozen_a and name.endswith("lora_A.weight"):
                p.requires_grad_(False)
    return model


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    y[2] = -1                                              # an unreadable record: no loss, no gradient
    return x, y


def per_example(model, x, y):
    """{name: (n, *shape)} each record's gradient of its own loss, one backward per record."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(len(x)):
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], ignore_index=-1, reduction="sum").backward()
        for n, p in params.items():
            out[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in out.items()}


def dp_step(model, x, y, sigma, clip, seed=0):
    """One DP-SGD step's gradient as local_sgd forms it (p.grad after pre_step), and the hooks' g_i."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    with dp.private(model, opt, sigma, clip, len(x), torch.Generator().manual_seed(seed)) as dp_opt:
        dp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, ignore_index=-1, reduction="sum").backward()
        g_i = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
        dp_opt.pre_step()
        grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())   # the hooks are gone
    return grad, g_i


@pytest.mark.parametrize("backbone,targets,frozen_a", [
    (shapes_vit, ["attn.qkv", "attn.proj"], False),        # LoRAQKV and LoRALinear, head
    (shapes_vit, ["attn.qkv", "attn.proj"], True),         # FFA-LoRA: B and head only
    (shapes_mixer, ["mlp_channels.fc2"], False)])
def test_per_record_gradients_equal_a_per_example_loop(backbone, targets, frozen_a):
    model = lora_model(backbone, targets, frozen_a)
    x, y = batch()
    ref = per_example(model, x, y)
    _, g_i = dp_step(model, x, y, sigma=0.0, clip=1e9)
    assert g_i.keys() == ref.keys() and any("head" in n for n in g_i)
    assert all(not n.endswith("lora_A.weight") for n in g_i) if frozen_a else any("lora_A" in n for n in g_i)
    for n in ref:
        torch.testing.assert_close(g_i[n], ref[n], rtol=1e-5, atol=1e-6 * ref[n].abs().max(), msg=n)
        assert ref[n][2].abs().max() == 0                  # the unreadable record adds nothing


def test_each_record_is_clipped_to_the_bound_before_the_sum():
    model = lora_model(shapes_vit, ["attn.qkv", "attn.proj"])
    x, y = batch()
    ref = per_example(model, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref.values()]).norm(dim=0)   # (n,) ||g_i||
    clip = float(norms[norms > 0].median())                # some records clipped, some not
    grad, _ = dp_step(model, x, y, sigma=0.0, clip=clip)
    factor = (clip / (norms + 1e-6)).clamp(max=1)          # min(1, C / ||g_i||)
    assert (factor < 1).any() and (factor == 1).any()
    for n in ref:                                          # sum_i min(1, C/||g_i||) g_i / L
        want = torch.einsum("i,i...->...", factor, ref[n]) / len(x)
        torch.testing.assert_close(grad[n], want, rtol=1e-4, atol=1e-7, msg=n)
    for i in range(len(x)):                                # one record alone: its clipped gradient's norm <= C
        one, _ = dp_step(model, x[i:i + 1], y[i:i + 1], sigma=0.0, clip=clip)
        norm = torch.cat([g.flatten() for g in one.values()]).norm()
        assert norm <= clip * (1 + 1e-5)
        assert norm == pytest.approx(min(float(norms[i]), clip), rel=1e-4)


def test_noise_is_gaussian_of_std_sigma_clip_over_batch():
    model = lora_model(shapes_vit, ["attn.qkv", "attn.proj"])
    x, y = batch(8)
    clean, _ = dp_step(model, x, y, sigma=0.0, clip=0.5)
    noisy, _ = dp_step(model, x, y, sigma=1.5, clip=0.5, seed=3)
    again, _ = dp_step(model, x, y, sigma=1.5, clip=0.5, seed=3)
    z = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])          # the noise, per coordinate
    assert all(torch.equal(noisy[n], again[n]) for n in noisy)               # drawn from the seed
    assert z.numel() > 5000
    assert z.std().item() == pytest.approx(1.5 * 0.5 / 8, rel=0.05) and abs(z.mean().item()) < 0.005


def test_noise_and_epsilon_are_the_accountants_for_each_clients_rate_and_steps():
    from opacus.accountants import PRVAccountant
    from opacus.accountants.utils import get_noise_multiplier
    fed = federation("fedit", per_domain=1)                # 3 clients, batch 8, 3 local steps a round
    fed.cfg.dp, fed.cfg.participation = dp.DPConfig(4.0, 1e-5, 1.0), 2 / 3
    privacy = plan_privacy(fed.clients, fed.cfg, rounds=3)
    taken = [sum(k in fed_module.sample_clients(3, 2 / 3, 0, t) for t in range(3)) for k in range(3)]
    assert sorted(taken) != [3, 3, 3] and sum(taken) == 6  # some client sits a round out
    for k, c in enumerate(fed.clients):
        q = 8 / c.n
        steps = max(taken[k], 1) * min(int(1 / q), 3)
        assert privacy.rate[k] == q and privacy.per_round[k] * privacy.planned[k] == steps
        assert privacy.sigma[k] == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=q,
                                                        steps=steps, accountant="prv")
    fed = Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device, privacy=privacy)
    for t in range(3):
        rec = fed.run_round()
    for k in range(3):
        acc = PRVAccountant()                              # stepped by hand, as Opacus's optimizer hook does
        for _ in range(taken[k] * privacy.per_round[k]):
            acc.step(noise_multiplier=privacy.sigma[k], sample_rate=privacy.rate[k])
        eps = acc.get_epsilon(1e-5)
        assert rec["dp"]["epsilon"][str(k)] == pytest.approx(eps, rel=1e-12) and eps <= 4.0
        if taken[k] == max(taken):                         # calibrated to the budget, not far below it
            assert eps > 4.0 - 0.05


def test_what_local_sgd_does_is_what_the_ledger_spends(monkeypatch):
    """Opacus's own accountant, stepped by a hook on every DP-SGD step local_sgd takes, holds the
    ledger's history: its sigma_k, q_k, and steps (Poisson batches of the client's records)."""
    from opacus.accountants import PRVAccountant
    from opacus.data_loader import DPDataLoader
    fed = federation("rolora")                             # 3 clients; 3 local steps a round; phases
    fed.cfg.dp = dp.DPConfig(6.0)
    fed = Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device,
                     privacy=plan_privacy(fed.clients, fed.cfg, rounds=2))
    hooked, real_private, real_loader = {}, dp.private, dp.poisson_loader
    current, loaded = [], []

    def loader(data, q, **kw):
        loaded.append(current[-1])
        out = real_loader(data, q, **kw)
        assert isinstance(out, DPDataLoader) and len(data) == fed.clients[current[-1]].n
        assert q == fed.privacy.rate[current[-1]] and len(out) == int(1 / q)
        return out

    def private(model, opt, sigma, clip, batch_size, generator):
        cm = real_private(model, opt, sigma, clip, batch_size, generator)
        dp_opt = cm.__enter__()
        assert (sigma, clip, batch_size) == (fed.privacy.sigma[current[-1]], 2.0, 8)
        acc = hooked.setdefault(current[-1], PRVAccountant())
        dp_opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=fed.privacy.rate[current[-1]]))
        return _Entered(cm, dp_opt)
    real_train = fed.train_client
    monkeypatch.setattr(dp, "poisson_loader", loader)
    monkeypatch.setattr(dp, "private", private)
    monkeypatch.setattr(fed, "train_client", lambda k, glob, phase: current.append(k) or real_train(k, glob, phase))
    for _ in range(2):
        rec = fed.run_round()
    assert loaded == current == [0, 1, 2, 0, 1, 2]         # every client's batches by Poisson sampling
    for k in range(3):
        assert hooked[k].history == [(fed.privacy.sigma[k], fed.privacy.rate[k], fed.privacy.steps[k])]
        assert rec["dp"]["steps"][str(k)] == 2 * 3 and rec["dp"]["noise_multiplier"][str(k)] == fed.privacy.sigma[k]
        assert rec["dp"]["epsilon"][str(k)] == pytest.approx(hooked[k].get_epsilon(1e-5), rel=1e-12)


class _Entered:
    """A context manager already entered: gives `value`, exits the real one."""
    def __init__(self, cm, value):
        self.cm, self.value = cm, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_an_empty_poisson_batch_is_a_step_of_noise_alone():
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset
    from fed import FedConfig, local_sgd
    model = lora_model(shapes_vit, ["attn.qkv", "attn.proj"])
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.arange(4))
    loader = DPDataLoader(data, sample_rate=1e-9, generator=torch.Generator().manual_seed(0))   # every batch empty
    before = trainable_state(model)
    cfg = FedConfig(lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=2, local_steps=1, local_epochs=0,
                    progress=False, dp=dp.DPConfig(6.0, clip=0.5))
    loss, _ = local_sgd(model, loader, [], cfg, torch.device("cpu"), noise=(1.0, torch.Generator().manual_seed(0)))
    step = torch.cat([(trainable_state(model)[k] - before[k]).flatten() for k in before])   # -lr * noise / L
    assert loss == 0 and step.numel() > 5000
    assert (step / 0.1).std().item() == pytest.approx(1.0 * 0.5 / 2, rel=0.05)


def test_secret_noise_is_not_the_seeds():
    def round_of(secret):
        fed = federation("fedit")
        fed.cfg.dp = dp.DPConfig(6.0, secret=secret)
        fed = Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device,
                         privacy=plan_privacy(fed.clients, fed.cfg, rounds=1))
        fed.run_round()
        return trainable_state(fed.model)
    seeded, again, secret = round_of(False), round_of(False), round_of(True)
    assert all(torch.equal(seeded[k], again[k]) for k in seeded)
    assert any(not torch.equal(seeded[k], secret[k]) for k in seeded if "lora_B" in k)


@pytest.mark.parametrize("method", ["fedit", "ffa", "rolora", "fedsvd"])
def test_padding_of_a_lower_rank_client_stays_zero_under_noise(method):
    fed = hetero(method)
    fed.cfg.dp = dp.DPConfig(6.0)
    fed = Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device,
                     privacy=plan_privacy(fed.clients, fed.cfg, rounds=2))
    low = [k for k, c in enumerate(fed.clients) if (c.rank or fed.R) < fed.R]
    assert low
    for _ in range(2):
        glob = trainable_state(fed.model)
        for k in low:
            r, phase = fed.clients[k].rank, ("B" if fed.round % 2 == 0 else "A") if method == "rolora" else None
            up, _ = fed.train_client(k, glob, phase)
            for key, v in up.items():
                if key.endswith("lora_A.weight"):
                    assert v[r:].abs().max() == 0, key
                if key.endswith("lora_B.weight"):
                    assert v[:, r:].abs().max() == 0, key
                    assert phase == "A" or v[:, :r].abs().max() > 0   # the held slots did get noise
        fed.run_round()


@pytest.mark.parametrize("method", list(AGGREGATORS))
def test_every_method_trains_under_dp(method):
    fed = federation(method)
    fed.cfg.dp = dp.DPConfig(6.0)
    fed = Federation(fed.model, fed.domains, fed.clients, fed.cfg, fed.device,
                     privacy=plan_privacy(fed.clients, fed.cfg, rounds=1))
    before = trainable_state(fed.model)
    rec = fed.run_round()
    assert set(rec["dp"]["epsilon"]) == {"0", "1", "2"} and 0 < max(rec["dp"]["epsilon"].values()) <= 6
    after = trainable_state(fed.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in fed.model.parameters())


def test_resume_spends_exactly_what_an_unbroken_run_does(tmp_path, monkeypatch):
    args = [*TINY, *DP, "--method", "rolora", "--ranks", "2,1", "--rounds", "3"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    real = fed_module.Federation.run_round

    def stop_in_round_3(self):
        if self.round == 2:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(fed_module.Federation, "run_round", stop_in_round_3)
    assert main([*args, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(fed_module.Federation, "run_round", real)
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    a, b = (load_file(tmp_path / n / "checkpoint.safetensors") for n in ("full", "split"))
    assert a.keys() == b.keys() and "dp/steps" in a and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = ([json.loads(x)["dp"] for x in open(tmp_path / n / "metrics.jsonl")] for n in ("full", "split"))
    assert ra == rb and len(ra) == 3 and max(ra[-1]["epsilon"].values()) <= 6


def test_a_resume_past_the_budget_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, *DP, "--rounds", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*TINY, *DP, "--rounds", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dp-epsilon 6: client 0 would spend epsilon ")
    assert "calibrated for 2 rounds" in err[0]
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*TINY, *DP, "--rounds", "2", "--out", str(out), "--resume"]) == 0   # within budget: fine


@pytest.mark.parametrize("args,message", [
    (["--dp-clip", "1"], "--dp-clip applies with --dp-epsilon"),
    (["--dp-epsilon", "0"], "--dp-epsilon and --dp-clip must be finite and > 0"),
    (["--dp-epsilon", "6", "--dp-delta", "1"], "--dp-delta in (0, 1); got 6, 1 and 2"),
    (["--dp-epsilon", "6", "--batch-size", "24"], "client 0 has 24 records, not more than the batch size 24"),
    (["--dp-epsilon", "6", "--amp"], "--amp with --dp-epsilon: per-record gradients in bf16"),
    (["--dp-epsilon", "inf"], "--dp-epsilon and --dp-clip must be finite and > 0"),
    (["--dp-secret-noise"], "--dp-secret-noise applies with --dp-epsilon"),
    (["--dp-epsilon", "6", "--dp-delta", "0.05"], "--dp-delta 0.05 is not below 1 / n_k = 0.0417")])
def test_dp_refusals_are_one_line_before_any_work(tmp_path, capsys, args, message):
    assert main([*TINY, *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "run").exists()


def test_dp_runs_in_float32_where_bf16_is_the_default(monkeypatch):
    import train
    monkeypatch.setattr(train, "bf16_native", lambda device: True)
    parse = lambda *a: train.resolve(train.get_args_parser().parse_args([*TINY, *a]))   # noqa: E731
    assert parse().amp is True and parse(*DP).amp is False


def test_a_run_reports_its_privacy_as_the_literature_does(tmp_path, capsys):
    assert main([*TINY, *DP, "--rounds", "2", "--out", str(tmp_path / "run")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy:")]
    assert len(line) == 1
    for part in ("record-level DP-SGD", "PRV accountant", "of 6, delta 1e-05", "noise multiplier", "clip 2",
                 "sample rate 0.3333", "steps 4", "noise drawn from --seed"):
        assert part in line[0]


def test_opacus_is_not_imported_without_dp(tmp_path):
    code = ("import sys; from train import main; "
            f"assert main({[*TINY, '--rounds', '1', '--out', str(tmp_path / 'run')]!r}) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
