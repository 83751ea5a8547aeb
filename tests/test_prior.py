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


def test_min_support_keeps_one_images_collar_out_of_the_corpus_prior():
    """A patch only one image sees (a collar under the chin) is not that image's colour in
    the prior when ``min_support`` asks for two; a one-image corpus is its own prior."""
    from facecorpus.tasks.prior import robust_mean_texture

    T, n = 32, 3
    vis = np.full((n, T, T, 3), 0.6, np.float32)
    msk = np.zeros((n, T, T), bool)
    msk[:, 4:20, 4:28] = True
    msk[0, 20:26, 8:24] = True  # only image 0 sees below the chin, and sees a collar there
    vis[0, 20:26, 8:24] = 0.95
    one = robust_mean_texture(vis, msk, min_support=1).mean
    two = robust_mean_texture(vis, msk, min_support=2).mean
    assert np.allclose(one[22, 16], 0.95, atol=1e-3)
    assert np.allclose(two[22, 16], 0.6, atol=0.02)
    assert np.allclose(two[10, 10], one[10, 10])  # texels several images see: unchanged
    solo = robust_mean_texture(vis[:1], msk[:1], min_support=2).mean
    assert np.allclose(solo[22, 16], 0.95, atol=1e-3)
