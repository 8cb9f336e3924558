"""Auto options: synthetic defects, the proxy evidence, the choice, and what the fitted model then does."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAGNETIC_TILE, benchmark_script, marked_texture, needs, texture
from PIL import Image
from scipy import ndimage

from gaussad import GaussAD
from gaussad.calibration import far_out
from gaussad.evaluation import model_info
from gaussad.framing import PART_SMOOTHING, part_region
from gaussad.images import read_image
from gaussad.layout import training_images
from gaussad.maps import top_share_mean
from gaussad.selection import CONFIDENCE, MARGIN, Candidate, choose, image_score_evidence, synthetic_sample
from gaussad.synthetic import KINDS, synthetic_defects

SMALL = {"image_size": 64, "batch_size": 8, "device": "cpu"}
AUTO = {"image_score": "auto", "localization": "auto"}


@pytest.fixture(scope="module")
def auto_model(category: Path) -> GaussAD:
    return GaussAD(**SMALL, **AUTO).fit(training_images(category))


def test_synthetic_defects_change_exactly_their_masks_and_repeat_by_seed() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    defective, masks, kinds = synthetic_defects(images, images, seed=1)
    assert kinds == [KINDS[i % 2] for i in range(6)]
    changed = (defective != images).any(axis=-1)
    assert not (changed & ~masks).any()  # nothing changes outside a mask
    assert all(0.001 < mask.mean() < 0.1 for mask in masks)
    assert changed.sum() > 0.5 * masks.sum()  # random donors differ almost everywhere inside
    again = synthetic_defects(images, images, seed=1)
    np.testing.assert_array_equal(again[0], defective)
    assert not np.array_equal(synthetic_defects(images, images, seed=2)[1], masks)
    np.testing.assert_array_equal(images, np.random.default_rng(3).integers(0, 256, images.shape, np.uint8))


def test_synthetic_defects_land_where_the_image_has_detail() -> None:
    """A small textured part on a plain background: the defects go on the part, not on the background."""
    rng = np.random.default_rng(4)
    images = np.full((40, 64, 64, 3), 200, dtype=np.uint8)
    images[:, 8:32, 30:54] = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    _, masks, kinds = synthetic_defects(images, images, seed=0)
    part = np.zeros((64, 64), dtype=bool)
    part[4:36, 26:58] = True  # the part and a margin of 4 pixels: a quarter of the image
    centres = [tuple(np.argwhere(mask).mean(axis=0).round().astype(int)) for mask in masks]
    on_part = np.array([part[centre] for centre in centres])
    kinds = np.array(kinds)
    assert on_part[kinds == "patch"].mean() >= 0.8  # the localization's proxy
    assert on_part[kinds == "blend"].mean() >= 0.5  # a blob grows from its centre along smoothed noise


def test_the_part_region_is_the_part_on_a_background_and_none_on_a_texture() -> None:
    rng = np.random.default_rng(5)
    scene = rng.normal(200, 6, (96, 96, 3))  # a light background with grain
    y, x = np.mgrid[0:96, 0:96]
    part = (y - 40) ** 2 + (x - 55) ** 2 < 22**2
    scene[part] = texture(rng)[part] * 0.5  # a darker woven part
    region = part_region(np.clip(scene, 0, 255).astype(np.uint8))
    assert region is not None and region[part].all()
    assert not (region & ~_spread(part, 96)).any()
    assert part_region(texture(rng)) is None  # the border is the part itself


def _spread(part: np.ndarray, side: int) -> np.ndarray:
    """The part and as far past its outline as the part region's smoothing reaches (4 sigma)."""
    return ndimage.binary_dilation(part, iterations=int(np.ceil(4 * PART_SMOOTHING * side)))


def test_patches_lie_wholly_on_a_part_on_a_background() -> None:
    """No patch straddles the part's outline: half off the part, its content would sit on the background,
    where real defects are not."""
    rng = np.random.default_rng(6)
    images = np.full((40, 64, 64, 3), 200, dtype=np.uint8)
    images[:, 8:40, 24:56] = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    _, masks, kinds = synthetic_defects(images, images, seed=0)
    part = np.zeros((64, 64), dtype=bool)
    part[8:40, 24:56] = True
    patches = masks[np.array(kinds) == "patch"]
    assert all(not (mask & ~_spread(part, 64)).any() for mask in patches)


