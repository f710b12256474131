"""``cosmic-fx bench presets``: default vs seed vs plain SGD on digits, with every mechanism alone.

The table behind README's "Default vs seed": digits MLP and CNN, 30 epochs, plain SGD (lr 0.1,
batch 32), several seeds; test error as mean ± standard deviation over seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tabulate import tabulate

from ..config import CosmicConfig
from .common import fmt, mean_std, progress, write_results

ARMS: dict[str, CosmicConfig | None] = {
    "plain SGD": None,
    "cosmic default": CosmicConfig(),
    "cosmic seed": CosmicConfig.seed(),
    "QCI alone (identity init)": CosmicConfig.off(qci=True),
    "QCI alone (seed init)": CosmicConfig.off(qci=True, qci_init="seed"),
    "CSC alone (output)": CosmicConfig.off(csc="output"),
    "CDG alone (seed)": CosmicConfig.off(cdg="seed", efficiency_every=1),
    "CDG alone (calibrated)": CosmicConfig.off(cdg="calibrated"),
    "CCE alone (seed)": CosmicConfig.off(cce="seed", efficiency_every=1),
    "CCE alone (relative)": CosmicConfig.off(cce="relative"),
}
QUICK_ARMS = ("plain SGD", "cosmic default", "cosmic seed")

# The search that chose the default's CDG/CCE forms (`cosmic-fx bench presets --search`): each form
# alone, everything else off, against plain SGD.
_OFF = CosmicConfig.off
SEARCH_ARMS: dict[str, CosmicConfig | None] = {
    "plain SGD": None,
    "CDG seed (skip p when E(p) < E_out, every step)": _OFF(cdg="seed", efficiency_every=1),
    "CDG calibrated, cap 50%, interval 20": _OFF(cdg="calibrated", cdg_max_frozen=0.5, cdg_interval=20),
    "CDG calibrated, cap 25%, interval 20": _OFF(cdg="calibrated", cdg_max_frozen=0.25, cdg_interval=20),
    "CDG calibrated, cap 25%, interval 50": _OFF(cdg="calibrated", cdg_max_frozen=0.25, cdg_interval=50),
    "CDG calibrated, cap 12.5%, interval 50 (default)": _OFF(cdg="calibrated"),
    "CDG calibrated, cap 12.5%, output layer not protected": _OFF(cdg="calibrated", cdg_protect_output=False),
    "CCE seed (grad * E(p), every step)": _OFF(cce="seed", efficiency_every=1),
    "CCE relative, gamma 0.5": _OFF(cce="relative", cce_gamma=0.5),
    "CCE relative, gamma 1 (default)": _OFF(cce="relative"),
    "CCE relative, gamma 2": _OFF(cce="relative", cce_gamma=2.0),
    "CCE relative, gamma 2, clamp [0.25, 4]": _OFF(cce="relative", cce_gamma=2.0, cce_min=0.25, cce_max=4.0),
    "cosmic default (all four)": CosmicConfig(),
}


def run(
    seeds: int = 3,
    epochs: int = 30,
    engine: str = "eager",
    quick: bool = False,
    out_dir: str | None = None,
    show_progress: bool = True,
    search: bool = False,
) -> dict[str, Any]:
    """Train every arm on both tasks; return the rows and print-ready markdown.

    With ``search=True`` the arms are :data:`SEARCH_ARMS`, the calibrated forms that were tried.
    """
    import torch

    from ..data import load_digits
    from ..models import DigitsCNN, DigitsMLP
    from ..training import Arm, train_classifier

    torch.set_num_threads(max(1, torch.get_num_threads()))
    arms = dict(SEARCH_ARMS) if search else {k: v for k, v in ARMS.items() if not quick or k in QUICK_ARMS}
    tasks = {"MLP": (DigitsMLP, load_digits()), "CNN": (DigitsCNN, load_digits(image=True))}
    results: dict[str, dict[str, list]] = {a: {} for a in arms}
    total = len(arms) * len(tasks) * seeds * epochs
    with progress(total, "bench presets", show_progress) as bar:
        for task, (factory, data) in tasks.items():
            for name, cfg in arms.items():
                runs = []
                for seed in range(seeds):
                    bar.set_postfix_str(f"{task} / {name} / seed {seed}")
                    if cfg is not None and engine == "compile":
                        cfg = dataclasses.replace(cfg, lower="aot_eager")
                    arm = Arm(name, cfg, engine=engine)
                    runs.append(train_classifier(factory, data, arm, epochs=epochs, seed=seed, progress=bar.update))
                results[name][task] = runs
    headers = ["arm"]
    for task in tasks:
        headers += [f"{task} test error %", f"{task} Δ vs plain", f"{task} frozen/skipped", f"{task} CCE-scaled"]
    rows, payload = [], {}
    base = {t: mean_std([r.final_error for r in results["plain SGD"][t]])[0] for t in tasks}
    for name in arms:
        row = [name]
        payload[name] = {}
        for task in tasks:
            runs = results[name][task]
            errs = [r.final_error for r in runs]
            frozen = mean_std([r.frozen_fraction for r in runs])[0]
            scaled = mean_std([r.scaled_fraction for r in runs])[0]
            row += [fmt(errs), f"{mean_std(errs)[0] - base[task]:+.2f}", f"{100 * frozen:.0f}%", f"{100 * scaled:.0f}%"]
            payload[name][task] = {"test_error": errs, "frozen_fraction": frozen, "scaled_fraction": scaled}
        rows.append(row)
    markdown = tabulate(rows, headers=headers, tablefmt="github")
    write_results(out_dir, "presets_search" if search else "presets", markdown, payload)
    return {"markdown": markdown, "results": payload, "seeds": seeds, "epochs": epochs, "engine": engine}
