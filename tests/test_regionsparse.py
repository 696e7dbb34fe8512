"""RegionSparse (paper 002): batched OMP vs scikit-learn, patches, dictionaries, localiser, the composed defense,
the evaluation protocol's strength calibration, and the activation / CAM analysis."""
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from lib.activations import (activation_grid, activation_ratios, cam, channel_max_activations, class_activation_map,
                             grad_cam, total_activation)
from lib.attacks import mi_fgsm_at_l2, normalized_l2, scale_to_normalized_l2
from lib.defenses.regionsparse import (RegionSparse, RegionSparseConfig, batch_omp, bilateral, dct_dictionary,
                                       extract_patches, fold_patches, learn_dictionary, localize, support_projection,
                                       zscore_cols)
from lib.defenses.regionsparse.evaluation import bim_steps, eliminated_share, split_counts
from lib.models import build_classifier

TINY = RegionSparseConfig(patch_size=3, n_atoms=16, sparsity=2, dict_epochs=1, patches_per_image=40, stride=1,
                          nlm_template=3, nlm_search=5, bilateral_d=3, bilateral_sigma_space=2.0, loc_scale=0.2)


def _random_dictionary(k=32, d=16, seed=0):
    rng = np.random.RandomState(seed)
    atoms = rng.randn(k, d)
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def _square_image(size=32, lo=0.3, hi=0.9, box=(10, 22, 8, 20)):
    img = torch.full((1, 3, size, size), lo)
    y0, y1, x0, x1 = box
    img[:, :, y0:y1, x0:x1] = hi
    return img


def test_batch_omp_matches_sklearn_and_respects_sparsity():
    atoms = _random_dictionary()
    signals = np.random.RandomState(1).randn(300, 16)
    ours = batch_omp(torch.from_numpy(signals), torch.from_numpy(atoms), 4).numpy()
    ref = orthogonal_mp(atoms.T, signals.T, n_nonzero_coefs=4).T
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert (np.count_nonzero(ours, axis=1) <= 4).all()


def test_batch_omp_codes_a_single_atom_exactly():
    atoms = _random_dictionary()
    signal = torch.from_numpy(2.5 * atoms[[7]])
    codes = batch_omp(signal, torch.from_numpy(atoms), 3)
    expected = np.zeros((1, 32))
    expected[0, 7] = 2.5
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-10)


def test_batch_omp_is_faster_than_sklearn_patch_by_patch():
    atoms = _random_dictionary(64, 25)
    signals = np.random.RandomState(2).randn(3000, 25)
    t0 = time.perf_counter()
    ref = orthogonal_mp(atoms.T, signals.T, n_nonzero_coefs=3).T
    t_sk = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = batch_omp(torch.from_numpy(signals), torch.from_numpy(atoms), 3).numpy()
    t_ours = time.perf_counter() - t0
    print(f"OMP speed-up over sklearn.orthogonal_mp: {t_sk / t_ours:.1f}x ({t_sk:.2f}s vs {t_ours:.3f}s)")
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert t_sk / t_ours >= 4.0


def test_batch_omp_rejects_bad_shapes():
    with pytest.raises(ValueError, match="signals"):
        batch_omp(torch.zeros(3, 5), torch.zeros(4, 6), 2)
    with pytest.raises(ValueError, match="sparsity"):
        batch_omp(torch.zeros(3, 5), torch.zeros(4, 5), 9)


@pytest.mark.parametrize("stride", [1, 2])
def test_extract_then_fold_is_identity(stride):
    x = torch.rand(2, 3, 11, 11)
    img, cover = fold_patches(extract_patches(x, 3, stride), (11, 11), 3, stride)
    torch.testing.assert_close(img, x)
    assert (cover > 0).all()


def test_zscore_round_trip():
    p = np.random.RandomState(0).rand(50, 9) * 3 + 1
    z, mu, sd = zscore_cols(p)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z * sd + mu, p, atol=1e-12)