def test_patches_are_cut_from_the_part_not_from_its_background() -> None:
    """A patch carries the part, not its background: grain on the part is no defect a user has, and a
    Gaussian shared by all positions has seen that grain everywhere as normal."""
    rng = np.random.default_rng(7)
    images = np.clip(rng.normal(120, 12, (40, 64, 64, 3)), 0, 255).astype(np.uint8)  # a grainy background
    ramp = np.linspace(200, 255, 32, dtype=np.float32)  # a smooth part, with less detail than the grain
    images[:, 16:48, 16:48] = np.rint(ramp)[None, None, :, None].astype(np.uint8)
    defective, masks, kinds = synthetic_defects(images, images, seed=0)
    patches = np.flatnonzero(np.array(kinds) == "patch")
    # Mostly the part's pixels: the region reaches a pixel or two past the outline (its smoothing).
    on_part = [(defective[index][masks[index]] >= 200).mean() for index in patches]
    assert min(on_part) > 0.6 and np.mean(on_part) > 0.9


def test_the_choice_needs_a_margin_and_ties_keep_the_earlier_candidate() -> None:
    evidence = {"pooled": {"proxy": 0.90}, "combined": {"proxy": 0.90 + MARGIN / 2}, "map": {"proxy": 0.85}}
    assert choose(evidence) == "pooled"
    evidence["map"]["proxy"] = 0.90 + 2 * MARGIN
    assert choose(evidence) == "map"
    rng = np.random.default_rng(0)
    normal, synthetic = rng.normal(0, 1, 200), rng.normal(1, 1, 100)
    candidates = [
        Candidate("first", normal, synthetic),
        # As good on average, noisier image by image: whichever proxy is higher, it is noise.
        Candidate("as good", normal + rng.normal(0, 0.5, 200), synthetic + rng.normal(0, 0.5, 100)),
        Candidate("much better", normal, synthetic + 2.0),
    ]
    chosen, evidence = image_score_evidence(candidates, ["patch", "blend"] * 50)
    assert abs(evidence["as good"]["proxy"] - evidence["first"]["proxy"]) > 0.001
    assert evidence["as good"]["wins"] < CONFIDENCE
    assert chosen == "much better" and evidence["much better"]["wins"] == 1.0
    assert image_score_evidence(candidates[:2], ["patch"] * 100)[0] == "first"
    assert list(synthetic_sample(1000, 4)) == [0, 333, 666, 999]
    assert list(synthetic_sample(3, 10)) == [0, 1, 2]


def test_auto_keeps_its_evidence_and_follows_it(auto_model: GaussAD) -> None:
    selection = auto_model.state_.selection
    assert selection["synthetic_images"] == auto_model.n_train_  # fewer images than the cap: all of them
    localizations = selection["localization"]["candidates"]
    assert list(localizations) == ["shared", "hybrid"]  # the paper's maps first: hybrid ones must beat them
    assert all(row["proxy"] == row["aupro_patch"] for row in localizations.values())
    assert selection["localization"]["chosen"] == choose(localizations)
    scores = selection["image_score"]["candidates"]
    assert list(scores) == ["combined", "pooled", "map", "global"]
    assert all(0.0 <= row["proxy"] <= 1.0 for row in scores.values())
    replayed = "combined"  # a later candidate displaces the best so far where it wins often enough
    for name in list(scores)[1:]:
        replayed = name if scores[name]["wins"] >= CONFIDENCE else replayed
    assert selection["image_score"]["chosen"] == replayed
    state = auto_model.state_
    chosen = selection["image_score"]["chosen"]
    assert state.image_score == ("pooled" if chosen == "global" else chosen)
    assert (state.position_gaussian is not None) == (selection["localization"]["chosen"] == "hybrid")
    if chosen == "global":
        assert state.image_grid == 1 and state.levels == (3, 4, 5, 6, 7)
    assert auto_model.scorer_.features.levels == state.extracted_levels


