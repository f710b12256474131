"""The cosmic rewrite passes (installed as ``cosmic_fx.passes``).

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase``: calling it on a ``GraphModule`` returns a
``PassResult(graph_module, modified)``; a second run changes nothing; rewrites are counted in
``torch._dynamo.utils.counters["cosmic_fx"]``.
"""

from .insert_csc import InsertCSC
from .insert_qci import InsertQCI

__all__ = ["InsertCSC", "InsertQCI"]
