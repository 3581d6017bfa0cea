import numpy as np
import pytest
from reference import render_reference

from fracgen import FracgenError, render
from fracgen.ifs import make_ifs, perturb, sample_sigma_system
from fracgen.rng import derive_seed, mix64, uniforms


def systems():
    yield sample_sigma_system(3.5, 2, 11)[0]
    yield sample_sigma_system(5.0, 3, 12)[0]
    yield perturb(sample_sigma_system(4.0, 2, 13)[0], 0.1, "scale", 99)[0]
    sierpinski = np.array([[0.5, 0, 0, 0.5, 0, 0], [0.5, 0, 0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5, 0.25, 0.5]])
    yield make_ifs(sierpinski)
    # two maps, one never drawn (cut point 2**32: the kernel's general path), and a single map
    yield make_ifs(np.array([[0.6, 0.2, -0.1, 0.5, 0.3, 0.1], [0.5, 0.0, 0.0, 0.5, 0.5, 0.0]]), np.array([1.0, 0.0]))
    yield make_ifs(np.array([[0.4, -0.3, 0.3, 0.4, 0.2, 0.1]]))


@pytest.mark.parametrize("system", list(systems()))
@pytest.mark.parametrize("seed,points,size,pad", [(0, 2000, 64, 6), (123456789, 5000, 96, 4), (7, 1, 32, 6)])
def test_kernel_matches_reference(system, seed, points, size, pad):
    image, fill = render(system, seed, points=points, size=size, pad=pad)
    ref = render_reference(system.coef, system.probabilities, seed, points, size, pad)
    np.testing.assert_array_equal(image, ref)
    assert fill == np.count_nonzero(ref) / size**2
    assert set(np.unique(image)) <= {0, 127}


@pytest.mark.parametrize("system", list(systems()))
def test_png_filter_column_stays_zero_with_the_smallest_pad(system):
    # Patch rows are pasted as 16- and 8-bit stores: at pad 4 the last cell of a row sits right before
    # the next row's filter byte, which must come out 0 and leave the image equal to the reference.
    out = np.full((48, 49), 255, dtype=np.uint8)
    image, _ = render(system, 5, points=20_000, size=48, pad=4, out=out)
    assert not out[:, 0].any()
    np.testing.assert_array_equal(image, render_reference(system.coef, system.probabilities, 5, 20_000, 48, 4))


def test_image_is_pure_function_of_seed():
    s = sample_sigma_system(3.5, 2, 5)[0]
    a, _ = render(s, 42, points=20_000, size=128)
    b, _ = render(s, 42, points=20_000, size=128)
    c, _ = render(s, 43, points=20_000, size=128)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_default_render_fills_canvas_edges():
    s = sample_sigma_system(3.5, 2, 5)[0]
    image, fill = render(s, 1)
    assert image.shape == (512, 512) and image.dtype == np.uint8
    rows, cols = np.nonzero(image)
    # per-axis rescale onto [pad, size - pad], the 3x3 patch pasted at (x + 1, y + 1), flipped top to bottom
    assert cols.min() == 7 and cols.max() <= 509 and rows.min() >= 2 and rows.max() == 504
    assert 0 < fill < 1


def test_diverging_system_gives_empty_image():
    s = make_ifs(np.array([[1.5, 0, 0, 1.5, 1, 1], [1.7, 0.1, 0, 1.6, -1, 0]]))
    image, fill = render(s, 0, points=100_000, size=64)
    assert fill == 0.0 and not image.any()


def test_render_rejects_bad_canvas():
    s = sample_sigma_system(3.5, 2, 5)[0]
    with pytest.raises(FracgenError, match="too small"):
        render(s, 0, size=16, pad=6)
    with pytest.raises(FracgenError, match="pad must be at least 4"):
        render(s, 0, size=64, pad=1)


def test_rng_matches_python_definition():
    u = uniforms(2024, 5)
    for n in range(5):
        from reference import splitmix

        assert u[n] == (splitmix(2024, n + 1) >> 11) / 2.0**53
    assert derive_seed(1, 2, 3) != derive_seed(1, 3, 2)
    assert mix64(0) == 0  # SplitMix64's finaliser fixes 0: seeds are offset before mixing
