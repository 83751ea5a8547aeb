"""tasks.prior.masked_median: the robust mean's per-texel median is nanmedian bit for bit."""

import warnings

import numpy as np
import pytest
from facecorpus.tasks.prior import masked_median, robust_mean_texture


def _reference(values, mask, gains):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.where(mask[..., None], values * gains[:, None, None, :],
                                     np.nan), axis=0)


@pytest.mark.parametrize("gain_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 13])
def test_masked_median_equals_nanmedian(n, gain_dtype):
    # float32 gains are what robust_mean_texture makes from float32 maps: the products and
    # the median are float32 then, and must round as numpy's do
    rng = np.random.default_rng(n)
    values = rng.random((n, 24, 24, 3)).astype(np.float32)
    values[..., 0] = np.round(values[..., 0] * 4) / 4  # ties
    mask = rng.random((n, 24, 24)) < 0.6
    mask[:, :2] = False  # texels nobody sees
    values[0, 5, 5, 1] = np.nan  # a NaN where seen: skipped, as nanmedian does
    mask[0, 5, 5] = True
    gains = (rng.random((n, 3)) + 0.5).astype(gain_dtype)
    got = masked_median(values, mask, gains)
    ref = _reference(values, mask, gains)
    assert got.dtype == ref.dtype == np.dtype(gain_dtype) and got.shape == (24, 24, 3)
    assert np.isnan(got[:2]).all()
    np.testing.assert_array_equal(got, ref)


def test_robust_mean_rejects_an_outlier_image():
    rng = np.random.default_rng(0)
    truth = np.full((16, 16, 3), 0.5, np.float32)
    stack = np.repeat(truth[None], 5, 0) + rng.normal(0, 0.01, (5, 16, 16, 3)).astype(np.float32)
    stack[0, 4:8, 4:8] = 0.0  # one image's occluder: the median ignores it
    prior = robust_mean_texture(stack, np.ones((5, 16, 16), bool))
    assert np.abs(prior.mean[4:8, 4:8] - 0.5).max() < 0.03
