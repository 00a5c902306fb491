"""The public model matrix (`families.FAMILIES`): per family, the MLP blocks data-flow discovery finds;
with slopes 1 and biases, norms and LayerScale gammas randomised, `collapse` keeps the output (a
`Conv1D` stays a `Conv1D`, a 1x1 conv a 1x1 conv, state-dict keys of the other layers kept) and an
export (external data, fused from another working directory) collapses every MLP within rel. L2 1e-5
of torch. Each family runs with its default exporter in the default test run, with the other under
`-m slow`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from tests.torch import matrix  # noqa: E402
from tests.torch.families import DYNAMO, FAMILIES, TORCHSCRIPT  # noqa: E402


def _cases():
    for family in FAMILIES:
        for exporter in (DYNAMO, TORCHSCRIPT):
            marks = [] if exporter == family.default else [pytest.mark.slow]
            if exporter in family.xfail:
                marks.append(pytest.mark.xfail(reason=family.xfail[exporter], strict=True))
            yield pytest.param(family, exporter, marks=marks, id=f"{family.id}-{exporter}")


@pytest.mark.parametrize(("family", "exporter"), list(_cases()))
def test_family_collapses_in_torch_and_in_its_export(tmp_path, family, exporter):
    result = matrix.run(family, exporter, tmp_path)
    assert result.blocks == family.blocks
    assert len(result.torch_layers) == family.sites
    assert result.torch_error <= matrix.TOL
    assert result.kinds_kept and result.keys_kept
    assert (result.sites, result.exact, result.prelus_left) == (family.sites, True, 0)
    assert result.onnx_error <= matrix.TOL
    assert result.external_data and result.workdir_empty
