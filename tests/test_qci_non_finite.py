"""Identity QCI is exact for non-finite inputs too (issue 16 item 6): +inf came out as NaN (the dense
and low-rank forms made the whole row NaN, the diagonal form the element). A row with a non-finite
feature now passes through every form as it went in, eagerly and compiled."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig, DiagonalQCI, LowRankQCI, QuantumClassicalInterface

FORMS = {"dense": QuantumClassicalInterface, "lowrank": LowRankQCI, "diagonal": DiagonalQCI}
INF, NAN = float("inf"), float("nan")


def make(form: str, dim: int, **kwargs):
    if form == "lowrank":
        kwargs["rank"] = 2
    return FORMS[form](dim, **kwargs)


def rows_with_non_finite(feature_dim: int) -> torch.Tensor:
    x = torch.tensor([[INF, 1.0, 2.0, 3.0], [NAN, -INF, 0.0, 1.0], [0.5, -1.0, 2.0, 3.0], [-INF, 4.0, 5.0, 6.0]])
    return x if feature_dim == -1 else x.T.reshape(1, 4, 2, 2)  # channels: the same 4 rows, as pixels


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("feature_dim", [-1, -3], ids=["linear", "conv"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_identity_qci_returns_non_finite_inputs_as_they_went_in(form, feature_dim):
    torch.manual_seed(0)
    qci = make(form, 4, feature_dim=feature_dim)
    x = rows_with_non_finite(feature_dim)
    same(qci(x), x)
    same(torch.compile(qci, backend="aot_eager", fullgraph=True)(x), x)
    torch._dynamo.reset()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_any_init_passes_a_non_finite_row_through_and_computes_the_others(form):
    torch.manual_seed(0)
    qci = make(form, 4, init="seed")
    x = rows_with_non_finite(-1)
    out = qci(x)
    same(out[[0, 1, 3]], x[[0, 1, 3]])  # the rows with a non-finite feature
    same(out[2], qci(x[2:3])[0])  # a finite row is computed as it is alone
    assert not torch.equal(out[2], x[2])  # (a seed-init QCI does change it)
    out.sum().backward()  # the graph stays differentiable


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_transformed_model_has_the_models_nan_inf_pattern(form):
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[0].weight[0, 0] = 10.0  # feature 0 overflows to inf for a large first input, the others do not
        model[0].bias.zero_()
    x = torch.tensor([[1e38, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    ref = model[0](x)
    assert ref[0, 0] == INF and ref[0, 1:].isfinite().all() and ref[1].isfinite().all()
    tm = cosmic_fx.transform(model, CosmicConfig(qci_form=form, csc="none"))
    same(tm(x), model(x))  # the QCI after the first Linear kept its inf (no NaN row), as the plain model
    hidden = {}
    tm.cosmic_qci.get_submodule("0").register_forward_hook(lambda m, a, out: hidden.setdefault("out", out))
    tm(x)
    same(hidden["out"], ref)
