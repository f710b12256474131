"""`CosmicConfig`: every knob of the cosmic pipeline in one validated, hashable dataclass.

Presets are constructors: ``CosmicConfig()`` is the measured default, ``CosmicConfig.seed()`` the
source text's literal rules, ``CosmicConfig.off()`` every pass and hook disabled (the lowering alone).
A ``torch.compile(..., options={...})`` dict becomes a config in exactly one place:
:meth:`CosmicConfig.from_options`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CCEFused",
    "CCEMode",
    "CDGMode",
    "CSCPlacement",
    "CosmicConfig",
    "Lowering",
    "PrefixSignal",
    "QCIForm",
    "QCIInit",
]


class _Choice(str, enum.Enum):
    """A string enum whose error message lists the valid values."""

    @classmethod
    def parse(cls, value: Any, field: str) -> _Choice:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"CosmicConfig.{field} must be one of {valid}; got {value!r}")

    def __str__(self) -> str:  # f"{mode}" prints the bare value
        return self.value


class CSCPlacement(_Choice):
    """Where cosmic state compression is inserted."""

    OUTPUT = "output"  # on the model output, as the source text does
    SITES = "sites"  # after every qualifying site (after its QCI, if any)
    NONE = "none"


class QCIInit(_Choice):
    """How a new QuantumClassicalInterface is initialised."""

    IDENTITY = "identity"  # projector = identity: the module returns its input exactly at insertion
    SEED = "seed"  # nn.Linear's default init, as in the source text


class QCIForm(_Choice):
    """The form of the projector ``P`` of a QuantumClassicalInterface (the gate is the text's in all)."""

    DENSE = "dense"  # P = Linear(dim, dim), as the text: a dim x (dim + 1) GEMM per site
    LOWRANK = "lowrank"  # P = I + B A (+ bias), rank qci_rank: two thin GEMMs
    DIAGONAL = "diagonal"  # P = diag(scale) (+ bias): elementwise work only


class CDGMode(_Choice):
    """Cosmic dynamic graph: which parameters get no update."""

    OFF = "off"
    SEED = "seed"  # every step: skip p when E(p) < E(output)   (source text)
    CALIBRATED = "calibrated"  # freeze on a schedule after `cdg_patience` low readings; see runtime/cdg.py
    PREFIX = "prefix"  # freeze a growing prefix of blocks from the input side once each has settled


class PrefixSignal(_Choice):
    """What prefix CDG reads to decide that the next block has settled (see runtime/prefix.py)."""

    GRAD = "grad"  # the block's gradient norm, read every step
    EFFICIENCY = "efficiency"  # the block's E(p) (numel-weighted), read every `efficiency_every` steps
    DRIFT = "drift"  # the next block's weight drift ||w_t - w_{t-W}|| / ||w_t||, read every window (W) steps


class CCEMode(_Choice):
    """Cosmic classical efficiency: how a parameter's efficiency scales its update."""

    OFF = "off"
    SEED = "seed"  # grad <- E(p) * grad, i.e. p <- p - lr * E(p) * grad with SGD   (source text code)
    RELATIVE = "relative"  # grad <- m(p) * grad, m = clamp(1 + gamma * (E(p) - mean E), lo, hi) > 0


class CCEFused(_Choice):
    """The optimizer applied to each parameter inside backward (fused CCE), or none."""

    OFF = "off"  # the hooks only scale p.grad; your optimizer steps after backward
    SGD = "sgd"  # torch.optim.SGD per parameter: momentum (dampening 0), weight decay, nesterov
    ADAMW = "adamw"  # torch.optim.AdamW per parameter


class Lowering(_Choice):
    """What the backend hands the rewritten graph to."""

    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"


_CHOICES: dict[str, type[_Choice]] = {
    "csc": CSCPlacement,
    "qci_init": QCIInit,
    "qci_form": QCIForm,
    "cdg": CDGMode,
    "cce": CCEMode,
    "cce_fused": CCEFused,
    "lower": Lowering,
    "cdg_prefix_signal": PrefixSignal,
}


@dataclasses.dataclass(frozen=True)
class CosmicConfig:
    """Configuration of the cosmic passes and hooks.

    Args:
        qci: insert a QuantumClassicalInterface after every qualifying site.
        qci_init: ``"identity"`` (default; function-preserving) or ``"seed"`` (random, as the text).
        qci_beta: initial value of the learnable gate temperature ``beta``.
        qci_form: the projector ``P``: ``"dense"`` (default; ``Linear(dim, dim)`` as the text),
            ``"lowrank"`` (``P = I + B A``, ``B`` zero at insertion) or ``"diagonal"`` (a per-feature
            scale and bias). Every form keeps the text's data-dependent gate and, with
            ``qci_init="identity"``, returns its input exactly at insertion. Cost per form:
            docs/perf.md.
        qci_rank: the rank of ``B A`` for ``qci_form="lowrank"`` (an int >= 1); a site narrower than
            the rank uses its width.
        min_width: a site qualifies when its output width is greater than this (the text: 10).
        qci_min_width: a qualifying site gets a QCI only when its output width is also greater than
            this (default 0: every qualifying site). The ``fast`` preset sets 511: the diagonal QCI
            costs at most 10% of its site's forward+backward from width 512 on (docs/perf.md), more on
            narrow sites (11% at width 256; at width 64 it added 22-33% to a whole training step,
            benchmarks/experiments/fast_window_experiment.py); CSC, CDG and CCE still cover the narrower sites.
        targets: regexes (full match on the qualified module name); when given, only matching sites
            qualify.
        exclude: regexes; matching sites never qualify.
        csc: where cosmic state compression goes: ``"output"`` (on the output layer's output, the
            last site's, before the forward computes a loss from it), ``"sites"`` or ``"none"``.
        csc_alpha: the entropy threshold ``alpha`` of CSC, finite and >= 0.
        eps: the epsilon of every formula, in (0, 1e-2].
        cdg: ``"off"``, ``"seed"`` (literal), ``"calibrated"`` or ``"prefix"`` (progressive
            freezing of the blocks on the input side: the frozen prefix costs no backward at all).
        cdg_patience: calibrated CDG freezes a parameter only after this many consecutive low
            readings (E(p) < E(output)).
        cdg_interval: calibrated CDG decides the frozen set every this many steps (and thaws the
            previous set then).
        cdg_max_frozen: calibrated CDG freezes at most this fraction of the parameter tensors.
        cdg_max_sets: calibrated CDG uses at most this many distinct frozen sets per run, which
            bounds recompilations under ``torch.compile``.
        cdg_protect_output: calibrated CDG never freezes the output layer (the last site). Prefix
            CDG never does, whatever this says.
        cdg_prefix_signal: what prefix CDG reads per block (the parameters of one block in forward
            order, see :func:`cosmic_fx.policy.prefix_units`): ``"grad"`` (the block's gradient norm,
            every step), ``"efficiency"`` (its numel-weighted ``E(p)``, every ``efficiency_every``
            steps) or ``"drift"`` (the weight drift ``||w_t - w_{t-W}|| / ||w_t||`` of the next block
            to freeze, its own weights only — not its QCI's —, read every ``W = cdg_prefix_window``
            steps with one ``torch._foreach_norm``; it keeps one snapshot of that block's weights:
            memory = the size of one block).
        cdg_prefix_every: with ``"grad"``, read the blocks' gradient norms (and decide) on every this
            many-th step only (1: every step); the window stays ``cdg_prefix_window`` steps, holding
            ``cdg_prefix_window // cdg_prefix_every`` readings. On the other steps prefix CDG does no
            work (inside a backward traced by :func:`cosmic_fx.fused_optimizer` the norms are part of
            the one compiled graph, so they are still computed there, and dropped);
            benchmarks/experiments/costfree_step_experiment.py measures it.
        cdg_prefix_window: prefix CDG compares the mean signal of the last this many steps with the
            mean of the window before; a block can freeze once both windows are full, and at most one
            freeze event happens per window.
        cdg_prefix_threshold: the next block freezes when that relative change
            ``|now - before| / |before|`` is below this (> 0); with ``"drift"``, when the block's
            drift was below this in each of the last two windows.
        cdg_prefix_max: prefix CDG freezes at most this fraction (in (0, 1]) of the freezable blocks
            (those before the output layer), rounded down. Freeze events are at most ``cdg_max_sets``
            (each one recompiles under ``torch.compile``).
        cce: ``"off"``, ``"seed"`` (literal) or ``"relative"``.
        cce_gamma, cce_min, cce_max: the relative CCE multiplier
            ``clamp(1 + gamma * (E(p) - mean E), cce_min, cce_max)``.
        cce_skip_adaptive: CCE is off for the run once the runtime watches an optimizer that divides
            each parameter's gradient by its own running RMS (``torch.optim.Adam`` without coupled
            weight decay, ``AdamW``): a per-parameter gradient multiplier is normalised away there
            (up to ``eps`` and the steps where the multiplier changes), so it would cost work and do
            nothing. Logged once at INFO. The ``fast`` preset sets it; SGD keeps CCE.
        cce_fused: ``"off"`` (default: the hooks only scale ``p.grad`` and your optimizer steps),
            ``"sgd"`` or ``"adamw"``: that optimizer's update of each parameter happens inside its
            post-accumulate-grad hook, on the gradient already scaled by CCE's multiplier (1 with
            ``cce="off"``), and ``p.grad`` is freed at once, so gradients never all exist together
            (lower peak memory). Frozen parameters (CDG) are skipped, like parameters without a
            gradient in ``torch.optim``. The update state (momentum, Adam moments) checkpoints through
            :func:`cosmic_fx.fused_optimizer`; under ``torch.compile`` call its ``backward(loss)``
            for the memory saving. Every backward is a step: no gradient accumulation, no clipping
            by global norm, and no other optimizer over these parameters (an error). See docs/guide/performance.md,
            "Fused updates".
        cce_fused_lr: the fused update's learning rate (> 0), required with ``cce_fused``. Given
            alone (the former API) it means ``cce_fused="sgd"`` without momentum: ``p <- p - lr * m(p) * grad``.
        cce_fused_momentum: SGD momentum in [0, 1) (dampening 0, as ``torch.optim.SGD``'s default).
        cce_fused_nesterov: SGD with Nesterov momentum (needs ``cce_fused_momentum > 0``).
        cce_fused_weight_decay: ``None`` (default: ``torch.optim``'s default, 0 for SGD and 0.01 for
            AdamW) or a number >= 0: L2 added to the gradient (SGD) or decoupled decay (AdamW).
        cce_fused_betas: AdamW's ``(beta1, beta2)``, each in [0, 1).
        cce_fused_eps: AdamW's epsilon, > 0.
        efficiency_every: the hooks measure each parameter's ``E(p)`` every this many steps and
            reuse the reading (CDG's low/high verdict, CCE's multiplier) in between. ``E(p)`` is a
            softmax over the whole parameter: measuring it every step costs about one extra pass over
            the weights. The seed preset measures every step, as the text does.
        lower: ``"inductor"``, ``"aot_eager"`` or ``"eager"``.

    Example:
        >>> import cosmic_fx
        >>> cfg = cosmic_fx.CosmicConfig(csc="sites", csc_alpha=0.3)
        >>> cfg.csc
        <CSCPlacement.SITES: 'sites'>
        >>> cosmic_fx.CosmicConfig.seed().cdg.value
        'seed'
    """

    qci: bool = True
    qci_init: QCIInit | str = QCIInit.IDENTITY
    qci_beta: float = 1.0
    qci_form: QCIForm | str = QCIForm.DENSE
    qci_rank: int = 16
    min_width: int = 10
    qci_min_width: int = 0
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    csc: CSCPlacement | str = CSCPlacement.OUTPUT
    csc_alpha: float = 0.5
    eps: float = 1e-8
    cdg: CDGMode | str = CDGMode.CALIBRATED
    cdg_patience: int = 3
    cdg_interval: int = 50
    cdg_max_frozen: float = 0.125
    cdg_max_sets: int = 4
    cdg_protect_output: bool = True
    cdg_prefix_signal: PrefixSignal | str = PrefixSignal.GRAD
    cdg_prefix_window: int = 100
    cdg_prefix_every: int = 1
    cdg_prefix_threshold: float = 0.02
    cdg_prefix_max: float = 0.75
    cce: CCEMode | str = CCEMode.RELATIVE
    cce_gamma: float = 1.0
    cce_min: float = 0.5
    cce_max: float = 2.0
    cce_skip_adaptive: bool = False
    cce_fused: CCEFused | str = CCEFused.OFF
    cce_fused_lr: float | None = None
    cce_fused_momentum: float = 0.0
    cce_fused_nesterov: bool = False
    cce_fused_weight_decay: float | None = None
    cce_fused_betas: tuple[float, float] = (0.9, 0.999)
    cce_fused_eps: float = 1e-8
    efficiency_every: int = 10
    lower: Lowering | str = Lowering.INDUCTOR

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name, kind in _CHOICES.items():
            set_(name, kind.parse(getattr(self, name), name))
        for name in ("qci", "cdg_protect_output", "cce_skip_adaptive", "cce_fused_nesterov"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CosmicConfig.{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("targets", "exclude"):
            set_(name, _regex_tuple(getattr(self, name), name))
        for name, low in (("min_width", 0), ("qci_min_width", 0), ("qci_rank", 1), ("cdg_patience", 1),
                          ("cdg_interval", 1), ("cdg_max_sets", 1), ("efficiency_every", 1), ("cdg_prefix_window", 1),
                          ("cdg_prefix_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CosmicConfig.{name} must be an int >= {low}; got {value!r}")
        floats = {
            "qci_beta": (-math.inf, math.inf),
            "csc_alpha": (0.0, math.inf),
            "eps": (0.0, 1e-2),
            "cdg_max_frozen": (0.0, 1.0),
            "cdg_prefix_threshold": (0.0, math.inf),
            "cdg_prefix_max": (0.0, 1.0),
            "cce_gamma": (0.0, math.inf),
            "cce_min": (0.0, math.inf),
            "cce_max": (0.0, math.inf),
        }
        for name, (low, high) in floats.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"CosmicConfig.{name} must be a number; got {value!r}")
            value = float(value)
            if not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"CosmicConfig.{name} must be finite and in [{low}, {high}]; got {value!r}")
            set_(name, value)
        self._validate_fused(set_)
        for name in ("cdg_prefix_threshold", "cdg_prefix_max"):
            if getattr(self, name) == 0.0:
                raise ValueError(f"CosmicConfig.{name} must be > 0 (0 would never freeze a block; use cdg='off' "
                                 "for that)")
        if self.eps == 0.0:
            raise ValueError("CosmicConfig.eps must be > 0 (it keeps the efficiency's denominator away from 0)")
        if self.cce_min == 0.0 or self.cce_min > 1.0 or self.cce_max < 1.0 or self.cce_min > self.cce_max:
            raise ValueError(
                "CosmicConfig needs 0 < cce_min <= 1 <= cce_max (the relative CCE multiplier is positive "
                f"and 1 at the mean efficiency); got cce_min={self.cce_min}, cce_max={self.cce_max}"
            )

    def _validate_fused(self, set_) -> None:
        lr = self.cce_fused_lr
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"CosmicConfig.cce_fused_lr must be None or a finite learning rate > 0; got {lr!r}")
            set_("cce_fused_lr", float(lr))
            if self.cce_fused is CCEFused.OFF:  # the former API: cce_fused_lr alone is plain SGD
                set_("cce_fused", CCEFused.SGD)
        elif self.cce_fused is not CCEFused.OFF:
            raise ValueError(f"CosmicConfig.cce_fused={self.cce_fused.value!r} needs cce_fused_lr "
                             "(a learning rate > 0)")
        numbers = {"cce_fused_momentum": (0.0, 1.0, False), "cce_fused_eps": (0.0, 1.0, True)}
        if self.cce_fused_weight_decay is not None:
            numbers["cce_fused_weight_decay"] = (0.0, math.inf, False)
        for name, (low, high, open_low) in numbers.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value >= high or (open_low and value == low):
                bounds = f"{'(' if open_low else '['}{low:g}, {high:g})"
                raise ValueError(f"CosmicConfig.{name} must be a number in {bounds}; got {value!r}")
            set_(name, float(value))
        betas = self.cce_fused_betas
        if isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2 and all(
                not isinstance(b, bool) and isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            set_("cce_fused_betas", (float(betas[0]), float(betas[1])))
        else:
            raise ValueError("CosmicConfig.cce_fused_betas must be two numbers (beta1, beta2), each in [0, 1); "
                             f"got {betas!r}")
        if self.cce_fused_nesterov and self.cce_fused_momentum == 0.0:
            raise ValueError("CosmicConfig.cce_fused_nesterov needs cce_fused_momentum > 0 (as torch.optim.SGD)")
        # a knob that the chosen update ignores is a mistake worth stopping
        used = {CCEFused.OFF: set(),
                CCEFused.SGD: {"cce_fused_momentum", "cce_fused_nesterov", "cce_fused_weight_decay"},
                CCEFused.ADAMW: {"cce_fused_betas", "cce_fused_eps", "cce_fused_weight_decay"}}[self.cce_fused]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        ignored = sorted(k for k in ("cce_fused_momentum", "cce_fused_nesterov", "cce_fused_weight_decay",
                                     "cce_fused_betas", "cce_fused_eps")
                         if k not in used and getattr(self, k) != defaults[k])
        if ignored:
            raise ValueError(
                f"CosmicConfig: {', '.join(ignored)} set, but cce_fused={self.cce_fused.value!r} does not use "
                f"{'it' if len(ignored) == 1 else 'them'}; the SGD knobs are cce_fused_momentum/nesterov/weight_decay, "
                "the AdamW ones "
                f"cce_fused_betas/eps/weight_decay (and cce_fused needs cce_fused_lr)"
            )

    @property
    def fused_weight_decay(self) -> float:
        """The fused update's weight decay: the field, or ``torch.optim``'s default for the kind."""
        if self.cce_fused_weight_decay is not None:
            return self.cce_fused_weight_decay
        return 0.01 if self.cce_fused is CCEFused.ADAMW else 0.0

    # ------------------------------------------------------------------ presets
    @classmethod
    def seed(cls, **overrides: Any) -> CosmicConfig:
        """The source text's literal rules: random QCI init, CSC on the output, literal CDG and CCE.

        These rules wreck training (see docs/guide/presets.md, "Default vs seed"); they are kept so that anyone can
        reproduce the text exactly.
        """
        base = dict(qci_init=QCIInit.SEED, csc=CSCPlacement.OUTPUT, cdg=CDGMode.SEED, cce=CCEMode.SEED,
                    efficiency_every=1)
        return cls(**{**base, **overrides})

    @classmethod
    def fast(cls, **overrides: Any) -> CosmicConfig:
        """The preset to try for speed and memory when fine-tuning: the mechanisms in their cheapest
        measured forms. Measured (``cosmic-fx bench claims``, docs/claims/peers_drift015_run.md, 3 seeds,
        Inductor): step memory 0.84x ``torch.compile``'s on ``docs-finetune`` and 0.70x on
        ``mnist-transfer``, time to the target 0.93x and 0.95x (inside the seed spread), the final metric
        within the accuracy budget on the six default claims tasks, from scratch included (nothing froze on
        ``stdlib-lm-deep``: +0.004 bits/char); before its first freeze a step costs 1.00-1.03x a
        ``torch.compile`` step on every task, 1.027-1.028x over 300 steps on the half-millisecond
        ``digits-mlp`` (one 45-step run: 1.043x)
        (benchmarks/experiments/claims_prefreeze_step_experiment.py). On the 12-block
        ``docs-finetune-big`` (3 seeds, docs/claims/big_run.md) it froze a block still learning:
        +0.058 bits/char, over the 0.05 budget in every seed, time to the target 1.01x, memory 0.92x.

        * QCI off (``qci=False``, since 2026-12-04): the gate is work on every step and never stops
          acting, so it cannot meet "costs nothing until it acts". Where the preset used to put it (the
          diagonal form on sites wider than 511, ``qci_min_width=511``; none of the six default claims
          tasks has such a site), on ``docs-finetune-big``'s twelve width-1024 MLP sites it cost
          1.16x ``torch.compile``'s median step and 1.30x its peak step memory, for a final metric
          +0.015 bits/char (no gain): docs/claims/big_run.md. On narrower sites it costs more (a
          6-block width-64 transformer with a QCI on every site: 1.33x step time and 1.47x step
          memory, benchmarks/experiments/fast_preset_cost_experiment.py). ``qci=True`` puts the
          diagonal gate back on sites wider than 511; ``qci_min_width=0`` everywhere.
        * CSC off (``csc="none"``): after every site it costs 12-14x a clone per site, and on the
          output it slowed the start of training (digits, 40 steps: 66% test error against 34%
          without it; 3.3% and 3.5% after 400 steps; benchmarks/experiments/fast_preset_forms_experiment.py).
        * CDG ``"prefix"``: blocks on the input side freeze once their weights have stopped moving and
          then cost no backward at all (no weight or input gradients, no saved activations); a
          25-step window and at most a third of the blocks (``cdg_prefix_max=0.34``): freezing more,
          or sooner, lost accuracy when fine-tuning (benchmarks/experiments/fast_window_experiment.py,
          docs/guide/presets.md). The settle signal is the weight drift (``cdg_prefix_signal="drift"``,
          ``||w_t - w_{t-25}|| / ||w_t||`` of the next block below 0.015 in two windows running), read
          once per window. At 0.02 (the preset's threshold until 2026-12-03) it froze block 0 of
          ``stdlib-lm-deep`` from scratch while it was learning, +0.096 bits/char under Inductor
          (docs/claims/peers_drift_run.md); at 0.015 nothing froze there, and ``docs-finetune`` and
          ``mnist-transfer`` still froze their first block in every seed (docs/guide/presets.md, "A lower
          drift threshold"). The gradient norm's change (``"grad"``, the preset's signal until
          2026-12-02) froze blocks still learning from scratch: over 3 seeds on ``stdlib-lm-deep``
          +0.260 bits/char against +0.047 for the drift, and on ``docs-finetune`` both +0.037
          (benchmarks/experiments/fast_cce_sgd_experiment.py; docs/guide/presets.md, "Settle
          signal"). It also reads every step, so a step before the first freeze cost 1.11-1.25x a
          ``torch.compile`` step on digits against 1.01-1.08x with the drift
          (benchmarks/experiments/costfree_step_experiment.py).
        * CCE off (``cce="off"``): under SGD with momentum it cost accuracy when fine-tuning
          (``mnist-transfer``, 3 seeds: 4.13 % final error with CCE, 2.73 % without, 2.80 % for
          ``torch.compile``; on digits from scratch no difference beyond the seed spread;
          benchmarks/experiments/fast_cce_sgd_experiment.py, docs/guide/presets.md, "CCE in the fast
          preset"), and under Adam/AdamW a per-parameter gradient multiplier is normalised away
          (benchmarks/experiments/cce_adamw_experiment.py). ``cce="relative"`` puts it back; then
          ``cce_skip_adaptive=True`` keeps it off under Adam/AdamW.

        Example:
            >>> cfg = CosmicConfig.fast()
            >>> cfg.cdg.value, cfg.qci, cfg.csc.value, cfg.cce.value
            ('prefix', False, 'none', 'off')
            >>> CosmicConfig.fast(qci=True).qci_at(1024), CosmicConfig.fast(qci=True).qci_at(256)
            (True, False)
        """
        base = dict(qci=False, qci_form=QCIForm.DIAGONAL, qci_min_width=511, csc=CSCPlacement.NONE,
                    cdg=CDGMode.PREFIX,
                    cdg_prefix_window=25, cdg_prefix_max=0.34, cdg_prefix_signal=PrefixSignal.DRIFT,
                    cdg_prefix_threshold=0.015, cce=CCEMode.OFF,
                    cce_skip_adaptive=True)
        return cls(**{**base, **overrides})

    @classmethod
    def off(cls, **overrides: Any) -> CosmicConfig:
        """Every pass and hook disabled: the backend is then its lowering alone."""
        base = dict(qci=False, csc=CSCPlacement.NONE, cdg=CDGMode.OFF, cce=CCEMode.OFF)
        return cls(**{**base, **overrides})

    _PRESETS = ("default", "fast", "seed", "off")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CosmicConfig:
        """A preset by name (``"default"``, ``"fast"``, ``"seed"`` or ``"off"``), with field overrides.

        Example:
            >>> CosmicConfig.preset("fast", cdg_prefix_window=50).cdg_prefix_window
            50
        """
        if name == "default":
            return cls(**overrides)
        if name in ("fast", "seed", "off"):
            return getattr(cls, name)(**overrides)
        raise ValueError(f"unknown cosmic preset {name!r}; valid presets: {', '.join(cls._PRESETS)}")

    # ------------------------------------------------------------------ options dicts
    @classmethod
    def from_options(cls, options: Mapping[str, Any] | CosmicConfig | None) -> CosmicConfig:
        """Build a config from a ``torch.compile(..., options=...)`` dict.

        The dict takes any field name, plus ``"preset"`` (``"default"``, ``"fast"``, ``"seed"`` or ``"off"``) and
        ``"config"`` (a whole :class:`CosmicConfig`). Unknown keys are an error listing the valid ones.

        Example:
            >>> CosmicConfig.from_options({"preset": "seed", "csc_alpha": 0.3}).csc_alpha
            0.3
        """
        if options is None:
            return cls()
        if isinstance(options, CosmicConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"cosmic backend options must be a dict or a CosmicConfig; got {type(options).__name__}"
            )
        options = dict(options)
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in options if k not in fields and k not in ("preset", "config"))
        if unknown:
            raise ValueError(
                f"unknown cosmic option(s) {unknown}; valid keys: {', '.join(['config', 'preset', *sorted(fields)])}"
            )
        base = options.pop("config", None)
        preset = options.pop("preset", None)
        if base is not None:
            if preset is not None:
                raise ValueError("cosmic options take 'config' or 'preset', not both")
            if not isinstance(base, CosmicConfig):
                raise TypeError(f"cosmic option 'config' must be a CosmicConfig; got {type(base).__name__}")
            return dataclasses.replace(base, **options)
        return cls.preset(preset or "default", **options)

    def to_options(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly) that :meth:`from_options` turns back into this config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> CosmicConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def reads_e_out(self) -> bool:
        """Whether CDG compares readings with the output's efficiency ``E_out`` (seed and calibrated;
        prefix CDG and CCE never read it)."""
        return self.cdg in (CDGMode.SEED, CDGMode.CALIBRATED)

    def qci_at(self, width: int | None) -> bool:
        """Whether a qualifying site of output width ``width`` gets a QCI (``qci`` and
        ``width > qci_min_width``).

        Example:
            >>> cfg = CosmicConfig(qci_min_width=511)
            >>> cfg.qci_at(512), cfg.qci_at(64)
            (True, False)
        """
        return self.qci and width is not None and width > self.qci_min_width

    @property
    def hooks_enabled(self) -> bool:
        return self.cdg is not CDGMode.OFF or self.cce is not CCEMode.OFF or self.cce_fused is not CCEFused.OFF


def _regex_tuple(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"CosmicConfig.{field} must be a list of regex strings; got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"CosmicConfig.{field}: {pattern!r} is not a valid regex ({err})") from None
    return tuple(value)
