"""Wrapper (peft-style base_layer delegation) vs forward hook, on T5, ViT, GPT-2, nn.TransformerEncoder.

Produced: docs/module_swap.md, "Module swap: forward hooks, not wrappers" (the wrapper-vs-hook
comparison and its table).

The measurement behind cosmic_fx's module-swap mechanism (docs/module_swap.md). Run from the repo:
    .venv/bin/python benchmarks/experiments/module_swap_experiment.py
It prints one dict per (model, mechanism): QCIs inserted, QCIs that ran in a training forward and in an
eval forward under no_grad, identity at init, state_dict keys kept, tie_weights(), graphs/graph breaks
under torch.compile (a counting backend), generate().
"""
import copy, warnings, torch, time
from torch import nn
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from cosmic_fx.modules import QuantumClassicalInterface as QCI
import transformers
transformers.logging.set_verbosity_error()
from transformers import (GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration,
                          ViTConfig, ViTForImageClassification)

def is_conv1d(m):
    return type(m).__name__ == "Conv1D"

def width(m):
    if isinstance(m, nn.Linear): return m.out_features, -1
    if isinstance(m, nn.Conv2d): return m.out_channels, -3
    if is_conv1d(m): return m.weight.shape[1], -1
    return None

class Wrapper(nn.Module):
    def __init__(self, base, qci):
        super().__init__(); self.base_layer = base; self.qci = qci
    def __getattr__(self, name):
        try: return super().__getattr__(name)
        except AttributeError: return getattr(self.base_layer, name)
    def forward(self, *a, **k): return self.qci(self.base_layer(*a, **k))

class Hook:
    def __init__(self, qci): self.qci = qci
    def __call__(self, m, a, out):
        if isinstance(out, tuple): return (self.qci(out[0]),) + out[1:]
        return self.qci(out)

CALLS = [0]
class CountingQCI(QCI):
    def forward(self, x):
        CALLS[0] += 1; return super().forward(x)

def structural_copy(model):
    memo = {id(t): t for t in model.parameters()}; memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)

def apply(model, how):
    out = structural_copy(model)
    n = 0
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and how == "hook":
            w = m.embed_dim
            m.register_forward_hook(Hook(CountingQCI(w, feature_dim=-1))); n += 1; continue
        wd = width(m)
        if wd is None or wd[0] <= 10: continue
        if how == "hook" and isinstance(m, nn.Linear) and name.endswith("out_proj"):
            continue  # applied on the MHA's output
        qci = CountingQCI(wd[0], feature_dim=wd[1])
        if how == "wrapper":
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, Wrapper(m, qci))
        else:
            m.register_forward_hook(Hook(qci))
        n += 1
    return out, n

def cases():
    torch.manual_seed(0)
    g = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (2, 8))
    yield "GPT-2", GPT2LMHeadModel(g), dict(input_ids=ids, labels=ids), ids
    t = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                 pad_token_id=0, eos_token_id=1)
    yield "T5", T5ForConditionalGeneration(t), dict(input_ids=ids, labels=ids), ids
    v = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, num_labels=5)
    x = torch.rand(2, 3, 16, 16)
    yield "ViT", ViTForImageClassification(v), dict(pixel_values=x, labels=torch.tensor([1, 2])), None
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2)
    yield "nn.TransformerEncoder", enc, dict(src=torch.randn(2, 8, 32)), None

def run(model, kwargs):
    torch.manual_seed(123)
    out = model(**kwargs)
    return out

def main():
    for name, model, kwargs, gen_ids in cases():
      model.train()
      ref = run(model, kwargs)
      for how in ("wrapper", "hook"):
          row = {"model": name, "how": how}
          try:
              tm, n = apply(model, how)
              row["qcis"] = n
              CALLS[0] = 0
              out = run(tm, kwargs)
              row["forward"] = "ok"
              row["qcis_run"] = CALLS[0]
              a = ref.logits if hasattr(ref, "logits") else ref
              b = out.logits if hasattr(out, "logits") else out
              row["identity"] = bool(torch.equal(a, b))
              keys = set(tm.state_dict()) - set(model.state_dict())
              row["orig_keys_kept"] = set(model.state_dict()) <= set(tm.state_dict())
              (out.loss if hasattr(out, "loss") and out.loss is not None else b.pow(2).mean()).backward()
              row["backward"] = "ok"
              tm.eval()
              with torch.no_grad():
                  CALLS[0] = 0; run(tm, kwargs); row["qcis_run_eval_nograd"] = CALLS[0]
              tm.train()
              if getattr(tm, "get_output_embeddings", lambda: None)() is not None:
                  tm.tie_weights()
                  row["tied_after_tie_weights"] = tm.get_output_embeddings().weight is tm.get_input_embeddings().weight
              torch._dynamo.reset()
              from torch._dynamo.utils import counters
              counters.clear()
              graphs = []
              def count(gm, ex):
                  graphs.append(gm); return gm.forward
              c = torch.compile(tm, backend=count)
              o = c(**kwargs)
              row["compiled_graphs"] = len(graphs)
              row["graph_breaks"] = sum(counters["graph_break"].values())
              if gen_ids is not None:
                  tm.generate(gen_ids[:1], max_new_tokens=3, do_sample=False); row["generate"] = "ok"
              if getattr(tm, "get_output_embeddings", lambda: None)() is not None:
                  row["output_emb_isinstance_Linear"] = isinstance(tm.get_output_embeddings(), nn.Linear)
          except Exception as e:
              row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
          print(row, flush=True)

if __name__ == '__main__':
    main()
