"""The update of a user's ``torch.optim`` optimizer (SGD, Adam, AdamW), applied inside backward.

:func:`cosmic_fx.fused_optimizer(model, optimizer) <cosmic_fx.fused_optimizer>` puts an
:class:`OptimizerUpdate` in the model's runtime in place of the config's fused update: each
parameter's post-accumulate-grad hook then steps that parameter with the optimizer's own rule and
hyperparameters, and frees its gradient.

* **Hyperparameters are read live**: every update reads ``group["lr"]`` (and ``momentum``,
  ``betas``, ``weight_decay``...) from the optimizer's param group at the time it runs, so an LR
  scheduler's ``scheduler.step()`` changes the next update as it changes ``optimizer.step()``'s.
* **State lives in the optimizer**: ``optimizer.state[p]`` holds what ``torch.optim`` keeps there
  (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), with torch's
  dtypes and devices, created lazily at a parameter's first update as torch does. So
  ``optimizer.state_dict()`` / ``load_state_dict()`` checkpoint the run, and a checkpoint moves
  between the fused update and a plain ``optimizer.step()`` loop either way.
* **Same math**: eagerly it is the single-tensor implementation of ``torch.optim`` (the one torch
  uses on CPU, ``foreach=False``), operation for operation: equal to the bit. In a backward traced
  by compiled autograd every hyperparameter is a 0-d tensor refreshed before the backward (so a
  scheduler does not make the compiled backward recompile each step) and Adam's bias corrections
  are tensor arithmetic (torch's ``capturable`` form): equal to float32 rounding.

What it cannot do is refused when it is built (:func:`check_optimizer`): another optimizer class,
``differentiable=True`` or ``capturable=True`` (both are about ``optimizer.step()`` itself: autograd
through it, CUDA graphs around it).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SUPPORTED", "OptimizerUpdate", "check_optimizer"]

# the exact classes whose update this file implements (a subclass may override step(): refused)
SUPPORTED: dict[type, str] = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}

# options that change what step() is, not the update rule: each an error with what to do instead
_REFUSED = {
    "differentiable": "differentiable=True makes optimizer.step() differentiable (autograd through the update); "
                      "an update inside backward cannot be differentiated. Build the optimizer with "
                      "differentiable=False",
    "capturable": "capturable=True keeps the optimizer step capturable in a CUDA graph around optimizer.step(); the "
                  "fused update runs inside backward instead. Build the optimizer with capturable=False",
}

# numbers read from each param group, as 0-d tensors in a traced backward
_SGD_HP = ("lr", "momentum", "dampening", "weight_decay")
_ADAM_HP = ("lr", "beta1", "beta2", "eps", "weight_decay")


def check_optimizer(optimizer: Any) -> str:
    """The update kind (``"sgd"`` or ``"adam"``) of a supported optimizer; a clear error otherwise.

    Args:
        optimizer: the optimizer handed to :func:`cosmic_fx.fused_optimizer`.

    Example:
        >>> check_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3))
        'adam'
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cosmic_fx.fused_optimizer expects a torch.optim optimizer as its second argument; got "
                        f"{type(optimizer).__name__}")
    kind = SUPPORTED.get(type(optimizer))
    if kind is None:
        raise ValueError(
            f"cosmic_fx.fused_optimizer cannot fuse {type(optimizer).__name__} into backward: the supported "
            f"optimizers are torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW (exactly those classes). "
            f"Use one of them, or train with {type(optimizer).__name__} as usual (loss.backward(); "
            "optimizer.step()) and cce_fused='off'."
        )
    for g, group in enumerate(optimizer.param_groups):
        for key, why in _REFUSED.items():
            if group.get(key, False):
                raise ValueError(f"cosmic_fx.fused_optimizer: param group {g} of {type(optimizer).__name__} has "
                                 f"{why}.")
    return kind


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _hyper(kind: str, group: dict[str, Any]) -> dict[str, float]:
    if kind == "sgd":
        return {k: _number(group[k]) for k in _SGD_HP}
    beta1, beta2 = group["betas"]
    return {"lr": _number(group["lr"]), "beta1": _number(beta1), "beta2": _number(beta2),
            "eps": _number(group["eps"]), "weight_decay": _number(group["weight_decay"])}


