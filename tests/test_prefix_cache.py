"""``cosmic_fx.PrefixCache``: the frozen prefix's output reused for samples that come back.

Reference: the same run without the cache. With exact entries (``dtype=None``) and the same batches
every epoch the two runs must be equal to the bit, through freeze events; on the steps it serves
from the cache the prefix's modules must not run at all.
"""

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, PrefixCache
from cosmic_fx.models import TinyTransformerLM

from .conftest import mlp_batches, small_mlp


def _config(**kw):
    # a window of 2 steps and a threshold nothing misses: the first blocks freeze at the end of step 3
    return CosmicConfig.off(cdg="prefix", cdg_prefix_window=2, cdg_prefix_threshold=100.0, **kw)


def _lm():
    torch.manual_seed(0)
    return TinyTransformerLM(vocab=24, dim=16, heads=2, layers=3, context=8)


def _lm_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 24, (4, 8), generator=g), torch.randint(0, 24, (4, 8), generator=g)) for _ in range(3)]


def _lm_loss(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, 24), y.reshape(-1))


def _train(make, config, batches, epochs, loss_fn, *, cache_kw=None, compiled=False, keyed=False, count=None):
    tm = cosmic_fx.transform(make(), config)
    run = cosmic_fx.compile(tm) if compiled else tm
    if not compiled:
        cosmic_fx.attach_hooks(tm)
    opt = torch.optim.AdamW(tm.parameters(), lr=0.01)
    cache = PrefixCache(run, **cache_kw) if cache_kw is not None else None
    calls = []
    if count is not None:
        tm.get_submodule(count).register_forward_hook(lambda *a: calls.append(cosmic_fx.runtime_of(tm).steps))
    for _ in range(epochs):
        for b, (x, y) in enumerate(batches):
            keys = [(b, j) for j in range(x.shape[0])] if keyed else None
            out = cache(x, keys=keys) if cache is not None else run(x)
            loss_fn(out, y).backward()
            opt.step()
            opt.zero_grad()
    return tm, cache, calls