def test_choosing_only_the_localization_weighs_only_its_patches(auto_model: GaussAD, category: Path) -> None:
    """The defaults choose the localization alone: the fit makes the same patches as a fit that also
    chooses the image score, drops the blends, and weighs hybrid and shared maps by the same numbers."""
    default = GaussAD(**SMALL).fit(training_images(category))
    selection, both = default.state_.selection, auto_model.state_.selection
    assert "image_score" not in selection and "(patch)" in selection["proxy"]
    assert selection["synthetic_images"] == (both["synthetic_images"] + 1) // 2  # every other one: patches
    for name, row in selection["localization"]["candidates"].items():
        assert set(row) == {"pixel_auroc", "aupro", "proxy", "aupro_patch"}
        assert row["proxy"] == both["localization"]["candidates"][name]["proxy"]
    assert selection["localization"]["chosen"] == both["localization"]["chosen"]
    assert default.state_.image_score == "combined"
    info = model_info(default)  # what the report shows: the localization's evidence alone
    assert "auto localization (proxy)" in info and "auto image score (proxy)" not in info


def test_the_image_scores_evidence_follows_alignment(tmp_path: Path) -> None:
    """The same parts, aligned and then turned and shifted at random as the development data's `rotate`
    variant does it: on the aligned ones the grid-pooled features separate the synthetic defects and the
    combined score stays; turned, they separate next to nothing and the map's top share leads them.
    A choice that follows alignment: `test_auto_localization_chooses_by_alignment_on_real_parts`."""
    rotate = benchmark_script("stress_variants").rotate
    rng, turns = np.random.default_rng(2), np.random.default_rng(3)
    # As many as the proxy takes: the choice needs them all.
    aligned = [marked_texture(rng) for _ in range(128)]
    sets = {"aligned": aligned, "rotated": [rotate(part, None, turns)[0] for part in aligned]}
    chosen, evidence = {}, {}
    for name, parts in sets.items():
        paths = []
        for index, part in enumerate(parts):
            paths.append(tmp_path / name / f"{index:03d}.png")
            paths[-1].parent.mkdir(exist_ok=True)
            Image.fromarray(part).save(paths[-1])
        selection = GaussAD(**SMALL, **AUTO).fit(paths).state_.selection["image_score"]
        chosen[name], evidence[name] = selection["chosen"], selection["candidates"]
    assert evidence["aligned"]["pooled"]["proxy"] > 0.9 > 0.6 > evidence["rotated"]["pooled"]["proxy"]
    assert evidence["rotated"]["map"]["proxy"] > evidence["rotated"]["pooled"]["proxy"] + 0.1
    assert evidence["rotated"]["pooled"]["wins"] == 0.0
    assert chosen["aligned"] == "combined"


@needs(MAGNETIC_TILE)
def test_auto_localization_chooses_by_alignment_on_real_parts(tmp_path: Path) -> None:
    """The magnetic tiles sit in the same place in every image, and the per-position half of hybrid maps
    knows their edges: hybrid maps lead on the patches. The same tiles turned and placed anywhere on a
    plain background (the development data's `small` variant): that knowledge is noise, and shared maps
    lead. Every sixth training image keeps the two fits short."""
    small = benchmark_script("stress_variants").small
    turns = np.random.default_rng(0)
    aligned, moved = training_images(MAGNETIC_TILE)[::6], []
    for path in aligned:
        moved.append(tmp_path / f"{path.stem}.png")
        Image.fromarray(small(np.asarray(read_image(path)), None, turns)[0]).save(moved[-1])
    chosen, leads = {}, {}
    for name, paths in {"aligned": aligned, "turned and moved": moved}.items():
        localization = GaussAD(batch_size=8, device="cpu").fit(paths).state_.selection["localization"]
        candidates = localization["candidates"]
        chosen[name] = localization["chosen"]
        leads[name] = candidates["hybrid"]["proxy"] - candidates["shared"]["proxy"]
    assert chosen == {"aligned": "hybrid", "turned and moved": "shared"}
    assert leads["aligned"] > 10 * MARGIN and leads["turned and moved"] < -10 * MARGIN


