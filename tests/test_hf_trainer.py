"""A stock Hugging Face Trainer trains a cosmic_fx.compile'd model: the callback's entries are in its
log history, checkpoints carry the cosmic state, a resumed run ends bit-identical to an uninterrupted
one, save_pretrained round-trips, and bad set-ups are refused with what to change."""

import inspect

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; pip install -e '.[hf]' to run the Trainer tests")
pytest.importorskip("accelerate", reason="accelerate (the Trainer needs it) is not installed; pip install -e '.[hf]'")
transformers.logging.set_verbosity_error()

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402

from cosmic_fx.integrations.hf import CosmicCallback, add_cosmic_callback, from_pretrained  # noqa: E402

VOCAB, WIDTH, LENGTH = 32, 24, 12


class TinyConfig(transformers.PreTrainedConfig):
    model_type = "cosmic_fx_tiny_lm"

    def __init__(self, vocab_size: int = VOCAB, hidden: int = WIDTH, max_positions: int = 64, **kwargs):
        self.vocab_size, self.hidden, self.max_positions = vocab_size, hidden, max_positions
        super().__init__(**kwargs)


class TinyLM(transformers.PreTrainedModel):
    """A two-layer token model with an HF face (config, ModelOutput, save_pretrained). Like HF models it
    does not symbolic-trace (a shape check), so transform takes the module-swap path; it compiles in
    seconds, where GPT-2's dynamo trace takes tens of seconds on 2 cores."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden)
        self.fc = nn.Linear(config.hidden, config.hidden)
        self.head = nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, labels=None, **kwargs):
        if input_ids.shape[-1] > self.config.max_positions:
            raise ValueError("sequence too long")
        logits = self.head(torch.relu(self.fc(self.emb(input_ids))))
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return CausalLMOutput(loss=loss, logits=logits)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        self.x = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


# CDG decides every 2 steps on fresh readings, so the frozen set changes before the checkpoint
CONFIG = CosmicConfig(lower="eager", cdg_patience=1, cdg_interval=2, efficiency_every=1)


def tiny(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyConfig())


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg)


def args(out, **overrides) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, save_steps=2, logging_steps=2, per_device_train_batch_size=4,
                report_to="none", disable_tqdm=True, use_cpu=True)
    return TrainingArguments(**{**base, **overrides})


class Recorder(TrainerCallback):
    """Stands for a reporting callback (TensorBoard, W&B): it keeps every training log it is handed."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def test_trainer_trains_logs_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    # uninterrupted: 4 steps, checkpoints at 2 and 4; the callback first, before a "reporter"
    a = cosmic_fx.compile(tiny(), CONFIG)
    trainer = Trainer(model=a, args=args(tmp_path / "a"), train_dataset=Tokens())
    reporter = Recorder()
    trainer.callback_handler.callbacks.insert(0, reporter)
    add_cosmic_callback(trainer)
    trainer.train()
    rt_a = cosmic_fx.runtime_of(a)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4] and [e["cosmic/steps"] for e in logged] == [2, 4]
    for e in logged:
        assert 0 <= e["cosmic/frozen_share"] < 1 and e["cosmic/graphs_compiled"] >= 1
        assert 0.5 <= e["cosmic/cce_scale_min"] <= e["cosmic/cce_scale_max"] <= 2.0  # CosmicConfig's clamp
        assert -1 < e["cosmic/e_out"] < 1 and e["cosmic/uncompiled_steps"] == 0
        assert "cosmic/prefix_blocks_frozen" not in e  # no prefix mode in this config
    assert logged[-1]["cosmic/freeze_events"] == len(rt_a.freeze_events) >= 1
    assert logged[-1]["cosmic/recompiles"] >= 1  # a freeze changes requires_grad: dynamo recompiles
    assert [r["cosmic/steps"] for r in reporter.logs] == [2, 4]  # a callback before it saw the values too

    # the checkpoint: the model's own keys (no '_orig_mod.'), the QCI weights and the cosmic state
    saved = load_file(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"))
    assert not any(k.startswith("_orig_mod.") for k in saved)
    qci_keys = {k for k in a.state_dict() if k.startswith("cosmic_qci.")}
    assert {k for k in saved if k.startswith("cosmic_qci.")} == qci_keys
    assert int(saved["cosmic_state.steps"]) == 2 and saved["cosmic_state.cdg.frozen"].any()  # frozen at save

    # resumed in a new Trainer, from the model built the same way: bit-identical to the uninterrupted run
    b = cosmic_fx.compile(tiny(), CONFIG)
    resumed = Trainer(model=b, args=args(tmp_path / "b"), train_dataset=Tokens(), callbacks=[CosmicCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert_close(cosmic_fx.runtime_of(b).state_dict(), rt_a.state_dict(), rtol=0, atol=0, equal_nan=True)
    last = [e for e in resumed.state.log_history if "loss" in e][-1]
    assert last["step"] == 4 and last["cosmic/steps"] == 4 and last["loss"] == logged[-1]["loss"]


def test_the_compiled_model_presents_the_forward_signature_to_the_trainer(tmp_path):
    tm = cosmic_fx.transform(gpt2(), CosmicConfig(lower="eager"))
    cm = cosmic_fx.compile(tm)
    assert inspect.signature(cm.forward) == inspect.signature(tm.forward) == inspect.signature(cm)
    trainer = Trainer(model=cm, args=args(tmp_path))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]  # read from the class: evaluate() computes eval_loss


def test_save_pretrained_round_trips_through_from_pretrained(tmp_path):
    from safetensors.torch import load_file

    tm = cosmic_fx.transform(gpt2(), CosmicConfig(lower="eager", qci_init="seed"))
    cm = cosmic_fx.compile(tm)
    rt = cosmic_fx.runtime_of(tm)
    rt.steps = 7  # state that a fresh transform would not have
    Trainer(model=cm, args=args(tmp_path / "run")).save_model(str(tmp_path / "saved"))  # the Trainer's own save
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert "cosmic_state.meta" in saved and "lm_head.weight" not in saved  # tied to wte.weight: saved once

    loaded = from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "saved", lower="eager")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert cosmic_fx.runtime_of(loaded).steps == 7
    mine, theirs = tm.state_dict(), loaded.state_dict()
    assert list(mine) == list(theirs)
    assert_close(theirs, mine, rtol=0, atol=0, equal_nan=True)  # NaN: E(p) readings not taken yet
    # the class's own from_pretrained loads the base model only
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    assert cosmic_fx.transform_info(base) is None
    assert torch.equal(base.transformer.h[0].mlp.c_fc.weight, tm.transformer.h[0].mlp.c_fc.weight)

    plain_dir = tmp_path / "plain"
    base.save_pretrained(str(plain_dir))
    with pytest.raises(ValueError, match=r"holds no cosmic state .* cosmic_fx.transform\(model, config\)"):
        from_pretrained(transformers.GPT2LMHeadModel, plain_dir)


def _fused(**kw):
    return cosmic_fx.compile(tiny(), CosmicConfig(lower="eager", cce_fused_lr=0.1)), kw


BAD = {
    "plain model": (lambda: (tiny(), {}), r"is not a cosmic model .*\n    model = cosmic_fx.compile\(model, "),
    "torch.compile(backend='cosmic') without transform": (
        lambda: (torch.compile(tiny(), backend="cosmic"), {}),
        r"compiled by torch.compile without cosmic_fx.transform .*\n    model = cosmic_fx.compile\(model, "),
    "transformed, not compiled": (
        lambda: (cosmic_fx.transform(tiny(), CONFIG), {}),
        r"transformed by cosmic_fx.transform but not compiled.*\n    model = cosmic_fx.compile\(model\)"),
    "transformed, compiled by torch.compile": (
        lambda: (torch.compile(cosmic_fx.transform(tiny(), CONFIG), backend="cosmic"), {}),
        r"(?s)compiled by torch.compile itself.*model = cosmic_fx.compile\(transformed_model\)"),
    "TrainingArguments(torch_compile=True)": (
        lambda: (cosmic_fx.compile(tiny(), CONFIG), {"torch_compile": True}),
        r"torch_compile=True\) would compile the model a second time"),
    "fused CCE, gradient accumulation": (
        lambda: _fused(gradient_accumulation_steps=2, max_grad_norm=0.0),
        r"TrainingArguments\(gradient_accumulation_steps=2\) cannot be used with CosmicConfig\(cce_fused_lr=0.1\)"),
    "fused CCE, the Trainer's default clipping": (
        lambda: _fused(),
        r"TrainingArguments\(max_grad_norm=1.0\) cannot be used .* Pass TrainingArguments\(max_grad_norm=0\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_setups_are_refused_before_the_first_step(case, tmp_path):
    make, match = BAD[case]
    model, overrides = make()
    trainer = Trainer(model=model, args=args(tmp_path, **overrides), train_dataset=Tokens(),
                      callbacks=[CosmicCallback()])
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    cosmic_fx.detach_hooks(model)


def test_resuming_a_checkpoint_of_another_config_is_an_error(tmp_path):
    saver = cosmic_fx.compile(tiny(), CONFIG)
    Trainer(model=saver, args=args(tmp_path / "a")).save_model(str(tmp_path / "ckpt"))
    other = cosmic_fx.compile(tiny(), CONFIG.replace(cdg_interval=5))
    trainer = Trainer(model=other, args=args(tmp_path / "b"), train_dataset=Tokens(), callbacks=[CosmicCallback()])
    with pytest.raises(RuntimeError,
                       match=r"saved with another CosmicConfig: cdg_interval=2 in the checkpoint vs 5 here"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "ckpt"))


def test_the_example_runs_quick_and_prints_the_comparison(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--quick", "--steps", "4"])
    out = capsys.readouterr().out
    assert [r["arm"] for r in rows] == ["plain (eager)", "cosmic_fx.compile"]
    for r in rows:
        assert r["steps run"] == 4 and 0 < r["eval loss"] < 10 and r["train time (s)"] > 0
        assert f"| {r['arm']}" in out and f"{r['eval loss']:.3f}" in out
    assert rows[1]["cosmic"]["cosmic/steps"] == 4  # the callback's last entry, printed under the table
    assert "cosmic_fx.compile: last CosmicCallback entry: steps=4" in out


def test_gradient_accumulation_counts_optimizer_steps_and_trains_like_the_whole_batch(tmp_path):
    """gradient_accumulation_steps=4 of 4 samples against 1 of 16 (the same samples per step): the
    runtime counts the Trainer's optimizer steps, decides at the same steps, and ends with the same
    parameters (tolerance rtol 1e-4, atol 1e-5: float sums of four partial gradients against one)."""
    runs = {}
    for micro, batch in ((1, 16), (4, 4)):
        model = cosmic_fx.compile(tiny(), CONFIG.replace(lower="aot_eager"))
        trainer = Trainer(model=model, args=args(tmp_path / str(micro), max_steps=4, save_steps=100,
                                                 per_device_train_batch_size=batch,
                                                 gradient_accumulation_steps=micro),
                          train_dataset=Tokens())
        trainer.model_accepts_loss_kwargs = False  # TinyLM takes **kwargs: have the Trainer divide the loss
        add_cosmic_callback(trainer)
        trainer.train()
        rt = cosmic_fx.runtime_of(model)
        logged = [e for e in trainer.state.log_history if "loss" in e]
        assert trainer.state.global_step == rt.steps == 4
        assert [e["cosmic/steps"] for e in logged] == [2, 4]
        runs[micro] = (rt.freeze_events, rt.cdg.low_count, {n: p.detach().clone() for n, p in model.named_parameters()})
        torch._dynamo.reset()
    (events, counts, whole), (micro_events, micro_counts, micro) = runs[1], runs[4]
    assert micro_events == events and len(events) >= 1 and micro_counts == counts
    for n, p in whole.items():
        assert_close(micro[n], p, rtol=1e-4, atol=1e-5, msg=n)