@pytest.mark.parametrize("case", ["mlp-eager-keys", "lm-eager-content", "mlp-compiled-content"])
def test_training_with_the_cache_equals_training_without_it(case):
    if case.startswith("mlp"):
        make, config, batches, loss = small_mlp, _config(cdg_prefix_max=0.5, lower="aot_eager"), \
            mlp_batches(4, scale=3), nn.functional.cross_entropy
        count = "0"
    else:
        make, config, batches, loss = _lm, _config(cdg_prefix_max=0.7, lower="aot_eager"), _lm_batches(), _lm_loss
        count = "tok"
    compiled, keyed = case.endswith("compiled-content"), case.endswith("keys")
    if compiled:
        count = None  # a counting hook inside a compiled forward would break its graph
    ref, _, ref_calls = _train(make, config, batches, 5, loss, compiled=compiled, count=count)
    tm, cache, calls = _train(make, config, batches, 5, loss, cache_kw={}, compiled=compiled, keyed=keyed,
                              count=count)
    rt = cosmic_fx.runtime_of(tm)
    assert rt.prefix.length >= 1 and rt.frozen == cosmic_fx.runtime_of(ref).frozen  # a freeze event happened
    for (n, p), q in zip(tm.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    n = len(batches)
    assert cache.hits > 0 and cache.entries == sum(x.shape[0] for x, _ in batches)
    # from the freeze (end of step 3) on, every sample missed once (the n batches after it ran the cut
    # prefix), and hit on every later visit
    bs = batches[0][0].shape[0]
    assert cache.prefix_runs == n and cache.misses == cache.entries
    # one value crosses the cut per sample: the first layer's activation (24 floats), or the residual
    # stream after the frozen blocks (8 positions x 16), the block's last add and activation inside the cut
    assert cache.mib * 2 ** 20 == cache.entries * 4 * (24 if case.startswith("mlp") else 8 * 16)
    assert cache.hits + cache.misses == bs * (5 * n - 4)
    assert cosmic_fx.runtime_of(tm).accounting.uncompiled_steps == 0
    if count is not None:
        # the first block ran on every step without the cache; with it, on the 4 steps before the freeze
        # and the n after it, then never
        assert len(ref_calls) == 5 * n
        assert len(calls) == 4 + n and max(calls) == 4 + n - 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_a_batch_partly_cached_runs_the_prefix_on_its_new_samples_only(compiled):
    """Reshuffled epochs: a batch with cached and new samples runs the frozen prefix on the new ones,
    and the output is the model's, within float rounding (the cached rows came from another batch)."""
    (x, y), (fresh, _) = mlp_batches(2, scale=3)
    tm = cosmic_fx.transform(small_mlp(), _config(cdg_prefix_max=0.5, lower="aot_eager"))
    run = cosmic_fx.compile(tm) if compiled else tm
    if not compiled:
        cosmic_fx.attach_hooks(tm)
    cache = PrefixCache(run)
    opt = torch.optim.SGD(tm.parameters(), lr=0.01)
    for _ in range(5):  # the first block freezes at the end of step 3; step 5 fills the cache with x
        nn.functional.cross_entropy(cache(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert cosmic_fx.runtime_of(tm).prefix.length == 1 and cache.entries == 8
    rows = []
    handle = tm.get_submodule("0").register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    mixed = torch.cat([fresh[:3], x[2:7], fresh[3:5]])  # 5 cached samples among 5 new ones
    before = (cache.hits, cache.misses, cache.prefix_runs)
    out = cache(mixed)
    handle.remove()
    assert (cache.hits - before[0], cache.misses - before[1], cache.prefix_runs - before[2]) == (5, 5, 1)
    assert cache.entries == 13
    if not compiled:
        assert rows == [5]  # the first Linear ran on the five new samples
    torch.testing.assert_close(out, run(mixed))
    assert cache(mixed).shape == out.shape and cache.hits - before[0] == 15  # all ten cached now


def test_a_freeze_event_invalidates_the_entries():
    # three freezable blocks of one each (Linear 6->24, 24->24, 24->16), the output layer last;
    # cdg_prefix_threshold tiny at first, so that freeze events come one at a time when we allow them
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                             nn.Linear(16, 5))

    tm = cosmic_fx.transform(make(), _config(cdg_prefix_max=1.0))
    rt = cosmic_fx.attach_hooks(tm)
    cache = PrefixCache(tm)
    x, y = mlp_batches(1, scale=3)[0]
    opt = torch.optim.SGD(tm.parameters(), lr=0.01)
    lengths = []
    for _ in range(12):
        before = cache.entries
        nn.functional.cross_entropy(cache(x), y).backward()
        opt.step()
        opt.zero_grad()
        lengths.append((rt.prefix.length, before, cache.entries))
    grown = [i for i in range(1, len(lengths)) if lengths[i][0] > lengths[i - 1][0]]
    assert grown, "the prefix should grow at least once after the first freeze"
    # the forward after a growth found an empty cache (cleared), then refilled it
    for i in grown:
        if i + 1 < len(lengths):
            assert lengths[i + 1][1] == 0 and lengths[i + 1][2] == x.shape[0]


def test_the_memory_cap_warns_once_and_training_stays_exact():
    batches = mlp_batches(4, scale=3)
    config = _config(cdg_prefix_max=0.5)
    ref, _, _ = _train(small_mlp, config, batches, 4, nn.functional.cross_entropy)
    row = 24 * 4  # one sample's prefix output: 24 float32 values
    with pytest.warns(RuntimeWarning, match=r"the cap of 0.00\d+ MiB is reached with 12 samples cached; the others "
                                            r"run the frozen prefix every step") as record:
        tm, cache, _ = _train(small_mlp, config, batches, 4, nn.functional.cross_entropy,
                              cache_kw=dict(max_mib=12.5 * row / 2 ** 20))
    assert sum("the cap of" in str(w.message) for w in record) == 1
    assert cache.entries == 12 and cache.mib * 2 ** 20 == 12 * row
    for p, q in zip(tm.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_bfloat16_entries_take_half_the_memory():
    batches = mlp_batches(4, scale=3)
    _, exact, _ = _train(small_mlp, _config(cdg_prefix_max=0.5), batches, 3, nn.functional.cross_entropy,
                         cache_kw={})
    _, half, _ = _train(small_mlp, _config(cdg_prefix_max=0.5), batches, 3, nn.functional.cross_entropy,
                        cache_kw=dict(dtype=torch.bfloat16))
    assert exact.entries == half.entries == 32 and half.mib * 2 == exact.mib


def test_dropout_in_the_freezable_blocks_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Dropout(0.1), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    # blocks 0 and 3 may both freeze: the dropout between them is before the end of the prefix
    tm = cosmic_fx.transform(model, _config(cdg_prefix_max=1.0))
    with pytest.raises(ValueError, match=r"the blocks that prefix CDG may freeze hold 1 \(Dropout, p=0.1, training "
                                         r"mode\): their output differs from one visit of a sample to the next"):
        PrefixCache(tm)
    # only block 0 may freeze: the dropout runs after the cut, on the cached output, every step
    PrefixCache(cosmic_fx.transform(model, _config(cdg_prefix_max=0.5)))
    tm.eval()  # in eval mode dropout does nothing: nothing to refuse
    PrefixCache(tm)


def test_a_sample_that_comes_back_changed_turns_the_cache_off():
    tm = cosmic_fx.transform(small_mlp(), _config(cdg_prefix_max=0.5))
    cosmic_fx.attach_hooks(tm)
    cache = PrefixCache(tm)
    opt = torch.optim.SGD(tm.parameters(), lr=0.01)
    x, y = mlp_batches(1, scale=3)[0]
    keys = list(range(8))
    for step in range(8):
        jitter = x + 0.01 * step if step >= 6 else x  # "augmentation" from step 6 on, same keys
        if step == 6:
            with pytest.warns(RuntimeWarning, match=r"sample key 0 came back with another input \(random "
                                                    r"augmentation, or keys that do not name samples\)"):
                out = cache(jitter, keys=keys)
            assert torch.equal(out, tm(jitter))  # the model as it is
        else:
            out = cache(jitter, keys=keys)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
    assert cache.entries == 0 and "off:" in repr(cache)


def test_bad_arguments_are_refused():
    tm = cosmic_fx.transform(small_mlp(), _config())
    with pytest.raises(ValueError, match=r"max_mib must be a finite number of MiB > 0; got 0"):
        PrefixCache(tm, max_mib=0)
    with pytest.raises(ValueError, match=r"dtype must be None \(exact\), torch.bfloat16 or torch.float16; got "
                                         r"torch.float64"):
        PrefixCache(tm, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"needs a model from cosmic_fx.transform or cosmic_fx.compile"):
        PrefixCache(small_mlp())
    with pytest.raises(ValueError, match=r"caches the prefix that cdg='prefix' freezes; this model's config has "
                                         r"cdg='calibrated'"):
        PrefixCache(cosmic_fx.transform(small_mlp(), CosmicConfig.off(cdg="calibrated")))
    cosmic_fx.attach_hooks(tm)
    cache = PrefixCache(tm)
    rt = cosmic_fx.runtime_of(tm)
    x, _ = mlp_batches(1, scale=3)[0]
    rt.prefix.advance(1, 0)  # as a freeze event would
    with pytest.raises(ValueError, match=r"3 keys for a batch of 8 samples; give one key per sample"):
        cache(x, keys=[1, 2, 3])


@pytest.mark.slow  # four compiled runs (before/after the freeze, with/without the cache): ~10-18 s here
def test_the_fast_preset_with_a_fused_optimizer_and_the_cache_equals_it_without_the_cache():
    """The whole fast path: cosmic_fx.compile(fast), the user's AdamW and StepLR fused into the compiled
    backward, the cache over the frozen prefix (the suffix its own compiled graph)."""
    cfg = CosmicConfig.fast(lower="aot_eager", cdg_prefix_window=2, cdg_prefix_threshold=100.0, cdg_prefix_max=0.5)
    results = []
    for use in (False, True):
        cm = cosmic_fx.compile(small_mlp(), cfg)
        opt = torch.optim.AdamW(cm.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
        fopt = cosmic_fx.fused_optimizer(cm, opt)
        cache = PrefixCache(cm) if use else None
        for _ in range(5):
            for x, y in mlp_batches(4, scale=3):
                fopt.backward(nn.functional.cross_entropy(cache(x) if use else cm(x), y))
                fopt.step()
                sched.step()
        results.append(list(cm.parameters()))
    assert cosmic_fx.runtime_of(cm).prefix.length == 1 and cache.hits > 0
    for p, q in zip(*results):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64,
                                   torch.complex128, torch.int64, torch.int32, torch.uint8, torch.bool])
def test_content_keys_tell_rows_apart_by_their_bits(dtype):
    """Equal rows share a key; a row that differs in one value, in two sign bits of 64-bit values (which a
    64-bit linear form with odd weights would cancel) or only in the sign of a zero gets another."""
    from cosmic_fx.prefix_cache import content_keys

    a = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    a[0, 0] = 0
    a[1] = a[0]
    a[2] = a[0]
    a[2, 0] = 1
    k = content_keys([a])
    assert k[0] == k[1] and k[0] != k[2]
    if dtype.is_floating_point or dtype.is_complex:
        b = a.clone()
        b[0, 1], b[0, 2] = -b[0, 1], -b[0, 2]
        assert content_keys([b])[0] != k[0]
        z = torch.zeros(2, 4, dtype=dtype)
        z[1, :2] = -0.0
        assert len(set(content_keys([z]))) == 2