def test_info_and_reports_show_the_choice_and_its_evidence(
    auto_model: GaussAD, tmp_path: Path, capsys
) -> None:
    from gaussad.cli import main

    info = model_info(auto_model)
    chosen = auto_model.state_.selection["image_score"]["chosen"]
    assert f"{chosen}*" in info["auto image score (proxy)"]
    assert info["localization"] == ("hybrid" if auto_model.position_levels_ else "shared")
    assert main(["info", str(auto_model.save(tmp_path / "model"))]) == 0
    printed = capsys.readouterr().out
    assert f"image score: auto, chose {auto_model.state_.image_score}" in printed
    assert printed.count("proxy") >= 6  # one line per candidate: 2 localizations, 4 image scores


def test_an_auto_model_saves_loads_and_scores_the_same(
    auto_model: GaussAD, category: Path, tmp_path: Path
) -> None:
    auto_model.save(tmp_path / "model")
    loaded = GaussAD.load(tmp_path / "model", device="cpu", batch_size=8)
    assert loaded.state_.selection == auto_model.state_.selection
    assert (loaded.image_score, loaded.localization) == ("auto", "auto")
    tests = sorted((category / "test").rglob("*.png"))
    np.testing.assert_allclose(loaded.score_samples(tests), auto_model.score_samples(tests), rtol=1e-6)


