"""`engine="ray"`: the fit's backbone pass on a local two-CPU Ray cluster gives the model one machine gives.

Both sides run PyTorch on one thread per process: convolutions round differently on different thread
counts (features differ by up to 4e-5), which no engine can undo.
"""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BOTTLE, assert_same_model, fit_small, make_category, needs

from gaussad import GaussAD
from gaussad.errors import GaussADError
from gaussad.layout import list_test_images, training_images


@pytest.fixture(scope="module")
def widgets(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("cluster") / "widget", n_train=40, seed=3)


def fit(images: list, engine: str, **options) -> GaussAD:
    return fit_small(images, engine=engine, **options)


@pytest.mark.parametrize(
    "options",
    [{}, {"localization": "per-position", "image_score": "auto"}],
    ids=["defaults", "per-position-auto"],
)
def test_ray_fit_equals_the_local_fit(ray_local, widgets, torch_threads, options) -> None:
    torch_threads(1)
    images = training_images(widgets)
    tests = [item.path for item in list_test_images(widgets)]
    local = fit(images, "local", **options)
    on_ray = fit(images, "ray", **options)
    assert_same_model(on_ray, local, tests)


def test_ray_fit_without_a_feature_store_equals_the_local_fit(ray_local, widgets, torch_threads) -> None:
    """Without a store, the workers run the backbone again for the fourth moments, the fold sums and the
    held-out maps, and send back only those: the model is the local one's."""
    torch_threads(1)
    images = training_images(widgets)
    tests = [item.path for item in list_test_images(widgets)][:4]
    local = fit(images, "local", localization="per-position")
    on_ray = fit(images, "ray", localization="per-position", feature_store="none", actors=2)
    assert_same_model(on_ray, local, tests)
    np.testing.assert_allclose(on_ray.held_out_map_maxima_, local.held_out_map_maxima_, rtol=1e-6)


def shard_worker_pids() -> list[int]:
    """Processes of the fit's actors, found by the title Ray gives them."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ShardWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_worker_killed_during_the_fit_is_replaced_and_the_model_is_the_same(
    ray_local, widgets, torch_threads
) -> None:
    torch_threads(1)
    images = training_images(widgets) * 3  # long enough to be killed in the middle
    killed: list[int] = []
    done = threading.Event()
    earlier = set(shard_worker_pids())  # an earlier test's actors may still be shutting down

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            pids = [pid for pid in shard_worker_pids() if pid not in earlier]
            if pids:
                time.sleep(1.0)  # into its first shards
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # its pool ended meanwhile: wait for the next one
                    earlier.add(pids[0])
                    continue
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        on_ray = fit(images, "ray", actors=2)
    finally:
        done.set()
        killer.join()
    assert killed, "no fit actor appeared to be killed"
    assert killed[0] not in shard_worker_pids()
    local = fit(images, "local")
    assert_same_model(on_ray, local, [item.path for item in list_test_images(widgets)][:4])


def test_unreadable_training_images_on_ray_as_locally(ray_local, widgets, tmp_path, torch_threads) -> None:
    torch_threads(1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images = [*training_images(widgets)[:10], broken, *training_images(widgets)[10:24]]
    with pytest.raises(GaussADError, match="broken.png"):
        fit(images, "ray")
    local = fit(images, "local", on_error="skip")
    on_ray = fit(images, "ray", on_error="skip")
    assert [error.index for error in on_ray.skipped_] == [error.index for error in local.skipped_] == [10]
    assert on_ray.skipped_[0].message == local.skipped_[0].message
    np.testing.assert_allclose(on_ray.held_out_scores_, local.held_out_scores_, rtol=1e-6)


def test_bad_engine_settings_are_refused(widgets) -> None:
    with pytest.raises(GaussADError, match="--engine 'spark'"):
        fit(training_images(widgets), "spark")
    with pytest.raises(GaussADError, match="--actors 0"):
        fit(training_images(widgets), "ray", actors=0)


@pytest.mark.slow
@needs(BOTTLE)
def test_ray_fit_equals_the_local_fit_on_bottle(ray_local, torch_threads) -> None:
    torch_threads(1)
    images = training_images(BOTTLE)[:64]
    tests = [item.path for item in list_test_images(BOTTLE)][::12]
    settings = {"device": "cpu", "engine": "local"}
    local = GaussAD(**settings).fit(images)
    on_ray = GaussAD(**{**settings, "engine": "ray", "actors": 2}).fit(images)
    assert_same_model(on_ray, local, tests)


def test_gaussad_fit_on_ray_writes_the_model(ray_local, widgets, tmp_path) -> None:
    from gaussad.cli import main

    output = tmp_path / "model"
    options = ["--image-size", "64", "--batch-size", "4", "--device", "cpu", "--quiet"]
    status = main(
        ["fit", str(widgets / "train"), "-o", str(output), "--engine", "ray", "--actors", "1", *options]
    )
    assert status == 0
    model = GaussAD.load(output, device="cpu")
    assert model.n_train_ == len(training_images(widgets))
    assert model.image_threshold_ is not None
