import torch
from tests import test_steps as t
for preset in ("default","fast","seed"):
    a, pa, _ = t.run(preset, "eager", 1, watch=False)
    b, pb, _ = t.run(preset, "eager", 4, watch=False)
    print(preset, a.steps, b.steps, len(a.freeze_events), len(b.freeze_events), max(float((pa[n]-pb[n]).abs().max()) for n in pa))
