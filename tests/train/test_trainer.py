"""Trainer: the update rule against a dense reference, schedules, monitoring, checkpoints, bad input,
and recovery of a planted shared dictionary."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from usae.config import TrainConfig
from usae.core.model import UniversalSAE
from usae.train.history import LogEntry, TrainHistory
from usae.train.trainer import Trainer, learning_rate

DIMS = {"a": 6, "b": 10, "c": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, dims=DIMS, m=24, k=3, encoder="batchnorm"):
    torch.manual_seed(seed)
    return UniversalSAE(dims, m, k, encoder)


def make_data(n=256, dims=DIMS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, d, generator=g) for name, d in dims.items()}


def cfg(**kw):
    base = dict(steps=12, batch_size=32, warmup_steps=3, log_every=4, lr=1e-2, final_lr=1e-4)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def optimizer_state(opt):
    return {pid: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for pid, s in opt.state_dict()["state"].items()}


def states_equal(a, b):
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a)


# -- schedule ------------------------------------------------------------------------------------------------
def test_learning_rate_warmup_then_cosine():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, final_lr=1e-5)
    assert learning_rate(c, 0) == pytest.approx(1e-5)
    assert learning_rate(c, 5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert learning_rate(c, 110) == pytest.approx(1e-5)
    assert learning_rate(c, 500) == pytest.approx(1e-5)
    assert learning_rate(TrainConfig(steps=10, warmup_steps=0, lr=1.0, final_lr=0.5), 0) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["global", "per_model"])
def test_schedule_drives_each_models_learning_rate(schedule):
    c = cfg(schedule=schedule, steps=20)
    history = Trainer(make_model(), c, progress=False).fit(make_data())
    picks = [0, 0, 0]
    for step, (i, lr) in enumerate(zip(history.model, history.lr, strict=True)):
        position = step if schedule == "global" else picks[i]
        assert lr == pytest.approx(learning_rate(c, position))
        picks[i] += 1


# -- the update rule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,aux,encoder", [("l1", "official", "batchnorm"), ("l2", "none", "batchnorm"),
                                             ("l1", "none", "linear"), ("l2", "official", "linear")])
def test_one_step_matches_dense_official_reference(loss, aux, encoder):
    model = make_model(encoder=encoder)
    reference = copy.deepcopy(model)
    c = cfg(loss=loss, aux=aux, warmup_steps=0)
    batch = make_data(n=40)
    i = Trainer(model, c, progress=False).train_step(batch)
    # official step: dense code, every decoder in the graph, clip model i, step model i's AdamW only
    name = reference.names[i]
    reference.train()
    pre = reference.encode_pre(name, batch[name])
    relu = pre.relu()
    top = relu.topk(reference.k, dim=1)
    z = torch.zeros_like(relu).scatter(1, top.indices, top.values)
    u = relu - z
    keep = u.topk(pre.shape[1] // 2, dim=1)
    u = torch.zeros_like(u).scatter(1, keep.indices, keep.values)
    err = (lambda t: t.abs().mean()) if loss == "l1" else (lambda t: t.square().mean())
    total = 0
    for n in reference.names:
        d = reference.dictionary(n)
        residual = batch[n] - z @ d
        total = total + err(residual) + (0.1 * err(residual - u @ d) if aux == "official" else 0)
    total.backward()
    params = reference.model_parameters(name)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt = torch.optim.AdamW(params, lr=learning_rate(c, 0), weight_decay=c.weight_decay)
    opt.step()
    for (key, got), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        if encoder == "batchnorm" and key.endswith("linear.bias"):
            continue  # its true gradient is 0 (BN removes it); Adam turns rounding noise into ±lr steps
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=key)


def test_paper_update_steps_only_the_selected_model():
    model = make_model()
    trainer = Trainer(model, cfg(), progress=False)
    data = make_data()
    seen = set()
    for step in range(8):
        before, opt_before = snapshot(model), [optimizer_state(o) for o in trainer.optimisers]
        batch = {n: t[step * 32:(step + 1) * 32] for n, t in data.items()}
        i = trainer.train_step(batch)
        seen.add(i)
        after = snapshot(model)
        for j, opt in enumerate(trainer.optimisers):
            prefix = f"coders.{j}."
            changed = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
            if j == i:
                assert changed and states_equal(opt_before[j], opt_before[j])
                assert not states_equal(optimizer_state(opt), opt_before[j])
            else:
                assert changed == []  # weights and BN statistics untouched
                assert states_equal(optimizer_state(opt), opt_before[j])  # optimizer state untouched
    assert len(seen) > 1


def test_joint_update_steps_all_decoders_and_only_the_selected_encoder():
    model = make_model()
    trainer = Trainer(model, cfg(update="joint"), progress=False)
    before = snapshot(model)
    i = trainer.train_step(make_data(n=32))
    after = snapshot(model)
    for j in range(3):
        assert not torch.equal(before[f"coders.{j}.dictionary"], after[f"coders.{j}.dictionary"])
        assert torch.equal(before[f"coders.{j}.linear.weight"], after[f"coders.{j}.linear.weight"]) == (j != i)


@pytest.mark.parametrize("aux,update,encoder", [
    ("none", "paper", "batchnorm"), ("auxk", "paper", "batchnorm"), ("official", "paper", "batchnorm"),
    ("none", "joint", "linear"), ("auxk", "joint", "linear"), ("official", "joint", "batchnorm")])
def test_fused_encoder_matches_the_autograd_path(aux, update, encoder):
    runs = []
    for fused in (True, False):
        model = make_model(encoder=encoder, m=64, k=2)  # m >> k: latents go dead within a batch or two
        if encoder == "batchnorm":  # its true gradient is 0 (exactly, fused); Adam would turn autograd's
            for coder in model.coders:  # rounding noise into ±lr steps that also move the running mean
                coder.linear.bias.requires_grad_(False)
        c = cfg(aux=aux, update=update, steps=6, auxk_k=4, dead_after_tokens=32, aux_coef=1.0, loss="l2")
        trainer = Trainer(model, c, progress=False)
        trainer.fused_encoder = fused
        history = trainer.fit(make_data())
        runs.append((snapshot(model), history, trainer.since_fire.clone()))
    (fast, fast_history, fast_fire), (slow, slow_history, slow_fire) = runs
    if aux == "auxk":
        assert any(v > 0 for n in DIMS for v in fast_history.aux[n])  # dead latents were used
    np.testing.assert_allclose(fast_history.loss, slow_history.loss, rtol=1e-4)
    assert torch.equal(fast_fire, slow_fire)
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-5, msg=key)


def test_unfused_path_goes_through_the_pre_activation_hook():
    calls = []

    class Hooked(Trainer):
        fused_encoder = False

        def _pre_activations(self, name, x):
            calls.append(name)
            return super()._pre_activations(name, x)

    Hooked(make_model(), cfg(aux="none", steps=2), progress=False).fit(make_data())
    assert len(calls) == 2
    with pytest.raises(ValueError, match="mixed_precision = True is only supported on CUDA"):
        trainer = Trainer(make_model(), cfg(), progress=False)
        trainer.mixed_precision = True
        trainer.train_step(make_data(n=32))


def test_model_choice_is_uniform_and_seeded():
    c = cfg(steps=150, log_every=150)
    picks = Trainer(make_model(), c, progress=False).fit(make_data()).model
    counts = np.bincount(picks, minlength=3)
    assert counts.min() > 30  # ~50 each
    assert picks == Trainer(make_model(), c, progress=False).fit(make_data()).model
    other_seed = cfg(steps=150, log_every=150, seed=1)
    assert picks != Trainer(make_model(), other_seed, progress=False).fit(make_data()).model


# -- monitoring ----------------------------------------------------------------------------------------------
def test_history_and_running_r2_from_the_batches_seen():
    model = make_model()
    before = copy.deepcopy(model)
    batch = make_data(n=32)
    trainer = Trainer(model, cfg(steps=1, log_every=1), progress=False)
    history = trainer.fit([batch])
    i = history.model[0]
    log = history.log[0]
    before.train()
    with torch.no_grad():
        recon = before.decode(before.encode(before.names[i], batch[before.names[i]]))
    for j, n in enumerate(before.names):
        t, e = batch[n].double(), recon[n].double()
        expected = 1 - (t - e).square().sum() / (t - t.mean()).square().sum()
        assert log.r2[i][j] == pytest.approx(expected.item(), rel=1e-4)
    assert all(math.isnan(log.r2[r][0]) for r in range(3) if r != i)
    data = json.loads(json.dumps(history.to_dict()))  # plain data, and back
    assert set(data) >= {"names", "step", "model", "lr", "loss", "recon", "aux", "log"}
    assert isinstance(history, TrainHistory) and isinstance(history.log[0], LogEntry)
    assert set(history.recon) == set(history.aux) == set(model.names)  # per-model series keyed by name


def test_history_lengths_and_losses():
    history = Trainer(make_model(), cfg(steps=10, log_every=4), progress=False).fit(make_data())
    assert history.step == list(range(10))
    assert [e.step for e in history.log] == [4, 8, 10]
    for n in DIMS:
        assert len(history.recon[n]) == 10 and len(history.aux[n]) == 10
    total = [sum(history.recon[n][s] + 0.1 * history.aux[n][s] for n in DIMS) for s in range(10)]
    np.testing.assert_allclose(history.loss, total, rtol=1e-5)


def test_dead_latents_are_tracked_and_auxk_reaches_them():
    results = {}
    for aux in ("none", "auxk"):
        model = make_model(encoder="linear")
        with torch.no_grad():
            for coder in model.coders:
                coder.linear.bias[8:] = 100.0  # latents 0..7 can never win the TopK, yet are often > 0
        before = snapshot(model)
        c = cfg(aux=aux, auxk_k=4, dead_after_tokens=64, steps=6, log_every=6, aux_coef=1.0,
                weight_decay=0.0)  # decay alone would move the rows
        trainer = Trainer(model, c, progress=False)
        history = trainer.fit(make_data())
        results[aux] = (history, before, snapshot(model), trainer)
    history, _, _, trainer = results["none"]
    for name, fraction in history.log[-1].dead_fraction.items():
        picked = history.model.count(model.index(name))
        if picked * 32 >= 64:
            assert trainer.dead_mask(name)[:8].all() and fraction >= 8 / 24
        else:
            assert fraction == 0.0 and not trainer.dead_mask(name).any()
    for aux, expect_change in (("none", False), ("auxk", True)):
        _, before, after, _ = results[aux]
        moved = any(not torch.equal(before[f"coders.{j}.linear.weight"][:8], after[f"coders.{j}.linear.weight"][:8])
                    for j in range(3))
        assert moved == expect_change


def test_independent_sae_is_m_equals_one():
    model = make_model(dims={"solo": 8})
    history = Trainer(model, cfg(steps=5), progress=False).fit(make_data(dims={"solo": 8}))
    assert set(history.model) == {0} and len(history.log[-1].r2) == 1


def test_store_source_is_cycled_with_a_new_seed_per_epoch():
    class Store:
        def __init__(self):
            self.calls = []

        def batches(self, split, batch_size, shuffle, seed):
            self.calls.append((split, batch_size, shuffle, seed))
            data = make_data(n=64, seed=seed)
            for s in range(0, 64, batch_size):
                yield {n: t[s:s + batch_size] for n, t in data.items()}

    store = Store()
    Trainer(make_model(), cfg(steps=5, batch_size=32), progress=False).fit(store)
    assert [c[:3] for c in store.calls] == [("train", 32, True)] * 3
    assert len({c[3] for c in store.calls}) == 3


# -- determinism and checkpoints ----------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_weights():
    runs = []
    for _ in range(2):
        model = make_model()
        Trainer(model, cfg(aux="official"), progress=False).fit(make_data())
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class Crash(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = make_data()
    c = cfg(steps=12, checkpoint_every=4, log_every=3, aux="official")
    full_model = make_model()
    full = Trainer(full_model, c, progress=False).fit(_Cycle(data))

    model = make_model()
    with pytest.raises(Crash):
        Trainer(model, c, checkpoint_dir=tmp_path, progress=False).fit(
            _Cycle(data, crash_at=6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004"]
    resumed_model = make_model(seed=123)  # different init: everything comes from the checkpoint
    resumed = Trainer(resumed_model, c, checkpoint_dir=tmp_path, progress=False).fit(_Cycle(data))
    reference, got = snapshot(full_model), snapshot(resumed_model)
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    assert json.dumps(resumed.to_dict()) == json.dumps(full.to_dict())  # history too (json: NaN == NaN)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_000000008", "step_000000012"]  # keep_checkpoints=2, no temp directories
    assert sorted(p.name for p in (tmp_path / "step_000000012").iterdir()) == \
        ["model.safetensors", "state.json", "trainer.safetensors"]
    # a finished run resumes to its end without training
    again = Trainer(make_model(seed=5), c, checkpoint_dir=tmp_path, progress=False)
    assert json.dumps(again.fit(_Cycle(data)).to_dict()) == json.dumps(resumed.to_dict()) and again.step == 12
    assert UniversalSAE.load(tmp_path / "step_000000012" / "model.safetensors").config() == full_model.config()


class _Cycle:
    """A re-iterable dataset of 32-row batches that can fail at a given global batch count."""

    def __init__(self, data, crash_at=None):
        self.data, self.crash_at, self.served = data, crash_at, 0

    def __iter__(self):
        for start in range(0, 256, 32):
            if self.crash_at is not None and self.served == self.crash_at:
                raise Crash()
            self.served += 1
            yield {n: t[start:start + 32] for n, t in self.data.items()}


def test_checkpoint_of_another_config_is_refused_untouched(tmp_path):
    data = make_data()
    Trainer(make_model(), cfg(steps=4, checkpoint_every=2), checkpoint_dir=tmp_path, progress=False).fit(data)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ValueError, match="another config.*lr"):
        Trainer(make_model(), cfg(steps=4, checkpoint_every=2, lr=0.5), checkpoint_dir=tmp_path,
                progress=False).fit(data)
    with pytest.raises(ValueError, match="another config.*n_latents"):
        Trainer(make_model(m=32), cfg(steps=4, checkpoint_every=2), checkpoint_dir=tmp_path, progress=False).fit(data)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate,match", [
    (lambda b: {**b, "b": b["b"][:16]}, "row count"),
    (lambda b: {k: v for k, v in b.items() if k != "c"}, "missing model"),
    (lambda b: {**b, "a": torch.randn(32, 7)}, r"\[N, 6\]"),
    (lambda b: {**b, "c": torch.full((32, 4), float("inf"))}, "NaN/Inf"),
])
def test_bad_batches_raise_before_any_update(mutate, match):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        Trainer(model, cfg(), progress=False).fit([mutate(make_data(n=32))])
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_sources_and_settings():
    model = make_model()
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        Trainer(model, cfg(), progress=False).fit(iter([make_data(n=32)] * 2))
    with pytest.raises(ValueError, match="no batches"):
        Trainer(model, cfg(), progress=False).fit([])
    with pytest.raises(ValueError, match="auxk_k = 512"):
        Trainer(model, TrainConfig(aux="auxk"), progress=False)
    with pytest.raises(ValueError, match="at least 2 rows"):
        Trainer(model, cfg(), progress=False).fit([make_data(n=1)])
    with pytest.raises(ValueError, match="TrainConfig"):
        Trainer(model, {"steps": 3}, progress=False)


# -- planted dictionary --------------------------------------------------------------------------------------
def planted(n=20000, latents=64, active=3, dims=None, seed=0):
    """Two models that see one shared sparse code through their own unit-norm dictionaries."""
    dims = dims or {"a": 24, "b": 32}
    g = torch.Generator().manual_seed(seed)
    atoms = {name: torch.nn.functional.normalize(torch.randn(latents, d, generator=g), dim=1)
             for name, d in dims.items()}
    idx = torch.rand(n, latents, generator=g).argsort(dim=1)[:, :active]
    code = torch.zeros(n, latents).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return atoms, {name: code @ a for name, a in atoms.items()}


def test_planted_shared_dictionary_is_recovered():
    atoms, data = planted()
    torch.manual_seed(0)
    model = UniversalSAE({"a": 24, "b": 32}, 128, 3, "linear")
    c = TrainConfig(steps=800, batch_size=256, lr=1e-2, final_lr=1e-2, warmup_steps=50, log_every=200)
    history = Trainer(model, c, progress=False).fit(data)
    for name, true in atoms.items():
        cos = (true @ model.dictionary(name).detach().T).numpy()
        rows, cols = linear_sum_assignment(-cos)
        matched = cos[rows, cols]
        assert (matched > 0.9).mean() > 0.8, (name, np.round(np.sort(matched), 2))
    r2 = np.array(history.log[-1].r2)
    assert r2.min() > 0.5  # codes from either encoder reconstruct both models


def test_fused_adamw_and_fresh_frozen_dictionaries():
    """The trainer uses torch's fused AdamW; that kernel leaves version counters alone, so the trainer bumps them
    and every frozen dictionary a step decodes with is the current unit-row dictionary (none is stale)."""
    from usae.core.model import normalise_rows

    model = make_model()
    trainer = Trainer(model, cfg(), progress=False)
    assert all(group["fused"] for opt in trainer.optimisers for group in opt.param_groups)
    data, seen = make_data(), []
    original = model.dictionary

    def spy(name, *, frozen=False):
        out = original(name, frozen=frozen)
        if frozen:
            seen.append(torch.equal(out, normalise_rows(model.coder(name).dictionary.detach())))
        return out

    model.dictionary = spy
    for s in range(8):
        trainer.train_step({n: x[32 * s:32 * (s + 1)] for n, x in data.items()})
    assert seen and all(seen)