def _map_tops(model: GaussAD, tests: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A model's scores, and the top-share means of its anomaly maps at the input size."""
    size = (model.image_size_, model.image_size_)
    prediction = list(model.iter_predict(tests, map_sizes=[size] * len(tests)))
    maps = torch.from_numpy(np.stack([m for b in prediction for m in b.maps]))
    return np.concatenate([batch.scores for batch in prediction]), top_share_mean(maps).numpy()


@pytest.mark.parametrize("kind", ["map", "combined"])
def test_map_based_scores_come_from_the_map_and_calibrate_on_it(
    category: Path, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One Gaussian per map level: hybrid maps' mixtures are the anomaly map's levels' (3-5) alone.
    model = GaussAD(**SMALL, image_score=kind, mixture_clusters=1).fit(training_images(category))
    tests = sorted((category / "test").rglob("*.png"))
    scores, own_tops = _map_tops(model, tests)
    # The map part reads a map of its own levels (3-7), deeper than the anomaly map's (3-5): the tops of a
    # model whose anomaly map has those levels, with the same localization.
    assert (model.map_levels_, model.state_.score_map_levels) == ((3, 4, 5), (3, 4, 5, 6, 7))
    deeper = GaussAD(
        **SMALL,
        image_score="map",
        map_levels=(3, 4, 5, 6, 7),
        localization=model.state_.localization,
        mixture_clusters=1,
    )
    _, tops = _map_tops(deeper.fit(training_images(category)), tests)
    assert not np.allclose(tops, own_tops, rtol=1e-3)
    if kind == "map":
        np.testing.assert_allclose(scores, tops, rtol=1e-5)
        assert model.state_.score_scales == (1.0, 1.0)
    else:
        # Three parts: the grid-pooled score, the map's top share, and the paper's levels pooled globally.
        assert model.state_.global_levels == (3, 4, 5, 6, 7)
        pooled_model = GaussAD(**SMALL, image_score="pooled").fit(training_images(category))
        global_model = GaussAD(**SMALL, image_score="pooled", levels=(3, 4, 5, 6, 7), image_grid=1)
        global_model.fit(training_images(category))
        pooled, whole = pooled_model.score_samples(tests), global_model.score_samples(tests)
        low, high, wide = model.state_.score_scales
        np.testing.assert_allclose(scores, pooled / low + tops / high + whole / wide, rtol=1e-5)
        # The scales are the held-out spreads: each part moves by 1 per standard deviation of normal images.
        assert np.std(pooled_model.held_out_scores_ / low) == pytest.approx(1.0, rel=1e-9)
        assert np.std(global_model.held_out_scores_ / wide) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(model.score_samples(tests), scores, rtol=1e-6)  # no maps asked for
    held = model.held_out_scores_
    assert model.image_threshold_.value == pytest.approx(np.quantile(held[~far_out(held)], 0.99))
    from gaussad.cli import main

    assert main(["info", str(model.save(tmp_path / "model"))]) == 0
    assert "score map levels 3,4,5,6,7" in capsys.readouterr().out


def test_models_saved_with_a_two_part_combined_score_still_load(category: Path, tmp_path: Path) -> None:
    """Format version 4 wrote a combined score without its global part: it loads and scores as the sum
    of its two parts, as a model fitted without one does."""
    from safetensors.numpy import load_file, save_file

    from gaussad.fileio import file_sha256
    from gaussad.modelfolder import CONFIG_FILE, TENSORS_FILE

    # Nor had it a score map of its own: its map part was the anomaly map's.
    options = {**SMALL, "localization": "shared", "score_map_levels": (3, 4, 5)}
    folder = GaussAD(**options, image_score="combined").fit(training_images(category)).save(tmp_path / "m")
    tensors = load_file(str(folder / TENSORS_FILE))
    two_parts = {key: value for key, value in tensors.items() if not key.startswith("global.")}
    assert len(two_parts) < len(tensors)
    save_file(two_parts, folder / TENSORS_FILE)
    document = json.loads((folder / CONFIG_FILE).read_text())
    document["score_scales"] = document["score_scales"][:2]
    del document["global_levels"], document["params"]["global_levels"]
    del document["score_map_levels"], document["params"]["score_map_levels"]
    document |= {"format_version": 4, "tensors_sha256": file_sha256(folder / TENSORS_FILE)}
    (folder / CONFIG_FILE).write_text(json.dumps(document))
    loaded = GaussAD.load(folder, device="cpu", batch_size=8)
    assert loaded.state_.global_levels == () and loaded.scorer_.global_head is None
    tests = sorted((category / "test").rglob("*.png"))
    size = (loaded.image_size_, loaded.image_size_)
    prediction = list(loaded.iter_predict(tests, map_sizes=[size] * len(tests)))
    tops = top_share_mean(torch.from_numpy(np.stack([m for b in prediction for m in b.maps]))).numpy()
    pooled = GaussAD(**options, image_score="pooled").fit(training_images(category)).score_samples(tests)
    low, high = loaded.state_.score_scales
    scores = np.concatenate([batch.scores for batch in prediction])
    np.testing.assert_allclose(scores, pooled / low + tops / high, rtol=1e-5)
    # `--global-levels none` fits that score today.
    two = GaussAD(**options, image_score="combined", global_levels=()).fit(training_images(category))
    assert two.state_.global_levels == () and two.state_.score_scales == loaded.state_.score_scales
    np.testing.assert_allclose(two.score_samples(tests), scores, rtol=1e-6)


def test_without_held_out_folds_auto_and_combined_take_pooled_and_say_so(category: Path) -> None:
    for options in ({"folds": 0}, {}):
        images = training_images(category)[: 2 if not options else 8]
        model = GaussAD(**SMALL, **AUTO, **options).fit(images)
        assert (model.state_.image_score, bool(model.state_.position_levels)) == ("pooled", True)
        assert "no held-out folds" in model.state_.selection["fallback"]
    combined = GaussAD(**SMALL, image_score="combined", folds=0).fit(training_images(category)[:4])
    assert (
        combined.state_.image_score == "pooled"
        and "no held-out folds" in combined.state_.selection["fallback"]
    )


def test_few_training_images_leave_the_grid_out_of_the_combined_score(
    category: Path, min_images_for_grid: int, monkeypatch, tmp_path: Path, capsys
) -> None:
    """Below `MIN_IMAGES_FOR_GRID` training images the grid's Gaussians, which learn from one pooled vector
    per image and cell, detect worse than the score without them (docs/design.md): the combined score
    pools the whole frame in their place, says why, and scores as a model fitted so by hand; at the line
    the grid stays."""
    from gaussad import model as fitting
    from gaussad.cli import main

    monkeypatch.setattr(fitting, "MIN_IMAGES_FOR_GRID", min_images_for_grid)
    images = training_images(category)
    assert len(images) < min_images_for_grid
    model = GaussAD(**SMALL, localization="shared").fit(images)
    state = model.state_
    whole_frame = (3, 4, 5, 6, 7)  # the global part's levels, the paper's
    assert (state.image_score, model.levels_, state.image_grid, state.global_levels) == (
        "combined",
        whole_frame,
        1,
        (),
    )
    rule = state.selection["image_score"]["rule"]
    assert (
        rule.startswith("combined without the grid") and f"{len(images)} training images are too few" in rule
    )
    by_hand = GaussAD(
        **SMALL,
        localization="shared",
        image_score="combined",
        levels=whole_frame,
        image_grid=1,
        global_levels=(),
    ).fit(images)
    tests = sorted((category / "test").rglob("*.png"))
    np.testing.assert_allclose(model.score_samples(tests), by_hand.score_samples(tests), rtol=1e-6)
    assert main(["info", str(model.save(tmp_path / "model"))]) == 0
    assert f"image score by rule: {rule}" in capsys.readouterr().out
    monkeypatch.setattr(fitting, "MIN_IMAGES_FOR_GRID", len(images))
    kept = GaussAD(**SMALL, localization="shared").fit(images)
    assert (kept.state_.image_grid, kept.state_.global_levels) == (4, whole_frame)
    assert "image_score" not in (kept.state_.selection or {})


def test_the_few_images_rule_leaves_other_scores_and_earlier_rules_alone(
    min_images_for_grid: int, monkeypatch
) -> None:
    """Auto drops the grid as combined does; without a global part the score map's share is left; a pooled
    score, a grid of one cell and a grid already dropped because parts move stand."""
    from gaussad import ModelConfig
    from gaussad import model as fitting

    monkeypatch.setattr(fitting, "MIN_IMAGES_FOR_GRID", min_images_for_grid)
    few, whole_frame = min_images_for_grid - 1, (3, 4, 5, 6, 7)
    auto, rules = fitting._for_few_images(ModelConfig(image_score="auto"), {}, few, whole_frame)
    assert (auto.image_score, auto.levels, auto.image_grid, auto.global_levels) == (
        "combined",
        whole_frame,
        1,
        (),
    )
    assert list(rules) == ["image_score"] and rules["image_score"].startswith("combined without the grid")
    alone, rules = fitting._for_few_images(ModelConfig(), {}, few, ())
    assert alone.image_score == "map" and rules["image_score"].startswith("map: ")
    moving = {"image_score": fitting.MOVING_RULES["image_score"]}
    for config, earlier in (
        (ModelConfig(image_score="pooled"), {}),
        (ModelConfig(image_grid=1), {}),
        (ModelConfig(), moving),
    ):
        assert fitting._for_few_images(config, earlier, few, whole_frame) == (config, earlier)
    assert fitting._for_few_images(ModelConfig(), {}, min_images_for_grid, whole_frame) == (ModelConfig(), {})


def test_an_exported_auto_model_scores_as_the_library(
    auto_model: GaussAD, category: Path, tmp_path: Path
) -> None:
    from gaussad.export import export_onnx
    from gaussad.runtime import OnnxModel

    export_onnx(auto_model.save(tmp_path / "model"), tmp_path / "model.onnx")
    tests = sorted((category / "test").rglob("*.png"))
    exported = OnnxModel.load(tmp_path / "model.onnx").predict(tests)
    library = auto_model.predict(tests)
    np.testing.assert_allclose(exported.scores, library.scores, rtol=1e-4)
    for ours, theirs in zip(exported.maps, library.maps, strict=True):
        assert np.abs(ours - theirs).max() <= 1e-3 * np.ptp(theirs)


def test_tune_defaults_names_what_each_setting_chose(category: Path) -> None:
    """The tuning table's `chose` column: the auto options' choices, image score first; the defaults choose
    the localization alone."""
    tune = benchmark_script("tune_defaults")
    assert tune.evaluate(category, SMALL)["chosen"] in ("hybrid", "shared")
    row = tune.evaluate(category, {**SMALL, **AUTO})
    image_score, localization = row["chosen"].split(", ")
    assert image_score in ("combined", "pooled", "map", "global") and localization in ("hybrid", "shared")
    assert row["selection"]["image_score"]["chosen"] == image_score
