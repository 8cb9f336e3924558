"""`benchmarks/tune_grid_images.py`: the subsets it fits on, and the grid its `with the grid` row keeps."""

from pathlib import Path

from conftest import benchmark_script, make_category

from gaussad import model

tune_grid_images = benchmark_script("tune_grid_images")


def test_a_subset_links_the_drawn_training_images_and_the_whole_test_set(tmp_path: Path) -> None:
    category = make_category(tmp_path / "widget", n_train=12)
    folder = tune_grid_images.subset(category, 5, seed=7, root=tmp_path / "subsets")
    drawn = sorted(path.name for path in (folder / "train" / "good").iterdir())
    assert len(drawn) == 5 and set(drawn) <= {path.name for path in (category / "train" / "good").iterdir()}
    assert all(
        (folder / "train" / "good" / name).resolve().parent == category / "train" / "good" for name in drawn
    )
    assert (folder / "test").resolve() == category / "test"
    assert (folder / "ground_truth").resolve() == category / "ground_truth"
    # The same draw from the same seed, kept; another seed draws again; all images: the category itself.
    again = tune_grid_images.subset(category, 5, seed=7, root=tmp_path / "other")
    assert sorted(path.name for path in (again / "train" / "good").iterdir()) == drawn
    other = tune_grid_images.subset(category, 5, seed=8, root=tmp_path / "subsets")
    assert sorted(path.name for path in (other / "train" / "good").iterdir()) != drawn
    assert tune_grid_images.subset(category, 12, seed=7, root=tmp_path / "subsets") == category


def test_the_grid_row_keeps_the_grid_at_any_count_and_gives_the_line_back(
    min_images_for_grid: int, monkeypatch
) -> None:
    monkeypatch.setattr(model, "MIN_IMAGES_FOR_GRID", min_images_for_grid)
    with tune_grid_images.grid_at_any_count():
        assert model.MIN_IMAGES_FOR_GRID == 0
    assert min_images_for_grid == model.MIN_IMAGES_FOR_GRID > 0