def test_dictionaries_have_unit_norm_atoms(digits_split):
    x = torch.nn.functional.interpolate(digits_split["x_train"][:6], size=16, mode="bilinear").clamp(0, 1)
    learnt = learn_dictionary(x, TINY)
    assert learnt.shape == (16, 9)
    np.testing.assert_allclose(np.linalg.norm(learnt, axis=1), 1.0, atol=1e-6)
    dct = dct_dictionary(64, 5)
    np.testing.assert_allclose(np.linalg.norm(dct, axis=1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        dct_dictionary(60, 5)


def test_localiser_covers_a_single_object_and_falls_back_on_flat_images():
    img = _square_image()[0].permute(1, 2, 0).numpy()
    (y0, y1, x0, x1), fallback = localize(img, scale=0.2)
    assert not fallback
    assert 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32
    assert y0 <= 10 and y1 >= 22 and x0 <= 8 and x1 >= 20          # the mask covers the object
    assert (y1 - y0) * (x1 - x0) < 0.6 * 32 * 32                     # ... and not the whole frame
    box, fallback = localize(np.full((32, 32, 3), 0.5, np.float32))
    assert fallback and box == (0, 32, 0, 32)


def test_region_sparse_output_shape_range_and_composition():
    x = (_square_image() + 0.05 * torch.randn(1, 3, 32, 32)).clamp(0, 1).repeat(2, 1, 1, 1)
    rs = RegionSparse(TINY, dictionary=_random_dictionary(16, 9))
    out = rs.purify(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    mask, _ = rs.region_masks(x)
    assert 0 < mask.mean() < 1
    outside = mask == 0
    torch.testing.assert_close(out[outside.expand_as(x)], bilateral(x, 3, 50.0, 2.0)[outside.expand_as(x)])
    inside = mask.expand_as(x) > 0
    assert not torch.allclose(out[inside], x[inside])                 # the region was sparse-coded
    nobs = RegionSparse(TINY.variant("noBS"), dictionary=_random_dictionary(16, 9)).purify(x)
    torch.testing.assert_close(nobs[outside.expand_as(x)], x[outside.expand_as(x)])
    torch.testing.assert_close(rs.purify(x), out)                     # deterministic


def test_bpda_approximation_has_purifys_value_and_straight_through_background():
    x = (_square_image() + 0.05 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    rs = RegionSparse(TINY, dictionary=_random_dictionary(16, 9))
    inputs = x.clone().requires_grad_(True)
    approx = rs.bpda_purify(inputs)
    torch.testing.assert_close(approx, rs.purify(x), atol=1e-5, rtol=0)
    weights = torch.randn_like(approx)
    (grad,) = torch.autograd.grad((approx * weights).sum(), inputs)
    outside = (rs.region_masks(x)[0] == 0).expand_as(x)
    assert torch.isfinite(grad).all() and grad[~outside].abs().sum() > 0
    torch.testing.assert_close(grad[outside], weights[outside])       # bilateral background: identity backward
    signals = torch.randn(50, 9, dtype=torch.float64)
    atoms = torch.as_tensor(_random_dictionary(16, 9))
    torch.testing.assert_close(support_projection(signals, atoms, 3), batch_omp(signals, atoms, 3) @ atoms)


def test_bpda_approximation_is_the_exact_derivative_while_omps_support_holds():
    """Region = whole image, no background filter: RS is then OMP coding alone, and the approximation's directional
    derivative equals purify's finite difference (steps too small to change the chosen atoms)."""
    x = 0.1 + 0.8 * torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = RegionSparseConfig(patch_size=3, n_atoms=16, sparsity=2, region="full", background="identity")
    rs = RegionSparse(cfg, dictionary=_random_dictionary(16, 9)).double()
    direction, weights = torch.randn_like(x), torch.randn_like(x)
    inputs = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((rs.bpda_purify(inputs) * weights).sum(), inputs)
    h = 1e-6
    finite = ((rs.purify(x + h * direction) - rs.purify(x - h * direction)) * weights).sum() / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), finite, rtol=1e-5, atol=1e-6)


def test_the_benchmark_attacks_region_sparse_through_its_approximation_and_identity_bpda(digits_model, digits_batch):
    from lib.evaluate import AttackSpec, threat_outcomes

    x, y = digits_batch[0][:8], digits_batch[1][:8]
    rs = RegionSparse(replace(TINY, loc_scale=0.5), dictionary=_random_dictionary(16, 9))
    rows, _ = threat_outcomes(digits_model, {"rs": rs}, x, y, [AttackSpec("fgsm", {"eps": 0.2})], threats=("white",),
                              use_cache=False)
    assert dict(zip(rows.threat, rows.gradient)) == {"white": "BPDA-approx", "white-identity": "BPDA"}


def test_region_sparse_needs_a_dictionary_and_valid_settings():
    with pytest.raises(ValueError, match="dictionary"):
        RegionSparse(TINY).purify(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="region"):
        RegionSparseConfig(region="everything")
    with pytest.raises(ValueError, match="variant"):
        TINY.variant("noXY")


def test_dictionary_learning_is_deterministic(digits_split):
    x = torch.nn.functional.interpolate(digits_split["x_train"][:6], size=16, mode="bilinear").clamp(0, 1)
    np.testing.assert_array_equal(learn_dictionary(x, TINY), learn_dictionary(x, TINY))


def test_stages_are_images_of_the_input_shape_and_compose_the_output():
    x = (_square_image() + 0.05 * torch.randn(1, 3, 32, 32)).clamp(0, 1).repeat(2, 1, 1, 1)
    rs = RegionSparse(TINY, dictionary=_random_dictionary(16, 9))
    stages = rs.stages(x)
    assert list(stages) == ["mask", "bilateral background", "sparse-coded region"]
    assert all(v.shape == x.shape for v in stages.values())
    m = stages["mask"]
    composed = (m * stages["sparse-coded region"] + (1 - m) * stages["bilateral background"]).clamp(0, 1)
    torch.testing.assert_close(composed, rs.purify(x))
    assert not rs.differentiable and not rs.randomized and rs.bpda_purify is not None


def test_scale_to_normalized_l2_hits_the_target():
    x = torch.rand(8, 1, 8, 8) * 0.5 + 0.25
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    scaled, tau, got = scale_to_normalized_l2(x, x_adv, 0.1)
    assert tau >= 1 and abs(got - 0.1) < 1e-3 and abs(normalized_l2(x, scaled) - got) < 1e-9


def test_total_activation_is_the_sum_above_gamma():
    p = torch.tensor([[0.0, 0.4, 1.2, -0.3, 2.0]])
    for gamma in (0.0, 0.5, 1.0):
        assert float(total_activation(p, gamma)) == pytest.approx(float(p[p > gamma].sum()))


def _gap_model():
    torch.manual_seed(0)
    return build_classifier("smallcnn", num_classes=4, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,),
                            width=0.25).eval()


def test_cam_equals_the_explicit_weighted_sum_and_lies_in_unit_range():
    model = _gap_model()
    x = torch.rand(3, 1, 8, 8)
    maps = class_activation_map(model, x)
    assert maps.shape == (3, 8, 8) and maps.min() >= 0 and maps.max() <= 1
    feats = model.body.layers[:-2](model.normalize(x))                  # maps before the global pool
    cls = model(x).argmax(1)
    explicit = torch.relu(torch.einsum("nk,nkhw->nhw", model.head.weight[cls], feats))
    explicit = torch.nn.functional.interpolate(explicit[:, None], size=(8, 8), mode="bilinear")[:, 0]
    lo, hi = explicit.flatten(1).amin(1).view(-1, 1, 1), explicit.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(maps, (explicit - lo) / (hi - lo))
    assert cam(model, x)[1] == "CAM"
    g = grad_cam(model, x)
    assert g.shape == (3, 8, 8) and g.min() >= 0 and g.max() <= 1


def test_activation_analysis_shapes():
    model = _gap_model()
    x = torch.rand(4, 1, 8, 8)
    acts = channel_max_activations(model, x)
    assert all(v.shape[0] == 4 for v in acts.values())
    table = activation_ratios(model, x, (x + 0.1).clamp(0, 1))
    assert list(table["layer index"]) == list(range(len(acts))) and (table["ratio"] > 0).all()
    assert activation_grid(torch.arange(32.0)).shape == (4, 8)
    assert activation_grid(torch.arange(2048.0)).shape == (32, 64)


def test_region_sparse_raises_accuracy_under_fgsm_on_digits(digits_model, digits_split):
    from lib.attacks import fgsm

    x, y = digits_split["x_test"][:200], digits_split["y_test"][:200]
    cfg = RegionSparseConfig(patch_size=3, n_atoms=16, sparsity=1, dict_epochs=2, patches_per_image=40, stride=1,
                             nlm_template=3, nlm_search=5, bilateral_d=3, bilateral_sigma_space=2.0, loc_scale=0.2)
    rs = RegionSparse(cfg, dictionary=learn_dictionary(digits_split["x_train"][:40], cfg))
    x_adv = fgsm(digits_model, x, y, eps=0.2)
    acc = lambda z: 100.0 * float((digits_model(z).argmax(1) == y).float().mean())  # noqa: E731
    assert acc(rs.purify(x)) >= 85.0                      # clean cost is bounded
    assert acc(rs.purify(x_adv)) >= acc(x_adv) + 10.0     # and it recovers part of the attacked accuracy


def test_bim_schedule_and_mi_fgsm_calibration(digits_model, digits_split):
    assert [bim_steps(v) for v in (2, 10, 22)] == [3, 13, 26]      # min(L + 4, ceil(1.25 L))
    x, y = digits_split["x_test"][:64], digits_split["y_test"][:64]
    x_adv, eps, got = mi_fgsm_at_l2(digits_model, x, y, 0.1, steps=3, refine=2)
    assert abs(got - 0.1) < 0.01 and abs(normalized_l2(x, x_adv) - got) < 1e-9
    assert float((x_adv - x).abs().max()) <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    share, n = eliminated_share(digits_model, x_adv, x, y)          # "defending" by handing back x undoes all
    fooled = digits_model(x_adv).argmax(1) != y
    assert n == int(fooled.sum()) > 0
    assert share == pytest.approx(100.0 * float((digits_model(x).argmax(1) == y)[fooled].float().mean()))


def test_build_selects_k_in_the_run_and_keeps_the_contract():
    from lib.defenses.base import Built
    from lib.defenses.regionsparse import build, select_sparsity
    from lib.profiles import load_profile, notebook_config
    from lib.train import trained_classifier

    profile = load_profile("smoke")
    classifier, _ = trained_classifier(profile, "digits", "target")
    built = build(profile, "digits", classifier)
    section = notebook_config(profile, "03_regionsparse")
    selection = select_sparsity(profile, "digits", classifier)
    assert isinstance(built, Built) and built.classifier is classifier
    assert built.defense.cfg.sparsity == selection.chosen == built.meta["config"]["sparsity"]
    assert sorted(selection.table["K"]) == sorted(section["k_selection"]["candidates"])
    assert selection.table.loc[selection.table["chosen"], "score"].item() == selection.table["score"].max()
    assert built.defense.dictionary.shape == (section["regionsparse"]["n_atoms"], section["regionsparse"]["patch_size"] ** 2)
    assert built.meta["cache_key"] and built.meta["train_seconds"] >= 0
    x = torch.rand(3, 1, 8, 8)
    assert built.defense.purify(x).shape == x.shape


def test_evaluation_and_calibration_counts_share_what_a_weak_classifier_gets_right():
    assert split_counts(1000, 200, 100) == (200, 100)               # enough correct images: the profile's counts
    assert split_counts(6, 16, 16) == (3, 3)                        # a dry run's untrained classifier
    assert split_counts(2, 200, 100) == (1, 1)                      # one each, never an empty calibration set
    assert split_counts(30, 200, 100) == (20, 10)
    with pytest.raises(ValueError, match="at least 2"):
        split_counts(1, 16, 16)


class _RightOnFirstClasses(torch.nn.Module):
    """Knows every digits test image's label and gives it only for classes below `k` (the next class otherwise)."""

    def __init__(self, k: int):
        super().__init__()
        from lib.data import load_dataset
        test = load_dataset("digits", "test")
        self.x, self.y, self.k = test.x.flatten(1), test.y, k

    def forward(self, x):
        y = self.y[torch.cdist(x.flatten(1), self.x).argmin(1)]
        return torch.nn.functional.one_hot(torch.where(y < self.k, y, (y + 1) % 10), 10).float()


def test_a_weak_classifier_makes_the_evaluation_scan_further_into_the_test_split(capsys):
    from lib.defenses.regionsparse.evaluation import evaluation_images, scored_test_images
    from lib.profiles import load_profile
    profile = load_profile("smoke")                                # digits: 200 of the 360 test images, 48 + 48 needed
    test, correct = scored_test_images(profile, "digits", _RightOnFirstClasses(10), 96)
    assert len(test) == 200 and bool(correct.all())                 # a good classifier: the profile's subset
    test, correct = scored_test_images(profile, "digits", _RightOnFirstClasses(4), 96)
    assert len(test) == 360 and int(correct.sum()) >= 96            # 4 classes of 10 right: the whole split scanned
    assert "scanning 360 test images" in capsys.readouterr().out
    images = evaluation_images(profile, "digits", _RightOnFirstClasses(4))
    assert (len(images.y), len(images.y_cal)) == (48, 48) and bool((images.y < 4).all() and (images.y_cal < 4).all())
    right = int((_RightOnFirstClasses(2).y < 2).sum())             # fewer than 96 even in the whole split: shared
    images = evaluation_images(profile, "digits", _RightOnFirstClasses(2))
    assert len(images.y) + len(images.y_cal) == right and abs(len(images.y) - len(images.y_cal)) <= 1
