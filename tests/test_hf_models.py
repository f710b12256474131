"""Hugging Face models built from tiny configs (no download): every linear-like layer gets its QCI,
the model stays an instance of its class with its output types, and it trains with cosmic_fx.compile."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, QuantumClassicalInterface

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg)


def t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def ids(batch=2, length=8):
    return torch.randint(2, 64, (batch, length))


# name -> (factory, inputs with labels, output class name)
CASES = {
    "gpt2": (gpt2, lambda: {"input_ids": (x := ids()), "labels": x}, "CausalLMOutputWithCrossAttentions"),
    "t5": (t5, lambda: {"input_ids": ids(), "labels": ids()}, "Seq2SeqLMOutput"),
    "vit": (vit, lambda: {"pixel_values": torch.rand(2, 3, 16, 16), "labels": torch.tensor([1, 4])},
            "ImageClassifierOutput"),
    "bert": (bert, lambda: {"input_ids": ids(), "labels": torch.tensor([0, 2])}, "SequenceClassifierOutput"),
}


def linear_like(model):
    """Names of the Linear / Conv2d / HF Conv1D layers, from the module tree (not from cosmic_fx)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_wide_layer_gets_a_qci_and_outputs_are_unchanged(name):
    factory, make_inputs, output_type = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    inputs = make_inputs()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none"))
    info = cosmic_fx.transform_info(tm)
    assert type(tm) is type(model) and info.path == "module_swap"
    layers = linear_like(model)
    assert [s.name for s in info.sites] == layers
    wide = [s.name for s in info.sites if s.width > 10]
    assert info.rewritten == wide and len(wide) >= len(layers) - 1  # only a narrow classifier is left out
    assert sum(isinstance(m, QuantumClassicalInterface) for m in tm.modules()) == len(wide)
    with torch.no_grad():
        ref, out = model(**inputs), tm(**inputs)
    assert type(out).__name__ == output_type and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    keys = list(model.state_dict())
    assert list(tm.state_dict())[: len(keys)] == keys
    added = {k for k in set(tm.state_dict()) - set(keys) if not k.startswith("cosmic_state.")}  # runtime state
    assert added == {f"cosmic_qci.{n}.{p}" for n in wide for p in ("beta", "weight", "bias")}


def test_gpt2_keeps_its_class_config_and_generate():
    torch.manual_seed(0)
    model = gpt2().eval()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="none"))
    assert isinstance(tm, transformers.GPT2LMHeadModel) and tm.config.n_embd == 32
    assert tm.get_output_embeddings() is tm.lm_head and isinstance(tm.lm_head, nn.Linear)
    assert tm.lm_head.weight is model.transformer.wte.weight  # weights tied and shared with the model
    prompt = ids(1, 4)
    generated = tm.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=4, do_sample=False))  # identity init


def test_csc_on_a_model_output_keeps_its_type_and_the_loss_sees_it():
    torch.manual_seed(0)
    model = bert().eval()
    inputs = CASES["bert"][1]()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="output", csc_alpha=0.3))
    with torch.no_grad():
        ref, out = model(**inputs), tm(**inputs)
    assert type(out) is type(ref)
    assert_close(out.logits, cosmic_fx.cosmic_state_compression(ref.logits, 0.3))
    # CSC acts on the classifier's output, before the model computes its loss from it
    assert_close(out.loss, nn.functional.cross_entropy(out.logits, inputs["labels"]))
    assert torch.equal(out["logits"], out.logits) and out.to_tuple()[1] is out.logits


def test_explain_an_hf_model():
    torch.manual_seed(0)
    model = gpt2()
    report = cosmic_fx.explain(model, ids(2, 6))
    assert report.path == "module_swap" and [s.name for s in report.sites] == linear_like(model)
    assert all(row.inserted == [f"cosmic_qci.{row.name}"] and row.output_shape is not None for row in report.sites)
    assert ("cosmic_qci_transformer_h_0_attn_c_attn = "
            "self.cosmic_qci.transformer.h.0.attn.c_attn(transformer_h_0_attn_c_attn)") in report.graph_after


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_with_cosmic_compile(name):
    factory, make_inputs, output_type = CASES[name]
    torch.manual_seed(0)
    model = factory().train()
    inputs = make_inputs()
    model(**inputs)  # HF fills config.problem_type and warns once on a first call: keep that out of the graphs
    compiled = cosmic_fx.compile(model, CosmicConfig(lower="aot_eager"))
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        out = compiled(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert type(out).__name__ == output_type
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    cosmic_fx.detach_hooks(compiled)


@pytest.mark.slow
def test_gpt2_pt2_export_round_trip(tmp_path):
    torch.manual_seed(0)
    tm = cosmic_fx.transform(gpt2(), CosmicConfig()).eval()
    x = ids(2, 8)
    path = cosmic_fx.export(tm, (x,), tmp_path / "gpt2.pt2", dynamic_batch=False)
    program = torch.export.load(path)
    with torch.no_grad():
        assert_close(program.module()(x).logits if hasattr(program.module()(x), "logits") else program.module()(x)[0],
                     tm(x).logits)
