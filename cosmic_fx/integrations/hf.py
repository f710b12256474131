"""cosmic_fx with the Hugging Face ``Trainer``: what CDG/CCE did, in the Trainer's logs; bad set-ups
refused before the first step; transformed checkpoints loaded back.

The working path is a stock ``Trainer`` given the model that :func:`cosmic_fx.compile` returns, with
the Trainer's own ``torch_compile`` left off::

    model = cosmic_fx.compile(model, cosmic_fx.CosmicConfig())
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out"), train_dataset=ds,
                      callbacks=[CosmicCallback()])
    trainer.train()                                   # checkpoints carry the cosmic state
    trainer.train(resume_from_checkpoint=True)        # continues the same run

``TrainingArguments(torch_compile_backend="cosmic")`` cannot work: accelerate checks the name against
its fixed ``DynamoBackend`` enum (``ValueError: 'COSMIC' is not a valid DynamoBackend``), and a backend
alone could not give the model its QCI parameters anyway (``cosmic_fx.transform`` must, before
compiling). The compiled model answers like the model (:mod:`cosmic_fx.compiled`): the Trainer reads the
model's forward signature, saves ``model.safetensors`` with the model's own keys (the QCI weights
``cosmic_qci.*`` and the CDG/CCE state ``cosmic_state.*`` among them; tied weights stay tied) and, when
it resumes, loads them back before it builds its optimizer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cosmic_fx.integrations.hf needs transformers (and accelerate, which its Trainer uses): "
        "pip install 'cosmic-fx[hf]'"
    ) from err

from ..compiled import is_cosmic_compiled
from ..config import CosmicConfig
from ..runtime import CosmicRuntime, _unwrap, runtime_of
from ..transform import transform, transform_info

__all__ = ["CosmicCallback", "add_cosmic_callback", "check_trainer_setup", "from_pretrained"]

log = logging.getLogger(__name__)

PREFIX = "cosmic/"
_RECOMPILE = re.compile(r"\d+/(\d+)")
_SETUP = ("model = cosmic_fx.compile(model, cosmic_fx.CosmicConfig(...))  # before Trainer(model=model, ...)")


def check_trainer_setup(model: nn.Module, args: Any) -> CosmicRuntime:
    """Refuse a Trainer set-up in which cosmic would not do what the user expects; return the model's
    runtime otherwise. :class:`CosmicCallback` calls it when training begins.

    Refused, each with what to change in the training script: a model that is not a cosmic model, one
    compiled by ``torch.compile`` without :func:`cosmic_fx.transform` (``backend="cosmic"`` on a plain
    model: no QCI parameters, no cosmic state in its checkpoints), a transformed model neither compiled
    by :func:`cosmic_fx.compile` nor given to :func:`cosmic_fx.attach_hooks` (CDG and CCE would never
    run), ``TrainingArguments(torch_compile=True)`` on top of it, and, with a fused CCE update
    (``cce_fused_lr``), ``gradient_accumulation_steps > 1`` or gradient clipping (``max_grad_norm > 0``;
    the Trainer's default is 1.0).

    Args:
        model: the Trainer's model (``trainer.model``).
        args: the Trainer's ``TrainingArguments``.

    Raises:
        ValueError: the set-up is refused; the message says what to change.

    Example:
        >>> rt = check_trainer_setup(cosmic_fx.compile(model), TrainingArguments("out"))   # doctest: +SKIP
    """
    if model is None:
        raise ValueError("CosmicCallback: the Trainer has no model; pass Trainer(model=cosmic_fx.compile(model), ...)")
    inner = _unwrap(model)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    if transform_info(inner) is None:
        if compiled:
            raise ValueError(
                f"CosmicCallback: the Trainer's model ({type(inner).__name__}) was compiled by torch.compile "
                "without cosmic_fx.transform (torch.compile(model, backend='cosmic')?): it has no QCI parameters, "
                "its checkpoints carry no cosmic state to resume, and its state-dict keys start with '_orig_mod.'. "
                f"Replace the torch.compile line of the training script with:\n    {_SETUP}"
            )
        raise ValueError(
            f"CosmicCallback: the Trainer's model ({type(inner).__name__}) is not a cosmic model (neither "
            f"transformed nor compiled by cosmic_fx). Add to the training script:\n    {_SETUP}"
        )
    rt = runtime_of(inner)
    if compiled and not is_cosmic_compiled(model):
        raise ValueError(
            "CosmicCallback: the Trainer's model is a cosmic_fx.transform result compiled by torch.compile itself; "
            "the Trainer then sees a forward of (*args, **kwargs) (remove_unused_columns drops every batch "
            "column) and checkpoint keys prefixed with '_orig_mod.'. Compile it with cosmic_fx instead:\n"
            "    model = cosmic_fx.compile(transformed_model)  # a transformed model is compiled as it is"
        )
    if not compiled and rt.mode is None:
        raise ValueError(
            f"CosmicCallback: the Trainer's model ({type(inner).__name__}) was transformed by cosmic_fx.transform "
            "but not compiled: its QCIs would train, but CDG and CCE would never run. Add to the training "
            "script, before Trainer(model=model, ...):\n    model = cosmic_fx.compile(model)  # a transformed model "
            "is compiled as it is\nor, to train eagerly, cosmic_fx.attach_hooks(model)."
        )
    if compiled and getattr(args, "torch_compile", False):
        raise ValueError(
            "CosmicCallback: TrainingArguments(torch_compile=True) would compile the model a second time, with "
            "another backend; cosmic_fx.compile already compiled it with the cosmic backend. Leave "
            "torch_compile (and torch_compile_backend) unset."
        )
    fused = rt.config.cce_fused_lr
    if fused is not None:
        steps = getattr(args, "gradient_accumulation_steps", 1)
        if steps > 1:
            raise ValueError(
                f"TrainingArguments(gradient_accumulation_steps={steps}) cannot be used with "
                f"CosmicConfig(cce_fused_lr={fused}): the fused CCE update steps every parameter inside each "
                "backward pass, so there is no gradient left to accumulate. Use gradient_accumulation_steps=1 "
                "(a larger per_device_train_batch_size instead), or cce_fused_lr=None (CCE then scales the "
                "gradients and the Trainer's optimizer steps after accumulating them)."
            )
        clip = getattr(args, "max_grad_norm", None)
        if clip is not None and clip > 0:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={clip}) cannot be used with CosmicConfig(cce_fused_lr={fused}): "
                "the fused CCE update has applied and freed every gradient before the Trainer clips, so clipping "
                "would do nothing (1.0 is the Trainer's default). Pass TrainingArguments(max_grad_norm=0) to train "
                "with the fused update, or use cce_fused_lr=None to keep gradient clipping."
            )
        log.warning("cosmic_fx: cce_fused_lr=%s: the fused CCE update (plain SGD at that rate) trains every "
                    "parameter inside backward; the Trainer's optimizer, learning_rate and schedule do not apply "
                    "to them.", fused)
    return rt


class CosmicCallback(TrainerCallback):
    """Logs what CDG and CCE did into the Trainer's own logs, at ``logging_steps``, and checks the
    set-up when training begins (:func:`check_trainer_setup`).

    Each training log entry (the one with ``loss``) gets, in ``trainer.state.log_history`` and in the
    ``logs`` handed to the callbacks after this one:

    * ``cosmic/steps``: optimizer steps the runtime has counted (it continues across a resume); with
      ``gradient_accumulation_steps`` the runtime decides once per optimizer step, on the accumulated
      gradients, so this equals the Trainer's ``global_step``;
    * ``cosmic/frozen_share``: share of the elements of the parameters cosmic trains that CDG holds
      frozen now; ``cosmic/frozen_tensors``: how many tensors;
    * ``cosmic/prefix_blocks_frozen``: the frozen prefix, in blocks (``cdg="prefix"`` only);
    * ``cosmic/cce_scale_min`` / ``cosmic/cce_scale_max``: the range of CCE's gradient multipliers over
      the steps since the last log (when CCE is on);
    * ``cosmic/e_out``: the mean ``E(output)`` over those steps (when CDG reads it);
    * ``cosmic/freeze_events``: changes of the frozen set so far;
    * ``cosmic/graphs_compiled``, ``cosmic/recompiles``: graphs the cosmic backend compiled for this
      model since ``train()`` began, and how many of them were recompilations; ``cosmic/uncompiled_steps``:
      steps that ran without the compiled graph (dynamo's recompile limit) — compiled models only.

    :attr:`history` keeps every entry (with ``step``; the prefix's block names under ``prefix_blocks``,
    ``None`` without a prefix). Reporting callbacks that ``report_to`` installs (TensorBoard, W&B, ...) run
    before the callbacks passed to the Trainer; :func:`add_cosmic_callback` puts this one first so that
    they log its values too.

    Example:
        >>> model = cosmic_fx.compile(model)                                  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CosmicCallback()])  # doctest: +SKIP
        >>> trainer.train()                                                   # doctest: +SKIP
        >>> sorted(k for k in trainer.state.log_history[0] if k.startswith("cosmic/"))[:3]   # doctest: +SKIP
        ['cosmic/cce_scale_max', 'cosmic/cce_scale_min', 'cosmic/e_out']
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._runtime: CosmicRuntime | None = None
        self._model: nn.Module | None = None
        self._listener = None
        self._graphs = 0
        self._recompiles = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._seen_step: int | None = None
        self._scales: list[float] = []
        self._e_outs: list[float] = []

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..backend import add_listener

        self._runtime = check_trainer_setup(model, args)
        self._model = _unwrap(model)
        self._watch(kwargs.get("optimizer"))
        self._graphs = self._recompiles = 0
        self._reset_window()
        self._seen_step = self._runtime.steps
        if self._listener is None:
            self._listener = add_listener(self._on_graph)

    def on_substep_end(self, args, state, control, **kwargs):
        self._collect()

    def on_step_end(self, args, state, control, **kwargs):
        self._collect()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._runtime is None:
            return
        entry = self.entry()
        numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        logs.update(numbers)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(numbers)
        self.history.append({"step": state.global_step, **entry})
        self._scales, self._e_outs = [], []

    def on_train_end(self, args, state, control, **kwargs):
        if self._listener is not None:
            self._listener.remove()
            self._listener = None

    def _watch(self, optimizer: Any) -> None:
        """End the runtime's steps at the Trainer's optimizer steps from the first one on (accelerate
        wraps the torch optimizer: its step hooks are on the one inside)."""
        import torch

        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            return
        rt = self._runtime
        if rt is not None and rt.config.cce_fused.value == "off" \
                and rt.indices_of(p for g in optimizer.param_groups for p in g["params"]):
            rt.watch_optimizer(optimizer)

    # ------------------------------------------------------------------ readings
    def _on_graph(self, record) -> None:
        rt = record.runtime() if record.runtime is not None else None
        if rt is None or rt is not self._runtime:
            return
        self._graphs += 1
        m = _RECOMPILE.match(record.compile_id)
        if m and int(m.group(1)) > 0:
            self._recompiles += 1

    def _collect(self) -> None:
        """Read the runtime's latest step once (an optimizer step: with gradient accumulation, after the
        last micro-batch)."""
        rt = self._runtime
        if rt is None or rt.steps == self._seen_step:
            return
        self._seen_step = rt.steps
        last = rt.last_step
        self._scales.extend(float(v) for v in last.get("scale", {}).values())
        e_out = last.get("e_out")
        if e_out is not None and math.isfinite(e_out):
            self._e_outs.append(float(e_out))

    def entry(self) -> dict[str, Any]:
        """The values logged at the current step (what :meth:`on_log` adds; ``None`` where not measured)."""
        rt, model = self._runtime, self._model
        if rt is None or model is None:
            raise RuntimeError("CosmicCallback.entry(): training has not begun (no model yet)")
        numel = {n: p.numel() for n, p in model.named_parameters(remove_duplicate=False)}
        total = sum(numel.get(n, 0) for n in rt.names)
        frozen = rt.frozen
        entry: dict[str, Any] = {
            PREFIX + "steps": rt.steps,
            PREFIX + "frozen_share": (sum(numel.get(n, 0) for n in frozen) / total) if total else 0.0,
            PREFIX + "frozen_tensors": len(frozen),
            PREFIX + "freeze_events": len(rt.freeze_events),
        }
        blocks = _prefix_blocks(rt)
        if blocks is not None:
            entry[PREFIX + "prefix_blocks_frozen"] = len(blocks)
        entry["prefix_blocks"] = blocks
        if self._scales:
            entry[PREFIX + "cce_scale_min"] = min(self._scales)
            entry[PREFIX + "cce_scale_max"] = max(self._scales)
        if self._e_outs:
            entry[PREFIX + "e_out"] = sum(self._e_outs) / len(self._e_outs)
        if rt.mode == "compiled":
            entry[PREFIX + "graphs_compiled"] = self._graphs
            entry[PREFIX + "recompiles"] = self._recompiles
            entry[PREFIX + "uncompiled_steps"] = rt.uncompiled_steps
        return entry


