"""The fused CCE update: one optimizer step per parameter, applied inside backward.

``CosmicConfig.cce_fused`` chooses the rule; :class:`FusedUpdate` holds each parameter's state (as
``torch.distributed.optim._apply_optimizer_in_backward`` does: one optimizer state per parameter,
stepped from that parameter's post-accumulate-grad hook) and applies it:

* ``"sgd"``: ``torch.optim.SGD`` with dampening 0: ``g <- g + wd * p``; with momentum
  ``b <- mu * b + g`` (``b`` starts at zero, so the first step gives ``b = g`` exactly, as torch's
  clone of the first gradient) and ``g <- b`` (nesterov: ``g <- g + mu * b``); ``p <- p - lr * g``.
* ``"adamw"``: ``torch.optim.AdamW``: ``p <- p * (1 - lr * wd)``, the moments ``m <- lerp(m, g, 1 - b1)``,
  ``v <- b2 * v + (1 - b2) * g * g``, and ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
  The step count ``t`` is a float32 0-d tensor, as torch's (``capturable`` form): the bias
  corrections are tensor arithmetic, so a compiled backward does not specialise on the step number.
  Against ``torch.optim.AdamW`` (which computes them in Python double precision) the parameters
  agree to float32 rounding (tests: ``rtol=1e-5``).

The gradient it is given is already scaled by CCE's multiplier. Under ``torch.compile`` with
compiled autograd (:meth:`cosmic_fx.runtime.fused_optimizer.FusedOptimizer.backward`) this code is
traced into the compiled backward; the multiplier then comes from a per-parameter 0-d tensor
(``scale``), refreshed before the backward, so that no Python number in it changes between steps.
"""

from __future__ import annotations

import torch

from ..config import CCEFused, CosmicConfig

__all__ = ["FusedUpdate"]

_SGD_KEYS = ("momentum_buffer",)
_ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq")


