"""Prefix CDG (``cdg="prefix"``) and the ``fast`` preset: blocks in forward order, monotone freezing
from the input side, never the output layer, no autograd work for the frozen prefix, bounded
recompiles, checkpoints, bad input and ``explain``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, policy
from cosmic_fx.backend import add_listener


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class TinyLM(nn.Module):
    """Embedding + positional parameter, 3 blocks, final norm, head: the shape of a char LM."""

    def __init__(self, vocab: int = 20, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class UntraceableLM(TinyLM):
    """The same model with data-dependent control flow: transform takes the module-swap path."""

    def forward(self, ids):
        if bool(ids.sum() >= 0):
            return super().forward(ids)
        raise AssertionError("unreachable")


BLOCKS = ["tok+pos+blocks.0", "blocks.1", "blocks.2"]
IDS = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))


def lm(cls=TinyLM, n: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return cls(n=n)


def fast(**kw) -> CosmicConfig:
    """Prefix CDG that decides within a few steps: window 2, any change counts as settled. The gradient
    signal (the preset's is the weight drift, tests/test_prefix_signal.py): it reads every step, so the
    events here come at steps these tests can name."""
    return CosmicConfig.fast(**{"cdg_prefix_window": 2, "cdg_prefix_threshold": 1e9, "lower": "aot_eager",
                                "qci": True, "qci_min_width": 0, "cdg_prefix_max": 0.75, "cdg_prefix_signal": "grad",
                                **kw})


def train(run, tm, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(run(IDS).flatten(0, 1), IDS.roll(1, 1).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ------------------------------------------------------------------ pure decisions
def test_prefix_units_merge_blockless_params_stop_at_the_output_layer_and_follow_first_use():
    blocks = {"emb": "emb", "b0": "b0", "q0": None, "norm": "norm", "b1": "b1", "head": "head", "late": "late"}
    units = policy.prefix_units(["emb", "b0", "q0", "norm", "b1", "head", "late"], blocks, {"b0", "b1", "head"},
                                {"head"})
    assert [(u.name, u.params) for u in units] == [("emb+b0", ("emb", "b0", "q0")), ("norm+b1", ("norm", "b1"))]
    # order of first use decides, not the order of the mapping
    units = policy.prefix_units(["b1", "b0", "head"], blocks, {"b0", "b1", "head"}, {"head"})
    assert [u.name for u in units] == ["b1", "b0"]
    # a tied embedding is in the output layer: nothing may freeze
    assert policy.prefix_units(["emb", "b0", "head"], blocks, {"b0", "head"}, {"emb", "head"}) == []


@pytest.mark.parametrize("n_frozen,changes,events,since,want", [
    (0, [0.01, 0.01, 0.01, 0.01], 0, None, 3),   # cap: floor(0.75 * 4) = 3
    (0, [0.01, 0.5, 0.01], 0, None, 1),          # stops at the first block that has not settled
    (0, [None, 0.01], 0, None, 0),               # undecided first block: nothing
    (1, [0.01, 0.01], 1, 5, 1),                  # within a window of the last event
    (1, [0.01, 0.01], 1, 10, 3),
    (1, [0.01, 0.01], 4, 10, 1),                 # cdg_max_sets = 4 events used
    (3, [0.01], 3, 10, 3),                       # cap reached
])
def test_prefix_decision_is_monotone_and_bounded(n_frozen, changes, events, since, want):
    cfg = CosmicConfig(cdg="prefix", cdg_prefix_window=10, cdg_prefix_threshold=0.05, cdg_max_sets=4)
    length, reason = policy.prefix_decision(n_frozen, changes, 4, events, since, cfg)
    assert length == want and length >= n_frozen and reason


def test_settle_change_reads_two_full_windows():
    assert policy.settle_change([1.0, 1.0, 2.0], 2) is None
    assert policy.settle_change([9.0, 1.0, 1.0, 2.0, 2.0], 2) == pytest.approx(1.0)
    assert policy.settle_change([1.0, float("nan"), 1.0, 1.0], 2) is None
    assert policy.settle_change([0.0, 0.0, 1.0, 1.0], 2) is None


# ------------------------------------------------------------------ blocks of a real model
@pytest.mark.parametrize("cls,path", [(TinyLM, "symbolic_trace"), (UntraceableLM, "module_swap")])
def test_blocks_start_at_the_input_and_exclude_the_output_layer(cls, path):
    tm = cosmic_fx.transform(lm(cls), fast())
    assert cosmic_fx.transform_info(tm).path == path
    rt = cosmic_fx.runtime_of(tm)
    if path == "module_swap":
        assert rt.prefix_units == []  # known at the first forward
        cosmic_fx.attach_hooks(tm)
        tm(IDS)
    units = rt.prefix_units
    assert [name for name, _ in units] == BLOCKS
    first = set(units[0][1])
    assert {"tok.weight", "pos", "cosmic_qci.blocks.0.fc1.scale"} <= first
    frozen_any = {n for _, names in units for n in names}
    assert not frozen_any & set(rt.protected) and "head.weight" in rt.protected


# ------------------------------------------------------------------ behaviour while training
@pytest.fixture
def one_per_event(monkeypatch):
    """Every block settles at once with these settings; letting the decision see the next block's
    change only makes one freeze event per block."""
    decide = policy.prefix_decision
    monkeypatch.setattr(policy, "prefix_decision", lambda n, changes, *rest: decide(n, changes[:1], *rest))


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_freezing_is_monotone_never_touches_the_output_layer_and_recompiles_once_per_event(engine, one_per_event):
    """Eager: transform + attach_hooks (the order from the traced graph). Compiled: a plain model through
    the entry point with ``options={"preset": "fast", ...}`` (the order from the graph dynamo hands the
    backend). A small graph keeps the compiles short: 2 blocks, no QCI/CSC."""
    options = {"preset": "fast", "cdg_prefix_window": 2, "cdg_prefix_threshold": 1e9, "cdg_prefix_max": 1.0,
               "qci": False, "csc": "none", "lower": "aot_eager", "cdg_prefix_signal": "grad"}
    graphs = []
    handle = add_listener(graphs.append)
    try:
        if engine == "eager":
            tm = cosmic_fx.transform(lm(n=2), CosmicConfig.from_options(options))
            run = tm
            cosmic_fx.attach_hooks(tm)
        else:
            torch._dynamo.reset()
            tm = lm(n=2)
            run = torch.compile(tm, backend="cosmic", options=options)
        train(run, tm, 10)
    finally:
        handle.remove()
    rt = cosmic_fx.runtime_of(tm)
    assert rt.config == CosmicConfig.from_options(options)
    events = [set(names) for _, names in rt.freeze_events]
    units = [set(names) for _, names in rt.prefix_units]
    assert [name for name, _ in rt.prefix_units] == ["tok+pos+blocks.0", "blocks.1"]
    # window 2: an event after steps 4 and 8 (two full windows of readings since the last one)
    assert [s for s, _ in rt.freeze_events] == [4, 8]
    assert events == [units[0], units[0] | units[1]]
    for a, b in zip(events, events[1:]):
        assert a < b
    named = dict(tm.named_parameters())
    assert "head.weight" in rt.protected and all(named[n].requires_grad for n in rt.protected)
    assert sorted(n for n, p in named.items() if not p.requires_grad) == sorted(events[-1])
    assert all(named[n].grad is None for n in events[-1])
    if engine == "compile":
        assert len(graphs) == 1 + len(events)  # the first graph, then one per freeze event
        assert rt.uncompiled_steps == 0


def _saved_tensors(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return count, out


def test_the_frozen_prefix_records_no_autograd_work():
    """After the first two blocks (and the embedding) freeze, a training forward saves exactly the
    tensors of the trainable suffix run on a detached input, and the graph reaches no prefix parameter."""
    tm = cosmic_fx.transform(lm(), fast(qci=False, csc="none", cce="off", cdg_max_sets=1))
    cosmic_fx.attach_hooks(tm)
    full, _ = _saved_tensors(lambda: tm(IDS))
    train(tm, tm, 4)
    rt = cosmic_fx.runtime_of(tm)
    assert rt.prefix.length == 2 and len(rt.freeze_events) == 1
    frozen, out = _saved_tensors(lambda: tm(IDS))

    def suffix():
        with torch.no_grad():
            x = tm.tok(IDS) + tm.pos[: IDS.shape[1]]
            x = tm.blocks[1](tm.blocks[0](x))
        return tm.head(tm.ln_f(tm.blocks[2](x)))

    reference, _ = _saved_tensors(suffix)
    assert frozen == reference < full
    reached, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in reached:
            continue
        reached.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    leaves = {id(fn.variable) for fn in reached if type(fn).__name__ == "AccumulateGrad"}
    named = dict(tm.named_parameters())
    frozen_names = {n for _, names in rt.prefix_units[:2] for n in names}
    assert not any(id(named[n]) in leaves for n in frozen_names)
    assert id(tm.blocks[2].fc1.weight) in leaves


def test_prefix_state_round_trips_and_resumes_identically(one_per_event):
    """Stop mid-window (readings in the history), save, load into a fresh transform, continue both:
    the same freeze events and bit-identical parameters."""
    cfg = fast(cdg_prefix_window=3, cdg_prefix_max=1.0)
    a = cosmic_fx.transform(lm(), cfg)
    cosmic_fx.attach_hooks(a)
    train(a, a, 9)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    ra = cosmic_fx.runtime_of(a)
    assert ra.prefix.length == 1 and any(ra.prefix.history)
    b = cosmic_fx.transform(lm(), cfg)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)  # different weights: the load must restore them
    b.load_state_dict(state)
    rb = cosmic_fx.runtime_of(b)
    assert rb.prefix.history == ra.prefix.history and rb.prefix.length == 1
    assert rb.prefix_units == ra.prefix_units and rb.freeze_events == ra.freeze_events
    assert [n for n, p in b.named_parameters() if not p.requires_grad] == \
        [n for n, p in a.named_parameters() if not p.requires_grad]
    cosmic_fx.attach_hooks(b)
    torch.manual_seed(1)
    train(a, a, 8)
    train(b, b, 8)
    assert ra.freeze_events == rb.freeze_events and len(ra.freeze_events) == 2
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------ bad input and explain
def test_a_model_without_sites_is_refused_with_the_reason():
    class NoSites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, ids):
            return self.norm(self.emb(ids))

    with pytest.raises(ValueError, match=r"cdg='prefix' freezes NoSites block by block .* it has no site"):
        cosmic_fx.attach_hooks(NoSites(), CosmicConfig(cdg="prefix"))


def test_freeze_prefix_grows_only_and_says_what_is_allowed():
    tm = cosmic_fx.transform(lm(), fast())
    rt = cosmic_fx.runtime_of(tm)
    rt.freeze_prefix(2)
    assert rt.prefix.length == 2 and not tm.blocks[1].fc1.weight.requires_grad and tm.blocks[2].fc1.weight.requires_grad
    with pytest.raises(ValueError, match=r"length must be an int from 2 \(frozen now; the prefix never shrinks\) to 3"):
        rt.freeze_prefix(1)
    with pytest.raises(ValueError, match=r"to 3 \(the freezable blocks\); got 4"):
        rt.freeze_prefix(4)
    other = cosmic_fx.runtime_of(cosmic_fx.transform(lm(), CosmicConfig(lower="aot_eager")))
    with pytest.raises(ValueError,
                       match="freeze_prefix needs cdg='prefix'; this runtime's config has cdg='calibrated'"):
        other.freeze_prefix(1)


def test_freezing_a_block_with_batchnorm_in_training_mode_says_its_statistics_keep_updating():
    """A frozen weight does not stop BatchNorm's running statistics: the freeze event that takes such a
    block says so (once per model), and names the layers; in eval mode there is nothing to say."""
    def convnet() -> nn.Sequential:
        torch.manual_seed(0)
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
        return nn.Sequential(block(1, 4), block(4, 4), block(4, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    tm = cosmic_fx.transform(convnet(), fast())
    rt = cosmic_fx.runtime_of(tm)
    assert [u.name for u in rt.prefix.units] == ["0.0", "0.1+1.0", "1.1+2.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.freeze_prefix(1)  # a convolution alone
    with pytest.warns(UserWarning, match=r"froze blocks that hold BatchNorm layers in training mode \(0\.1\): "
                                         r"their weights are frozen, but their running statistics keep updating"):
        rt.freeze_prefix(2)
    mean = tm.get_submodule("0.1").running_mean.clone()
    tm(torch.randn(2, 1, 8, 8) + 3.0)
    assert not torch.equal(mean, tm.get_submodule("0.1").running_mean)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.freeze_prefix(3)  # once per model
        quiet = cosmic_fx.transform(convnet(), fast()).eval()
        cosmic_fx.runtime_of(quiet).freeze_prefix(3)


def test_an_unknown_forward_order_warns_and_freezes_nothing():
    """A compiled run whose graphs never show the whole forward (graph breaks on a model that does not
    trace): stood in for by activating the runtime in compiled mode and running eagerly."""
    tm = cosmic_fx.transform(lm(UntraceableLM), fast())
    rt = cosmic_fx.runtime_of(tm)
    rt.activate("compiled")
    with pytest.warns(RuntimeWarning, match="cdg='prefix' does not know the order .* freezes nothing"):
        train(tm, tm, 1)
    train(tm, tm, 6)
    assert rt.prefix_units == [] and rt.frozen == [] and "not known" in rt.last_step["prefix"]


def test_explain_shows_the_blocks_and_what_would_freeze_now():
    report = cosmic_fx.explain(lm(), IDS, fast())
    assert [b for b, _ in report.prefix.blocks] == BLOCKS
    assert report.prefix.would_freeze == 0 and "undecided" in report.prefix.reason
    assert "would freeze now: nothing" in str(report)
    rows = {r.name: r.cdg for r in report.params}
    assert rows["head.weight"] == "output layer (never frozen)" and rows["tok.weight"] == "block 0 (tok+pos+blocks.0)"
    # a transformed model that has trained: its own readings and frozen prefix
    tm = cosmic_fx.transform(lm(), fast(cdg_prefix_window=3, cdg_prefix_threshold=1e-12))
    cosmic_fx.attach_hooks(tm)
    train(tm, tm, 6)
    report = cosmic_fx.explain(tm, IDS)
    assert report.prefix.frozen == report.prefix.would_freeze == 0
    assert report.prefix.reason.startswith("no block settled (change < 1e-12): block 0 has not (change ")
    tm = cosmic_fx.transform(lm(), fast(cdg_prefix_window=3))
    cosmic_fx.attach_hooks(tm)
    train(tm, tm, 6)
    report = cosmic_fx.explain(tm, IDS)
    assert report.prefix.frozen == report.prefix.would_freeze == 2
    assert report.prefix.reason.startswith("the cap is reached: 2 of 3 blocks frozen")
    rows = {r.name: r.cdg for r in report.params}
    assert rows["tok.weight"] == rows["blocks.1.fc1.weight"] == "frozen"
    assert rows["blocks.2.fc1.weight"].startswith("block 2")