class OptimizerUpdate:
    """The per-parameter update of a torch.optim optimizer, for the runtime's hooks.

    It answers the runtime as its config's fused update does (``allocate``, ``apply``, ``scale``);
    ``group_of`` maps the runtime's parameter index to the optimizer's param group.

    Args:
        optimizer: an optimizer that :func:`check_optimizer` accepts.
        group_of: runtime parameter index -> param-group index, for the parameters it steps.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> up = OptimizerUpdate(opt, {0: 0})
        >>> up.apply(0, p, torch.full((2,), 0.5))
        >>> p.detach()
        tensor([0.9500, 0.9500])
    """

    external = True  # the runtime's hooks update even when the config's cce_fused is "off"

    def __init__(self, optimizer: torch.optim.Optimizer, group_of: dict[int, int]) -> None:
        self.optimizer = optimizer
        self.kind = check_optimizer(optimizer)
        self.group_of = dict(group_of)
        self.scale: list[torch.Tensor] | None = None  # CCE multipliers for a traced backward (as FusedUpdate's)
        self.allocated = True  # state is created lazily, per parameter, as torch.optim creates it
        self.traced = False  # set around a backward traced by compiled autograd
        self.observer = None  # inside a traced backward: called with (index, p.grad) first (block readings)
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}  # group -> its hyperparameters as 0-d tensors
        self._handles: list = []

    def hook_step(self, fn: Any) -> None:
        """Run ``fn`` before every ``optimizer.step()`` until :meth:`close` (kept as a removable handle)."""
        self._handles.append(self.optimizer.register_step_pre_hook(fn))

    def close(self) -> None:
        """Remove the step hooks: the optimizer is a plain one again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ the runtime's interface
    def allocate(self, params: list[torch.Tensor | None], with_scale: bool) -> None:
        """Create the 0-d CCE multipliers a traced backward reads (the state itself is lazy)."""
        if with_scale and self.scale is None:
            self.scale = [torch.ones((), dtype=torch.float32, device=p.device if p is not None else "cpu")
                          for p in params]

    def ready_for_trace(self, reached: set[int], params: list[torch.Tensor | None]) -> bool:
        """Whether every parameter that this backward steps already has its state: a traced backward
        must not create state (its graph would change at the next step); the first backward then runs
        untraced and creates it as ``torch.optim`` would."""
        for i in reached:
            p = params[i]
            if i in self.group_of and p is not None and p.requires_grad and not self._has_state(i, p):
                return False
        return True

    def before_trace(self) -> None:
        """Copy every group's hyperparameters, as they are now, into the 0-d tensors the traced
        update reads (the same objects every step: no recompilation when a scheduler changes them)."""
        for g, group in enumerate(self.optimizer.param_groups):
            values = _hyper(self.kind, group)
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            held = self._tensors.get(g)
            if held is None or next(iter(held.values())).device != device:
                self._tensors[g] = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in values.items()}
            else:
                for k, v in values.items():
                    held[k].fill_(v)

    @torch.no_grad()
    def apply(self, i: int, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Step parameter ``i`` (``p``) with ``grad`` by its group's rule (no group: not stepped)."""
        if self.traced and self.observer is not None:
            self.observer(i, p.grad)
        g = self.group_of.get(i)
        if g is None:
            return
        group = self.optimizer.param_groups[g]
        # optimizer.state is a defaultdict: reading an entry creates it, and torch's plain SGD has none
        state = None if self.kind == "sgd" and group["momentum"] == 0 else self.optimizer.state[p]
        if self.kind == "sgd":
            (self._sgd_traced if self.traced else self._sgd)(p, grad, group, state, g)
        else:
            (self._adam_traced if self.traced else self._adam)(p, grad, group, state, g)

    def _has_state(self, i: int, p: torch.Tensor) -> bool:
        group = self.optimizer.param_groups[self.group_of[i]]
        state = self.optimizer.state.get(p, {})
        if self.kind == "sgd":
            return group["momentum"] == 0 or state.get("momentum_buffer") is not None
        return "step" in state

    # ------------------------------------------------------------------ SGD (torch.optim.SGD, foreach=False)
    def _sgd(self, p, grad, group, state, g) -> None:
        grad = grad if not group["maximize"] else -grad
        wd, momentum, lr = group["weight_decay"], group["momentum"], _number(group["lr"])
        if wd != 0:
            grad = grad.add(p, alpha=wd)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = grad.detach().clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-lr)

    def _sgd_traced(self, p, grad, group, state, g) -> None:
        t = self._tensors[g]
        grad = grad if not group["maximize"] else -grad
        if group["weight_decay"] != 0:
            grad = grad + p * t["weight_decay"]
        if group["momentum"] != 0:
            buf = state["momentum_buffer"]  # ready_for_trace: created by an untraced first step
            buf.mul_(t["momentum"]).add_(grad * (1 - t["dampening"]))
            grad = grad + buf * t["momentum"] if group["nesterov"] else buf
        p.sub_(grad * t["lr"])

    # ------------------------------------------------------------------ Adam / AdamW (foreach=False)
    def _adam_state(self, p, group, state) -> None:
        if "step" not in state:  # as torch.optim.Adam._init_group (capturable and fused off)
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _adam(self, p, grad, group, state, g) -> None:
        self._adam_state(p, group, state)
        grad = grad if not group["maximize"] else -grad
        lr, wd, eps = _number(group["lr"]), group["weight_decay"], group["eps"]
        beta1, beta2 = (_number(b) for b in group["betas"])
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if wd != 0:
            if group.get("decoupled_weight_decay", False):
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        if group["amsgrad"]:
            max_sq = state["max_exp_avg_sq"]
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _adam_traced(self, p, grad, group, state, g) -> None:
        t = self._tensors[g]
        grad = grad if not group["maximize"] else -grad
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if group["weight_decay"] != 0:
            if group.get("decoupled_weight_decay", False):
                p.mul_(1 - t["lr"] * t["weight_decay"])
            else:
                grad = grad + p * t["weight_decay"]
        exp_avg.lerp_(grad, 1 - t["beta1"])
        exp_avg_sq.mul_(t["beta2"]).add_(grad * grad * (1 - t["beta2"]))
        # torch's capturable form: the step number stays a tensor, so one compiled graph serves every step
        step = step_t.to(t["lr"].device)
        neg_step_size = (t["lr"] / (1 - torch.pow(t["beta1"], step))).neg()
        bias2_sqrt = (1 - torch.pow(t["beta2"], step)).sqrt()
        v = exp_avg_sq
        if group["amsgrad"]:
            v = state["max_exp_avg_sq"]
            v.copy_(torch.maximum(v, exp_avg_sq))
        denom = (v.sqrt() / (bias2_sqrt * neg_step_size)).add_(t["eps"] / neg_step_size)
        p.addcdiv_(exp_avg, denom)
