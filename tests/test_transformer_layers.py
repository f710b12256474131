"""torch's own nn.TransformerEncoder / nn.Transformer: their Linear layers and MultiheadAttention
out_proj get QCIs (the packed in_proj cannot, and explain says so), in training and in the eval
fast path alike, and the models train with cosmic_fx.compile."""

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, QuantumClassicalInterface


def encoder():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                 enable_nested_tensor=False)


def transformer():
    return nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)


# name -> (factory, inputs, expected rewritten sites, expected sites that cannot be rewritten)
CASES = {
    "encoder": (encoder, lambda: (torch.rand(2, 5, 16),),
                [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.out_proj", "linear1", "linear2")],
                [f"layers.{i}.self_attn.in_proj_weight" for i in range(2)]),
    "transformer": (transformer, lambda: (torch.rand(2, 5, 16), torch.rand(2, 4, 16)),
                    ["encoder.layers.0.self_attn.out_proj", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
                     "decoder.layers.0.self_attn.out_proj", "decoder.layers.0.multihead_attn.out_proj",
                     "decoder.layers.0.linear1", "decoder.layers.0.linear2"],
                    ["encoder.layers.0.self_attn.in_proj_weight", "decoder.layers.0.self_attn.in_proj_weight",
                     "decoder.layers.0.multihead_attn.in_proj_weight"]),
}


def count_qci_calls(model):
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
               if isinstance(m, QuantumClassicalInterface)]
    return calls, handles


@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_and_mha_sites_get_qcis_in_training_and_in_the_eval_fast_path(name):
    factory, make_inputs, rewritten, blocked = CASES[name]
    torch.manual_seed(0)
    model = factory()
    inputs = make_inputs()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none", qci_init="seed"))
    info = cosmic_fx.transform_info(tm)
    assert info.path == "module_swap" and type(tm) is type(model)
    assert sorted(info.rewritten) == sorted(rewritten)
    assert sorted(s.name for s in info.sites if s.reason.startswith("not rewritable")) == sorted(blocked)
    calls, handles = count_qci_calls(tm)
    train_out = tm.train()(*inputs)
    assert len(calls) == len(rewritten)
    with torch.no_grad():
        eval_out = tm.eval()(*inputs)  # TransformerEncoderLayer's fused fast path would skip the layers
    assert len(calls) == 2 * len(rewritten)
    torch.testing.assert_close(eval_out, train_out.detach())  # dropout 0: the same function in both modes
    for h in handles:
        h.remove()
    with torch.no_grad():
        identity = cosmic_fx.transform(model.eval(), CosmicConfig(csc="none"))
        assert torch.equal(identity(*inputs), model(*inputs))


def test_explain_says_what_was_not_rewritten():
    torch.manual_seed(0)
    report = cosmic_fx.explain(encoder(), torch.rand(2, 5, 16))
    rows = {r.name: r for r in report.sites}
    assert rows["layers.0.self_attn.out_proj"].inserted == ["cosmic_qci.layers.0.self_attn.out_proj"]
    assert rows["layers.0.self_attn.out_proj"].output_shape == (2, 5, 16)
    blocked = rows["layers.0.self_attn.in_proj_weight"]
    assert blocked.inserted == [] and "F.multi_head_attention_forward" in blocked.reason
    assert "not rewritable" in str(report)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_with_cosmic_compile(name):
    factory, make_inputs, _, _ = CASES[name]
    torch.manual_seed(0)
    model = factory()
    compiled = cosmic_fx.compile(model, CosmicConfig(lower="aot_eager"))
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    inputs = make_inputs()
    target = torch.rand_like(model(*inputs))
    losses = []
    for _ in range(3):
        out = compiled(*inputs)
        loss = (out - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert isinstance(out, torch.Tensor) and losses[-1] < losses[0], losses
    cosmic_fx.detach_hooks(compiled)
