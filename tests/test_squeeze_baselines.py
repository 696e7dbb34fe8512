"""Feature squeezers, JPEG and TVM: shape and range, and agreement with scipy, OpenCV and ART."""
import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch
from art.defences.preprocessor import TotalVarMin

from lib.defenses.base import Compose
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization, tv_minimize, tv_objective
from lib.defenses.squeeze import BitDepthReduction, MedianFilter, NonLocalMeans, squeezer


def _images(shape=(4, 3, 12, 10), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_bit_depth_is_xu_formula_idempotent_and_quantised():
    x = _images()
    out = BitDepthReduction(3).purify(x)
    assert torch.equal(out, torch.round(x * 7) / 7)
    assert torch.equal(BitDepthReduction(3).purify(out), out)
    assert len(torch.unique(out)) <= 8 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError):
        BitDepthReduction(0)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_median_filter_matches_scipy(size):
    x = _images()
    ours = MedianFilter(size).purify(x).numpy()
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
    np.testing.assert_allclose(ours, ref, atol=0)


def test_median_filter_keeps_constants_and_passes_gradients():
    assert torch.equal(MedianFilter(2).purify(torch.full((2, 1, 5, 5), 0.3)), torch.full((2, 1, 5, 5), 0.3))
    x = _images().requires_grad_(True)
    MedianFilter(3).purify(x).sum().backward()
    assert x.grad.abs().sum() > 0 and MedianFilter.differentiable


def test_median_filter_rejects_bad_input():
    with pytest.raises(ValueError):
        MedianFilter(2).purify(torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        MedianFilter(2).purify(torch.rand(1, 1, 8, 8) * 2)


def test_non_local_means_matches_opencv_in_colour_and_grey():
    x = _images((2, 3, 16, 16))
    out = NonLocalMeans(h=10).purify(x)
    img = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ref = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(img[:, :, ::-1]), None, 10, 10, 3, 13)[:, :, ::-1]
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy() * 255, ref, atol=1e-3)
    grey = _images((2, 1, 16, 16))
    out = NonLocalMeans(h=10).purify(grey)
    ref = cv2.fastNlMeansDenoising((grey[1, 0].numpy() * 255).round().astype(np.uint8), None, 10, 3, 13)
    np.testing.assert_allclose(out[1, 0].numpy() * 255, ref, atol=1e-3)
    assert out.shape == grey.shape and not NonLocalMeans.differentiable
    with pytest.raises(ValueError):
        NonLocalMeans(template_window=4)


def test_squeezer_specs_compose():
    chain = squeezer("bit5+median2")
    assert isinstance(chain, Compose) and not chain.differentiable
    x = _images()
    assert torch.equal(chain.purify(x), MedianFilter(2).purify(BitDepthReduction(5).purify(x)))
    assert isinstance(squeezer("median3"), MedianFilter)
    with pytest.raises(ValueError, match="unknown squeezer"):
        squeezer("blur3")


def test_jpeg_keeps_shape_and_range_and_quality_orders_error():
    x = _images((3, 3, 32, 32))
    errors = []
    for quality in (10, 90):
        out = JPEGCompression(quality).purify(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        errors.append((out - x).abs().mean().item())
    assert errors[0] > errors[1] > 0
    with pytest.raises(ValueError):
        JPEGCompression(0)


def test_tvm_reaches_arts_objective_on_the_same_masks(digits_split):
    x = digits_split["x_test"][:24]
    keep = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    ours = tv_objective(tv_minimize(x, keep), x, keep, 0.5).squeeze(1)
    art = TotalVarMin(prob=0.3, lamb=0.5, max_iter=10)
    theirs = np.stack([art._minimize(xi.permute(1, 2, 0).numpy(), ki.permute(1, 2, 0).numpy().astype(int))
                       for xi, ki in zip(x, keep)])
    theirs = tv_objective(torch.from_numpy(theirs).permute(0, 3, 1, 2).float().clamp(0, 1), x, keep, 0.5).squeeze(1)
    assert (ours <= theirs * 1.001).all()


def test_tvm_is_seeded_randomised_and_in_range():
    x = _images((2, 1, 12, 12))
    a = TotalVariationMinimization(seed=3)
    b = TotalVariationMinimization(seed=3)
    first, second = a.purify(x), a.purify(x)
    assert torch.equal(first, b.purify(x)) and not torch.equal(first, second)
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert TotalVariationMinimization.randomized and not TotalVariationMinimization.differentiable
    with pytest.raises(ValueError):
        TotalVariationMinimization(keep_prob=0)
