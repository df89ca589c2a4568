"""detkit.study.probes: deformable RoI pooling changed at inference, and put back."""
import pytest
import torch
from torch import nn

from detkit.study.probes import roi_pool_probe
from detkit.ops import DeformRoIPool, deform_roi_pool
from tests.helpers import generator, normal, random_rois


class Head(nn.Module):
    """A model-like holder: the probe finds the pooler among its submodules."""

    def __init__(self, modulated: bool):
        super().__init__()
        torch.manual_seed(3)
        self.pool = DeformRoIPool(3, output_size=3, spatial_scale=0.5, sampling_ratio=2, gamma=0.1,
                                  modulated=modulated, hidden_dim=16).double()
        with torch.no_grad():  # a trained pooler: offsets and bin weights away from their zero start
            last = self.pool.offset_branch[-1]
            last.weight.copy_(normal(tuple(last.weight.shape), generator(4), std=0.5))
            last.bias.copy_(normal(tuple(last.bias.shape), generator(5), std=1.0))


def inputs():
    gen = generator(6)
    return normal((2, 3, 8, 10), gen), random_rois(gen, 6, 2, 16, 20, 2.0, 14.0)


def pooled_with(pool, x, rois, offset, mask):
    return deform_roi_pool(x, rois, offset, mask, pool.output_size, pool.spatial_scale, pool.sampling_ratio,
                           pool.gamma)


@pytest.mark.parametrize("modulated", [False, True], ids=["deform", "mdeform"])
def test_no_offsets_pools_at_the_roi_align_bins_and_keeps_the_mask(modulated):
    head, (x, rois) = Head(modulated), inputs()
    offset, mask = head.pool.predict_offsets(x, rois)
    assert offset.abs().max() > 0.1
    trained = head.pool(x, rois)
    with roi_pool_probe(head, "no_offsets") as count:
        probed = head.pool(x, rois)
    assert count == 1
    torch.testing.assert_close(probed, pooled_with(head.pool, x, rois, torch.zeros_like(offset), mask))
    assert (probed - trained).abs().max() > 1e-3
    torch.testing.assert_close(head.pool(x, rois), trained)  # put back


def test_mask_roi_mean_keeps_each_rois_mean_weight():
    head, (x, rois) = Head(True), inputs()
    offset, mask = head.pool.predict_offsets(x, rois)
    assert mask.flatten(1).std(1).min() > 1e-3  # the bins are weighed differently
    with roi_pool_probe(head, "mask_roi_mean"):
        probed = head.pool(x, rois)
    per_roi = mask.mean(dim=(1, 2, 3), keepdim=True).expand_as(mask)
    torch.testing.assert_close(probed, pooled_with(head.pool, x, rois, offset, per_roi))
    assert (probed - head.pool(x, rois)).abs().max() > 1e-4


def test_mask_batch_mean_weighs_every_bin_alike():
    head, (x, rois) = Head(True), inputs()
    offset, mask = head.pool.predict_offsets(x, rois)
    with roi_pool_probe(head, "mask_batch_mean"):
        probed = head.pool(x, rois)
    unweighted = pooled_with(head.pool, x, rois, offset, None)
    torch.testing.assert_close(probed, unweighted * mask.mean())


def test_the_pooler_is_put_back_when_the_block_raises():
    head, (x, rois) = Head(True), inputs()
    trained = head.pool(x, rois)
    with pytest.raises(RuntimeError, match="inside"):
        with roi_pool_probe(head, "no_offsets"):
            raise RuntimeError("inside")
    assert "predict_offsets" not in vars(head.pool)
    torch.testing.assert_close(head.pool(x, rois), trained)


def test_none_changes_nothing():
    head, (x, rois) = Head(True), inputs()
    trained = head.pool(x, rois)
    with roi_pool_probe(head, None) as count:
        torch.testing.assert_close(head.pool(x, rois), trained)
    assert count == 0


@pytest.mark.parametrize("make_model, probe, message", [
    (lambda: Head(True), "offsets", r"roi_pool_probe must be one of .*no_offsets.*got 'offsets'"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), "no_offsets",
     r"roi_pool_probe='no_offsets': the model has no deformable RoI"),
    (lambda: Head(False), "mask_roi_mean", r"roi_pool_probe='mask_roi_mean' changes the bin weights .* not modulated"),
], ids=["unknown", "no-deformable-pooling", "mask-on-unmodulated"])
def test_bad_probe_is_refused_before_anything_changes(make_model, probe, message):
    model = make_model()  # built in the test, so collecting the module draws no random numbers
    with pytest.raises(ValueError, match=message):
        with roi_pool_probe(model, probe):
            pass
    assert not any("predict_offsets" in vars(m) for m in model.modules())