class FusedUpdate:
    """Per-parameter state and the update rule of ``config.cce_fused`` for ``n`` parameters.

    State tensors are created for every parameter at the first update or :meth:`allocate` (all at
    once: a compiled backward must not meet a parameter whose state appears later, which would
    change what it traced); SGD without momentum has none.

    Example:
        >>> import torch, cosmic_fx
        >>> cfg = cosmic_fx.CosmicConfig.off(cce_fused="sgd", cce_fused_lr=0.1, cce_fused_momentum=0.9)
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> fu = FusedUpdate(cfg, 1)
        >>> fu.allocate([p], with_scale=False)
        >>> p.grad = torch.full((2,), 0.5)
        >>> fu.apply(0, p, p.grad)
        >>> p.detach()
        tensor([0.9500, 0.9500])
    """

    external = False  # the config's update (runtime.fuses_update reads this); see optim_update.py
    traced = False  # set around a traced backward (this update's math is the same either way)
    observer = None  # inside a traced backward: called with (index, p.grad) before the update (block readings)

    def __init__(self, config: CosmicConfig, n: int) -> None:
        self.config = config
        self.kind = config.cce_fused
        self.n = n
        self.lr = config.cce_fused_lr
        self.weight_decay = config.fused_weight_decay
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        # CCE multipliers as 0-d tensors for the traced backward (None: CCE off, nothing to scale)
        self.scale: list[torch.Tensor] | None = None
        self.allocated = False

    @property
    def keys(self) -> tuple[str, ...]:
        if self.kind is CCEFused.ADAMW:
            return _ADAMW_KEYS
        if self.kind is CCEFused.SGD and self.config.cce_fused_momentum > 0:
            return _SGD_KEYS
        return ()

    def allocate(self, params: list[torch.Tensor | None], with_scale: bool) -> None:
        """Create every parameter's state (zeros) once; and the 0-d scale tensors when asked."""
        if not self.allocated:
            for i, p in enumerate(params):
                if p is None or self.state[i]:
                    continue
                for key in self.keys:
                    if key == "step":
                        self.state[i][key] = torch.zeros((), dtype=torch.float32, device=p.device)
                    else:
                        self.state[i][key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.allocated = True
        if with_scale and self.scale is None:
            self.scale = [torch.ones((), dtype=torch.float32, device=p.device if p is not None else "cpu")
                          for p in params]

    def ready_for_trace(self, reached: set[int], params: list[torch.Tensor | None]) -> bool:
        """Always: :meth:`allocate` creates every state tensor before a traced backward."""
        return True

    def before_trace(self) -> None:
        """Nothing to refresh: the config's hyperparameters are constants."""

    @torch.no_grad()
    def apply(self, i: int, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Update parameter ``i`` (``p``) from ``grad`` in place (the caller frees ``p.grad``)."""
        if self.keys and not self.state[i]:
            raise RuntimeError(f"cosmic fused update: no state for parameter {i}; call allocate() first")
        if self.traced and self.observer is not None:
            self.observer(i, p.grad)
        if self.kind is CCEFused.ADAMW:
            self._adamw(p, grad, self.state[i])
        else:
            self._sgd(p, grad, self.state[i])

    def _sgd(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        if self.weight_decay != 0:
            g = g.add(p, alpha=self.weight_decay)
        mu = cfg.cce_fused_momentum
        if mu > 0:
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            g = g.add(buf, alpha=mu) if cfg.cce_fused_nesterov else buf
        p.add_(g, alpha=-self.lr)

    def _adamw(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        beta1, beta2 = self.config.cce_fused_betas
        lr, eps = self.lr, self.config.cce_fused_eps
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(1)
        if self.weight_decay != 0:
            p.mul_(1 - lr * self.weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # p - (lr / bias1) * m / (sqrt(v) / bias2_sqrt + eps), with the step size folded into the
        # denominator: one temporary of the parameter's size, every scalar a 0-d tensor
        neg_step_size = (lr / (1 - torch.pow(beta1, step))).neg()
        bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        denom = (v.sqrt() / (bias2_sqrt * neg_step_size)).add_(eps / neg_step_size)
        p.addcdiv_(m, denom)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self, names: list[str]) -> dict[str, object]:
        """``{"kind": ..., "names": [...], "state": {index: {key: tensor}}}``: copies of the tensors."""
        return {"kind": self.kind.value, "names": list(names),
                "state": {i: {k: t.clone() for k, t in s.items()} for i, s in enumerate(self.state) if s}}

    def load_state_dict(self, saved: dict[str, object], names: list[str], params: list[torch.Tensor | None]) -> None:
        """Restore :meth:`state_dict`'s output; a mismatch of kind, parameters or shapes is an error
        that names it (nothing is loaded then)."""
        if not isinstance(saved, dict) or not {"kind", "names", "state"} <= set(saved):
            raise RuntimeError("not a cosmic fused-optimizer state dict (expected the keys kind, names, state); "
                               "save it with cosmic_fx.fused_optimizer(model).state_dict()")
        if saved["kind"] != self.kind.value:
            raise RuntimeError(f"the fused-optimizer state was saved for cce_fused={saved['kind']!r}; this model "
                               f"uses cce_fused={self.kind.value!r}. Resume with the checkpoint's config.")
        if list(saved["names"]) != list(names):
            missing = [n for n in names if n not in saved["names"]]
            extra = [n for n in saved["names"] if n not in names]
            raise RuntimeError(f"the fused-optimizer state covers other parameters (missing in it: {missing[:5]}; "
                               f"not in this model: {extra[:5]}). Rebuild the model as for the run that saved it.")
        new: list[dict[str, torch.Tensor]] = [{} for _ in range(self.n)]
        for i, entry in dict(saved["state"]).items():
            i = int(i)
            if set(entry) != set(self.keys):
                raise RuntimeError(f"fused-optimizer state of {names[i]!r} has keys {sorted(entry)}; this config "
                                   f"keeps {sorted(self.keys)} (was it saved with other cce_fused_* settings?)")
            p = params[i]
            if p is None:  # a parameter of a model being collected: nothing to restore it into
                continue
            for k, t in entry.items():
                want = () if k == "step" else tuple(p.shape)
                if tuple(t.shape) != want:
                    raise RuntimeError(f"fused-optimizer state {names[i]!r}.{k} has shape {tuple(t.shape)}; "
                                       f"the parameter needs {want}")
            new[i] = {k: t.detach().to(device=p.device, dtype=torch.float32 if k == "step" else p.dtype, copy=True)
                      for k, t in entry.items()}
        if self.allocated:  # copy into the existing tensors: a compiled backward reads these objects
            for i, entry in enumerate(new):
                for k, t in self.state[i].items():
                    t.copy_(entry[k]) if k in entry else t.zero_()
        else:
            self.state = new  # allocate() adds the parameters that had no state yet