def _prefix_blocks(rt: CosmicRuntime) -> list[str] | None:
    """Names of the blocks prefix CDG holds frozen, or ``None`` when the config has no prefix mode.

    Read defensively: ``cdg="prefix"`` keeps its state in ``runtime.prefix`` (``units``, ``length``)."""
    if str(getattr(rt.config.cdg, "value", rt.config.cdg)) != "prefix":
        return None
    prefix = getattr(rt, "prefix", None)
    length = getattr(prefix, "length", None)
    units = getattr(prefix, "units", None)
    if not isinstance(length, int) or units is None:
        return None
    return [str(getattr(u, "name", u)) for u in list(units)[:length]]


def add_cosmic_callback(trainer: Any, callback: CosmicCallback | None = None) -> CosmicCallback:
    """Put a :class:`CosmicCallback` first among ``trainer``'s callbacks, so that the reporting callbacks
    ``report_to`` installed (TensorBoard, W&B, ...) log its values too; returns it.

    Args:
        trainer: a ``transformers.Trainer``.
        callback: the callback to add (a new one by default).

    Example:
        >>> cb = add_cosmic_callback(trainer)   # doctest: +SKIP
        >>> trainer.train()                     # doctest: +SKIP
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        raise TypeError(f"add_cosmic_callback expects a transformers.Trainer; got {type(trainer).__name__}")
    if any(isinstance(cb, CosmicCallback) for cb in handler.callbacks):
        raise ValueError("this Trainer already has a CosmicCallback; add one only")
    callback = callback if callback is not None else CosmicCallback()
    handler.callbacks.insert(0, callback)
    return callback


# ---------------------------------------------------------------------- from_pretrained
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(path / name)))
        return state
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json) there; pass the "
                            "directory that save_pretrained (or a Trainer checkpoint) wrote")


def from_pretrained(model_class: Any, path: str | os.PathLike, *, lower: str | None = None,
                    **kwargs: Any) -> nn.Module:
    """Load a transformed model that ``save_pretrained`` (or a Trainer checkpoint) wrote: the base model
    through ``model_class.from_pretrained``, transformed with the config saved in its cosmic state, then
    every saved tensor loaded (QCI weights, the CDG/CCE state).

    ``model_class.from_pretrained(path)`` alone loads the base model only (transformers reports the
    ``cosmic_qci.*`` and ``cosmic_state.*`` weights as unused). For shipping the QCIs without the base
    weights, see the adapter export (``cosmic_fx.export(..., format="adapter")`` / ``cosmic_fx.load_adapter``).

    Args:
        model_class: the model's class (``GPT2LMHeadModel``, ``AutoModelForCausalLM``, ...).
        path: the directory.
        lower: the lowering for a later :func:`cosmic_fx.compile` (not saved in checkpoints; default
            ``"inductor"``).
        **kwargs: passed to ``model_class.from_pretrained``.

    Returns:
        the transformed model (not compiled: ``cosmic_fx.compile(result)`` trains it on).

    Example:
        >>> cm.save_pretrained("out")                                   # doctest: +SKIP
        >>> tm = from_pretrained(GPT2LMHeadModel, "out")                # doctest: +SKIP
        >>> cosmic_fx.runtime_of(tm).steps == cosmic_fx.runtime_of(cm).steps   # doctest: +SKIP
        True
    """
    from ..runtime.state import check_meta, saved_config

    path = Path(path)
    state = _read_weights(path)
    if "cosmic_state.meta" not in state:
        raise ValueError(
            f"{path} holds no cosmic state (no 'cosmic_state.meta' among its weights): it was not saved from a "
            f"cosmic_fx-transformed model. Load it with {getattr(model_class, '__name__', model_class)}"
            ".from_pretrained(path) and transform it with cosmic_fx.transform(model, config)."
        )
    options = saved_config(state["cosmic_state.meta"])
    config = CosmicConfig.from_options({**options, **({"lower": lower} if lower is not None else {})})
    base = model_class.from_pretrained(str(path), **kwargs)
    tm = transform(base, config)
    check_meta(runtime_of(tm), state["cosmic_state.meta"])
    result = tm.load_state_dict(state, strict=False)
    # save_pretrained leaves out the second name of a tied weight (lm_head.weight tied to wte.weight)
    by_id: dict[int, list[str]] = {}
    for name, t in [*tm.named_parameters(remove_duplicate=False), *tm.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    loaded = set(state)
    missing = [k for k in result.missing_keys
               if not any(alias in loaded for ids in by_id.values() if k in ids for alias in ids)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: the saved weights do not fit {type(tm).__name__} transformed with the saved config "
            f"(missing: {missing[:5]}, unexpected: {list(result.unexpected_keys)[:5]}). Load it with the class it "
            "was saved from."
        )
    return tm
