"""BatchNorm -> GroupNorm converter: the BN's eps, affine and mode carried over; only exact BatchNorms replaced."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tta_norm.layers import GhostBatchNorm2d, convert_to_group_norm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_plain_batchnorm_becomes_a_group_norm_with_its_affine():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 6), nn.BatchNorm1d(6, affine=False))  # fmt: skip
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(8, generator=_gen(0)) + 0.5)
        model[1].bias.copy_(torch.randn(8, generator=_gen(1)))
    model[1].eval()
    weight, bias = model[1].weight.clone(), model[1].bias.clone()
    out = convert_to_group_norm(model, lambda c: c // 2)
    assert out is model
    gn, gn1d = model[1], model[5]
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels, gn.eps) == (4, 8, 1e-3)
    assert torch.equal(gn.weight, weight) and torch.equal(gn.bias, bias) and not gn.training
    assert isinstance(gn1d, nn.GroupNorm) and gn1d.num_groups == 3 and not gn1d.affine and gn1d.training
    x = torch.randn(5, 3, 6, 6, generator=_gen(2))
    h = model[0](x)
    expect = nn.functional.group_norm(h, 4, weight, bias, 1e-3)
    torch.testing.assert_close(gn(h), expect, rtol=0, atol=0)
    assert model(x).shape == (5, 6)


def test_fresh_affine_when_not_copied_and_the_model_itself_converted():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0)
    gn = convert_to_group_norm(bn, 2, copy_affine=False)
    assert isinstance(gn, nn.GroupNorm) and torch.equal(gn.weight, torch.ones(4))


def test_other_batchnorms_are_left_with_a_warning_and_groups_must_divide():
    model = nn.Sequential(nn.BatchNorm2d(4), GhostBatchNorm2d(4, 2), nn.SyncBatchNorm(4))
    with pytest.warns(UserWarning, match=r"convert_to_group_norm: left unchanged .*1 \(GhostBatchNorm2d\), 2 \(Sync"):
        convert_to_group_norm(model, 2)
    assert [type(m) for m in model] == [nn.GroupNorm, GhostBatchNorm2d, nn.SyncBatchNorm]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_group_norm(nn.Sequential(nn.ReLU()), 2)  # nothing to convert: no warning
    with pytest.raises(ValueError, match="does not divide"):
        convert_to_group_norm(nn.Sequential(nn.BatchNorm2d(6)), 4)


def test_a_batchnorm_shared_by_two_call_sites_becomes_one_shared_layer():
    import torch
    from torch import nn

    from tta_norm.layers import (
        convert_to_aux_bn,
        convert_to_batch_group_norm,
        convert_to_ghost_bn,
        convert_to_group_norm,
    )

    def shared() -> nn.Sequential:
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(4)
        return nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn)

    for convert, kwargs in ((convert_to_ghost_bn, {"ghost_batch_size": 2}),
                            (convert_to_batch_group_norm, {"num_groups": 2}),
                            (convert_to_group_norm, {"num_groups": 2}), (convert_to_aux_bn, {})):  # fmt: skip
        model = shared()
        out = convert(model, **kwargs)
        model = model if isinstance(out, list) else out
        assert type(model[1]) is not nn.BatchNorm2d and model[4] is model[1], convert.__name__


def test_a_refused_conversion_leaves_the_model_as_it_was():
    from tta_norm.layers import convert_to_batch_group_norm

    for convert in (convert_to_group_norm, convert_to_batch_group_norm):
        model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
        with pytest.raises(ValueError, match="layer '2': num_groups=4 does not divide its 6 channels"):
            convert(model, 4)
        assert [type(m) for m in model] == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d], convert.__name__
