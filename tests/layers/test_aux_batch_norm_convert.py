"""convert_to_aux_bn on models beyond plain BatchNorm2d layers: converted already, SyncBatchNorm, BatchNorm2d
subclasses, frozen or parametrized BNs, a model that is itself a BN."""

from __future__ import annotations

import pytest
from torch import nn

from tta_norm.layers import convert_to_aux_bn


@pytest.mark.parametrize("kind", ["aux", "saaux"])
def test_a_converted_model_is_refused_unchanged(kind: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert convert_to_aux_bn(model, kind) == ["1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model[1]
    with pytest.raises(ValueError, match=r"convert_to_aux_bn: the model already has AuxBN/SaAuxBN layers \(1\)"):
        convert_to_aux_bn(model, kind)
    assert model[1] is layer and all(type(b) is nn.BatchNorm2d for b in layer.bns)
    assert model.state_dict().keys() == before.keys()
