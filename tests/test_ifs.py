import json

import numpy as np
import pytest

from fracgen import FracgenError
from fracgen.ifs import (
    IFS,
    check_sigma,
    determinant_probabilities,
    load_base,
    perturb,
    sample_sigma_system,
    sample_singular_values,
)
from fracgen.rng import uniforms


@pytest.mark.parametrize("n_maps", [1, 2, 3, 5])
def test_singular_value_draws_satisfy_constraints(n_maps):
    rng = np.random.default_rng(n_maps)
    for trial in range(3000):
        a = rng.uniform(1e-3, 3 * n_maps - 1e-3)
        sv = sample_singular_values(a, n_maps, uniforms(trial, 2 * n_maps))
        s1, s2 = sv[:, 0], sv[:, 1]
        assert np.all(s2 >= -1e-12) and np.all(s1 >= s2 - 1e-12) and np.all(s1 <= 1 + 1e-12)
        assert np.sum(s1 + 2 * s2) == pytest.approx(a, abs=1e-9)


@pytest.mark.parametrize("sigma,n_maps", [(3.5, 2), (5.0, 2), (0.5, 2), (6.0, 3), (2.0, 4)])
def test_sampled_systems_hit_sigma_and_contract(sigma, n_maps):
    for seed in range(1000):
        system, a = sample_sigma_system(sigma, n_maps, seed)
        assert sigma - 0.1 <= a <= sigma + 0.1
        sv = np.array([np.linalg.svd(row[:4].reshape(2, 2), compute_uv=False) for row in system.coef])
        assert np.sum(sv[:, 0] + 2 * sv[:, 1]) == pytest.approx(a, abs=1e-9)
        assert np.all(sv[:, 0] < 1)  # every map strictly contractive
        assert np.all(np.abs(system.coef[:, 4:]) <= 1)
        assert system.probabilities.sum() == pytest.approx(1)


def test_sampling_is_deterministic_and_seed_dependent():
    a = sample_sigma_system(3.5, 2, 7)[0].coef
    np.testing.assert_array_equal(a, sample_sigma_system(3.5, 2, 7)[0].coef)
    assert not np.array_equal(a, sample_sigma_system(3.5, 2, 8)[0].coef)


@pytest.mark.parametrize("sigma,n_maps", [(0.1, 2), (0.05, 2), (5.9, 2), (6.0, 2), (-1, 2), (3.0, 1)])
def test_infeasible_sigma_is_refused(sigma, n_maps):
    with pytest.raises(FracgenError, match="infeasible"):
        check_sigma(sigma, n_maps)


def test_probabilities_follow_determinants():
    coef = np.array([[0.5, 0, 0, 0.5, 0, 0], [0.25, 0, 0, 0.5, 1, 1]])
    np.testing.assert_allclose(determinant_probabilities(coef), [2 / 3, 1 / 3])
    with pytest.raises(FracgenError, match="degenerate"):
        determinant_probabilities(np.zeros((2, 6)))


@pytest.mark.parametrize("mode", ["scale", "shift"])
def test_perturbation_ranges(mode):
    base = sample_sigma_system(3.5, 2, 1)[0]
    delta = 0.1
    for seed in range(200):
        system, noise = perturb(base, delta, mode, seed)
        np.testing.assert_array_equal(system.probabilities, base.probabilities)
        if mode == "scale":
            assert np.all(np.abs(noise - 1) <= delta)
            np.testing.assert_allclose(system.coef, base.coef * noise)
        else:
            assert np.all(np.abs(noise) <= delta / 2)
            np.testing.assert_allclose(system.coef, base.coef + noise)
    zero, _ = perturb(base, 0.0, mode, 3)
    np.testing.assert_array_equal(zero.coef, base.coef)


def test_load_base_accepts_ifs_and_manifest(tmp_path):
    base = sample_sigma_system(3.5, 2, 1)[0]
    (tmp_path / "ifs.json").write_text(json.dumps(base.to_json()))
    (tmp_path / "manifest.json").write_text(json.dumps({"base": {"ifs": base.to_json()}}))
    for name in ("ifs.json", "manifest.json"):
        loaded = load_base(tmp_path / name)
        np.testing.assert_array_equal(loaded.coef, base.coef)
        np.testing.assert_allclose(loaded.probabilities, base.probabilities)


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ('{"x": 1}', "no 'maps'"),
                                        ('{"maps": [{"a": 1}]}', "malformed"),
                                        ('{"maps": [{"a":1,"b":0,"c":0,"d":1,"e":0,"f":"x"}]}', "malformed")])
def test_load_base_rejects_malformed(tmp_path, text, match):
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(FracgenError, match=match):
        load_base(tmp_path / "b.json")


def test_ifs_json_roundtrip():
    base = sample_sigma_system(4.2, 3, 9)[0]
    again = IFS.from_json(json.loads(json.dumps(base.to_json())))
    np.testing.assert_array_equal(again.coef, base.coef)
    np.testing.assert_array_equal(again.probabilities, base.probabilities)
