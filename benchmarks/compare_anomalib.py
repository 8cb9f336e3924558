"""Compare gaussad with anomalib's PaDiM, PatchCore and DFM: same data, backbone weights and input size.

    python benchmarks/compare_anomalib.py ../shared/datasets/mvtec_ad/bottle \
        ../shared/datasets/magnetic_tile --methods gaussad padim patchcore dfm \
        --out benchmarks/results/compare_anomalib.md --json FILE

Each argument is a category in MVTec AD layout (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png)
or a folder of such categories. Every (category, method) runs in its own fresh Python process, one after the
other, so that its peak RSS belongs to that method alone: the process's VmHWM (imports included; the peak
right after the imports is reported too). Not ``ru_maxrss``: exec carries the parent's peak over into it.

What is the same for all methods:
- backbone: gaussad's offline EfficientNet-Lite weights (``gaussad.backbones.load_backbone``, SHA-256
  checked). anomalib asks timm for ``tf_efficientnet_liteN`` with ``pretrained=True``; ``timm.create_model``
  is replaced so that it builds the model without download and loads those weights, asserting that every
  weight of the ``features_only`` model is loaded and only the head (conv_head, bn2, classifier) is unused.
- input: images decoded and squashed to the square input size by gaussad's own ``gaussad.features.prepare``
  (EXIF rotation, RGB, PIL bilinear), in the same number of threads and with the same batch size as gaussad's
  defaults. anomalib's PreProcessor (Resize to the same size, a no-op then, and Normalize with the backbone's
  mean and std: 0.5 for the Lite models) replaces its defaults (256 pixels, ImageNet statistics).
- outputs: the RAW image scores and anomaly maps at the input size (anomalib's post-processor, evaluator and
  visualizer are off). The maps are then resized bilinearly to each test image's full resolution, as
  gaussad's evaluation does, and all metrics come from ``gaussad.metrics`` (image AUROC, pixel AUROC, AUPRO).

anomalib settings (its defaults except the backbone; timm ``features_only`` indices 1, 2, 3 are the stride
4, 8, 16 outputs, the counterparts of ResNet's layer1..layer3):
- PaDiM: layers [1, 2, 3] (default layer1-3), n_features 100 (its ResNet-18 default; required for other
  backbones), random feature subset drawn with ``--seed``.
- PatchCore: layers [2, 3] (default layer2, layer3), coreset_sampling_ratio 0.1 (``--patchcore-coreset``
  changes it), num_neighbors 9.
- DFM: layer 3 (default layer3), pooling_kernel_size 4, pca_level 0.97, score_type "fre".
gaussad runs with its defaults: ``GaussAD(backbone=..., image_size=..., device=...)``; gaussad-shared the
same with ``localization="shared"`` (the ratios stay relative to the defaults).

gaussad runs as its CLI runs it, under ``gaussad.cpu_tuning()``: it holds its allocator policy while it
extracts features (``gaussad.allocator``: glibc's malloc keeps freed blocks for reuse, which speeds up the
CPU forward pass), chooses the forward pass's threads and fits on one BLAS thread per job; anomalib's
processes keep glibc's and PyTorch's defaults, as its users get them. ``--anomalib-allocator gaussad`` holds
the same allocator policy while anomalib iterates the images (which is while its model runs its forward
passes), to show what it is worth.

Measured per method: fit seconds (wall time from building the model, weights loading included, to the end of
fitting), test images per second (scoring stage only: data loading and the forward over all test images
producing scores and input-size maps; metric computation and the final resize excluded), peak RSS. The ratios
are gaussad's advantage, >1 meaning gaussad is better: method fit s / gaussad fit s, gaussad img/s / method
img/s, method peak RSS / gaussad peak RSS.

Expected run times on a quiet 2-core CPU: gaussad, PaDiM and DFM take minutes per category; PatchCore's
k-center-greedy coreset takes about 30-65 minutes for MVTec bottle (209 training images) and hours for the
Magnetic Tile data set (714 training images; 47 minutes with ``--patchcore-coreset 0.01``): pick methods
with ``--methods``. Anything else running on the machine inflates the timings (up to 7x seen on 2 cores):
take final numbers from one quiet run. Results are rewritten after every method, so an interrupted run
keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_description
from PIL import Image

from gaussad.allocator import keep_freed_memory
from gaussad.backbones import available_backbones, load_backbone
from gaussad.config import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, DEFAULTS
from gaussad.errors import GaussADError
from gaussad.evaluation import read_mask
from gaussad.features import prepare
from gaussad.layout import LabeledImage, find_categories, list_test_images, training_images
from gaussad.maps import resize_map
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

METHODS = ("gaussad", "gaussad-shared", "padim", "patchcore", "dfm")
GAUSSAD_LOCALIZATIONS = {"gaussad": DEFAULTS.localization, "gaussad-shared": "shared"}
# anomalib constructor arguments besides backbone and the pre/post-processing switches (its defaults;
# --patchcore-coreset changes PatchCore's ratio for a run).
ANOMALIB_SETTINGS: dict[str, dict[str, Any]] = {
    "padim": {"layers": [1, 2, 3], "n_features": 100},
    "patchcore": {"layers": [2, 3], "coreset_sampling_ratio": 0.1, "num_neighbors": 9},
    "dfm": {"layer": 3, "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
}
# Keys of the full timm EfficientNet that a features_only model lacks: the head after the last stage.
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
SCRIPT = "benchmarks/compare_anomalib.py"


def log(message: str) -> None:
    """Progress on stderr, so stdout stays free."""
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: Linux's VmHWM (of this program image).

    Not ``ru_maxrss``: exec keeps the maximum of the old memory image, so a child started by a parent with
    1 GiB resident reports at least 1 GiB. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KiB elsewhere


# ----------------------------------------------------------------------------- one method, in a child process
def run_single(spec_path: Path) -> None:
    """Fit and score one method on one category as the spec says; write scores, maps and measurements.

    Runs in a fresh process started by `main`, so its peak RSS is this method's alone.
    """
    spec = json.loads(spec_path.read_text())
    method, size = spec["method"], spec["image_size"]
    if method not in GAUSSAD_LOCALIZATIONS:
        _import_anomalib_quietly()  # before the RSS baseline, as gaussad's imports are
    rss_after_imports = peak_rss_mib()
    torch.manual_seed(spec["seed"])  # PaDiM's feature subset and PatchCore's first center use torch's RNG

    category = Path(spec["category"])
    train = training_images(category)
    tests = list_test_images(category)
    log(f"  {method}: fitting on {len(train)} images")
    if method in GAUSSAD_LOCALIZATIONS:
        fit_seconds, score_seconds, scores, maps = _run_gaussad(spec, train, tests)
    else:
        fit_seconds, score_seconds, scores, maps = _run_anomalib(spec, train, tests)
    rss = peak_rss_mib()
    if scores.shape != (len(tests),) or maps.shape != (len(tests), size, size):
        raise RuntimeError(f"{method}: scores {scores.shape} and maps {maps.shape} for {len(tests)} images")
    out = spec_path.parent
    np.savez(out / "outputs.npz", scores=scores.astype(np.float64), maps=maps.astype(np.float32))
    measured = {
        "test_paths": [str(t.path) for t in tests],
        "n_train": len(train),
        "n_test": len(tests),
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "peak_rss_mib": rss,
        "rss_after_imports_mib": rss_after_imports,
    }
    if spec["device"].startswith("cuda"):
        measured["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "measured.json").write_text(json.dumps(measured))


def _run_gaussad(
    spec: dict[str, Any], train: list[Path], tests: list[LabeledImage]
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """gaussad with its defaults (or shared maps): fit and scoring times, scores and maps at input size.

    Runs under `cpu_tuning()`, as gaussad's CLI runs: its allocator policy, forward-pass threads and BLAS
    threads."""
    model = GaussAD(
        backbone=spec["backbone"],
        image_size=spec["image_size"],
        device=spec["device"],
        localization=GAUSSAD_LOCALIZATIONS[spec["method"]],
    )
    with cpu_tuning():
        started = time.perf_counter()
        model.fit(train)
        fit_seconds = time.perf_counter() - started
        log(f"  {spec['method']}: fitted in {fit_seconds:.1f} s, scoring {len(tests)} images")
        size = (spec["image_size"], spec["image_size"])
        started = time.perf_counter()
        scores, maps = [], []
        for batch in model.iter_predict([t.path for t in tests], map_sizes=[size] * len(tests)):
            scores.append(batch.scores)
            maps += batch.maps
        score_seconds = time.perf_counter() - started
    return fit_seconds, score_seconds, np.concatenate(scores), np.stack(maps)


class PreparedImages(torch.utils.data.IterableDataset):
    """anomalib ImageItems of images prepared exactly as gaussad prepares them, decoded in threads ahead.

    Same decoding and resizing (``gaussad.features.prepare``), thread count and look-ahead as gaussad's own
    loader, in this process: loading costs the same for every method and its memory counts in this RSS.
    `keep_freed_memory`: hold gaussad's allocator policy while the images are iterated, which is while the
    model runs its forward passes, as gaussad holds it.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        image_size: int,
        workers: int,
        lookahead: int,
        keep_freed_memory: bool,
    ) -> None:
        super().__init__()
        self.paths = list(paths)
        self.labels = list(labels)
        self.image_size = image_size
        self.workers = workers
        self.lookahead = lookahead
        self.keep_freed_memory = keep_freed_memory

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> torch.Tensor:
        pixels, _, _ = prepare(path, self.image_size)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)  # PIL's array: read-only

    def __iter__(self) -> Iterator[Any]:
        from anomalib.data import ImageItem

        allocator = keep_freed_memory() if self.keep_freed_memory else nullcontext()
        with allocator, ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending: deque[Future] = deque()
            queued = 0
            for index, (path, label) in enumerate(zip(self.paths, self.labels, strict=True)):
                while queued < len(self.paths) and queued < index + self.lookahead:
                    pending.append(pool.submit(self._load, self.paths[queued]))
                    queued += 1
                yield ImageItem(image=pending.popleft().result(), gt_label=label, image_path=str(path))


def patch_timm(backbone: str, timm_name: str) -> None:
    """Make ``timm.create_model(timm_name, pretrained=True)`` load gaussad's offline weights, not download.

    Any other pretrained request fails instead of downloading. The weights are loaded (and their SHA-256
    checked) by ``gaussad.backbones.load_backbone``, inside the timed model construction, as gaussad's fit
    loads its backbone inside its timed fit.
    """
    import timm
    from anomalib.models.components.feature_extractors import timm as anomalib_timm

    original = timm.create_model

    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        if not pretrained:
            return original(model_name, pretrained=False, **kwargs)
        if model_name != timm_name:
            raise RuntimeError(f"pretrained {model_name!r} would download: only {timm_name!r} is offline")
        model = original(model_name, pretrained=False, **kwargs)
        trained = load_backbone(backbone, fold_norms=False).model.state_dict()  # anomalib runs the norms
        result = model.load_state_dict(trained, strict=False)
        unused = [key for key in result.unexpected_keys if not key.startswith(HEAD_PREFIXES)]
        if result.missing_keys or unused:
            raise RuntimeError(
                f"{timm_name} weights do not fit: missing {result.missing_keys[:5]}, "
                f"unexpected outside the head {unused[:5]}"
            )
        return model

    timm.create_model = create_model
    # anomalib's extractor calls timm.create_model through the module; patch a from-import too, if any.
    if getattr(anomalib_timm, "create_model", None) is original:
        anomalib_timm.create_model = create_model
    if anomalib_timm.timm is not timm:
        raise RuntimeError("anomalib's feature extractor does not use the timm module patched here")


def _import_anomalib_quietly() -> None:
    """Import anomalib, silencing the chatter expected here (deprecations, no optimizer, no validation...)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    for pattern in (
        r".*validation_step.*",
        r".*configure_optimizers.*",
        r".*IterableDataset.*",
        r".*in eval mode.*",
        r".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # Everything used later, imported now: Lightning sets its loggers' levels on import, silence them after.
    import anomalib.data
    import anomalib.engine
    import anomalib.models
    import anomalib.pre_processing  # noqa: F401

    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_fabric",
        "pytorch_lightning",
        "anomalib",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build_anomalib(
    method: str, timm_name: str, pre_processor: torch.nn.Module, arguments: dict[str, Any]
) -> Any:
    """The anomalib model with raw outputs: our pre-processor; no post-processor, evaluator or visualizer;
    `arguments` as the run's settings give them."""
    from anomalib.models import Dfm, Padim, Patchcore

    model_class = {"padim": Padim, "patchcore": Patchcore, "dfm": Dfm}[method]
    return model_class(
        backbone=timm_name,
        pre_trained=True,
        pre_processor=pre_processor,
        post_processor=False,
        evaluator=False,
        visualizer=False,
        **arguments,
    )


def _run_anomalib(
    spec: dict[str, Any], train: list[Path], tests: list[LabeledImage]
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """An anomalib model fitted and run by anomalib's Engine: fit time, scoring time, raw scores and maps."""
    from anomalib.engine import Engine
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import Callback
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    method, size = spec["method"], spec["image_size"]
    patch_timm(spec["backbone"], spec["timm_name"])

    def loader(paths: Sequence[Path], labels: Sequence[int]) -> torch.utils.data.DataLoader:
        from anomalib.data import ImageBatch

        # gaussad's loader: its default threads, batch size and a look-ahead of two batches.
        dataset = PreparedImages(
            paths,
            labels,
            size,
            DEFAULT_WORKERS,
            2 * DEFAULT_BATCH_SIZE,
            keep_freed_memory=spec["anomalib_allocator"] == "gaussad",
        )
        return torch.utils.data.DataLoader(
            dataset, batch_size=DEFAULT_BATCH_SIZE, collate_fn=ImageBatch.collate
        )

    class Collect(Callback):
        """Keeps only the raw scores and maps of each predicted batch (not the images)."""

        def __init__(self) -> None:
            self.scores: list[torch.Tensor] = []
            self.maps: list[torch.Tensor] = []

        def on_predict_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any
        ) -> None:
            n = len(batch.image)
            self.scores.append(outputs.pred_score.detach().float().cpu().reshape(n))
            self.maps.append(outputs.anomaly_map.detach().float().cpu().reshape(n, size, size))

    collect = Collect()
    with tempfile.TemporaryDirectory(prefix="compare-anomalib-") as root:
        started = time.perf_counter()
        pre_processor = PreProcessor(
            transform=Compose(
                [Resize((size, size), antialias=True), Normalize(mean=spec["mean"], std=spec["std"])]
            )
        )
        model = _build_anomalib(method, spec["timm_name"], pre_processor, spec["anomalib"][method])
        engine = Engine(
            accelerator="gpu" if spec["device"].startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            barebones=True,  # no checkpoint, logs, progress bar or model summary
            default_root_dir=root,
            callbacks=[collect],
        )
        engine.fit(model, train_dataloaders=loader(train, [0] * len(train)))
        fit_seconds = time.perf_counter() - started
        log(f"  {method}: fitted in {fit_seconds:.1f} s, scoring {len(tests)} images")
        test_loader = loader([t.path for t in tests], [t.label for t in tests])
        started = time.perf_counter()
        engine.predict(model, dataloaders=test_loader, return_predictions=False)
        score_seconds = time.perf_counter() - started
    return fit_seconds, score_seconds, torch.cat(collect.scores).numpy(), torch.cat(collect.maps).numpy()


# ------------------------------------------------------------------------------------------------ the driver
def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the models see the image (after EXIF rotation), read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except OSError as error:
        raise GaussADError(f"{path}: cannot read image ({error})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def evaluate(category: Path, outputs: dict[str, np.ndarray], measured: dict[str, Any]) -> dict[str, Any]:
    """Metrics of one method from its raw outputs, maps resized bilinearly to each image's full size."""
    tests = list_test_images(category)
    if [str(t.path) for t in tests] != measured["test_paths"]:
        raise RuntimeError(f"{category}: the method scored other test images than listed here")
    labels = np.array([t.label for t in tests])
    masks, maps = [], []
    for test, score_map in zip(tests, outputs["maps"], strict=True):
        size = _image_size(test.path)
        masks.append(read_mask(test, size))
        maps.append(resize_map(torch.from_numpy(score_map), size).numpy())
    pixel_auroc, aupro = pixel_metrics(masks, maps)
    return {
        "image_auroc": image_auroc(labels, outputs["scores"]),
        "pixel_auroc": pixel_auroc,
        "aupro": aupro,
        "test_images_per_second": measured["n_test"] / measured["score_seconds"],
    }


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method in a fresh process and evaluate its outputs here; a failure is recorded, not raised."""
    record = {"category": Path(spec["category"]).name, "method": spec["method"]}
    with tempfile.TemporaryDirectory(prefix="compare-anomalib-") as work:
        spec_path = Path(work) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), "--single", str(spec_path)]
        started = time.perf_counter()
        # The child's stdout (Lightning's messages) joins our stderr: stdout stays free.
        done = subprocess.run(command, stdout=sys.stderr, check=False)
        record["wall_seconds"] = time.perf_counter() - started
        if done.returncode != 0:
            log(f"  {spec['method']}: FAILED (exit code {done.returncode})")
            return {**record, "error": f"exit code {done.returncode}"}
        measured = json.loads((Path(work) / "measured.json").read_text())
        with np.load(Path(work) / "outputs.npz") as outputs:
            metrics = evaluate(Path(spec["category"]), dict(outputs), measured)
    measured.pop("test_paths")
    return {**record, **measured, **metrics}


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "–"
    return f"{numerator / denominator:.2f}"


def markdown(command: str, settings: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The results table with the command and the settings above it."""
    lines = [
        "# gaussad vs anomalib (PaDiM, PatchCore, DFM): same backbone weights, input size and metric code",
        "",
        f"Command: `{command}`",
        "",
        f"- backbone: {settings['backbone']} (timm {settings['timm_name']}, gaussad's offline weights), "
        f"input {settings['image_size']}x{settings['image_size']}, normalization mean {settings['mean']} "
        f"std {settings['std']}, device {settings['device']}, seed {settings['seed']}",
        f"- machine: {settings['cpu']}; {settings['cpus']} CPUs, torch threads {settings['torch_threads']}; "
        "versions: " + ", ".join(f"{name} {v}" for name, v in settings["versions"].items()),
        "- gaussad: defaults (`GaussAD(backbone=..., image_size=...)`); gaussad-shared: the same with "
        '`localization="shared"`',
        *(
            f"- {method}: " + ", ".join(f"{key} {value}" for key, value in values.items())
            for method, values in settings["anomalib"].items()
        ),
        "- anomalib: timm features_only indices (1, 2, 3 = stride 4, 8, 16); raw scores and maps "
        "(post-processor, evaluator, visualizer off)",
        "- allocator policy: gaussad's own (gaussad.allocator) for gaussad; "
        + (
            "the same for anomalib (--anomalib-allocator gaussad)"
            if settings["anomalib_allocator"] == "gaussad"
            else "glibc's default for anomalib"
        ),
        "- metrics: gaussad.metrics on each method's raw scores and maps, maps resized bilinearly to each "
        "image's full resolution; AUPRO up to FPR 0.3",
        "- fit s: model construction (weights loading) + fitting; test img/s: loading + scoring of all test "
        "images; peak RSS: VmHWM of the method's own fresh process (its peak after the imports alongside)",
        "- ratios: gaussad's advantage (>1 = gaussad better): method fit s / gaussad fit s, gaussad img/s / "
        "method img/s, method peak RSS / gaussad peak RSS",
        "",
        "| category | method | train / test images | image AUROC | pixel AUROC | AUPRO | fit s | test img/s "
        "| peak RSS MiB | RSS after imports MiB | fit-time ratio | throughput ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {r["category"]: r for r in records if r["method"] == "gaussad" and "error" not in r}
    for r in records:
        if "error" in r:
            lines.append(f"| {r['category']} | {r['method']} | failed ({r['error']}) |" + " |" * 10)
            continue
        g = reference.get(r["category"], {})
        lines.append(
            f"| {r['category']} | {r['method']} | {r['n_train']} / {r['n_test']} | {r['image_auroc']:.4f} "
            f"| {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_seconds']:.1f} "
            f"| {r['test_images_per_second']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_after_imports_mib']:.0f} "
            f"| {_ratio(r['fit_seconds'], g.get('fit_seconds'))} "
            f"| {_ratio(g.get('test_images_per_second'), r['test_images_per_second'])} "
            f"| {_ratio(r['peak_rss_mib'], g.get('peak_rss_mib'))} |"
        )
    return "\n".join(lines) + "\n"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Backbone details (timm name, native size, normalization) and the environment: for children, report."""
    backbone = load_backbone(args.backbone)
    preprocessing = backbone.preprocessing
    return {
        "backbone": args.backbone,
        "timm_name": backbone.model.pretrained_cfg["architecture"],
        "image_size": args.image_size or preprocessing.image_size,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "device": args.device,
        "seed": args.seed,
        "anomalib_allocator": args.anomalib_allocator,
        "anomalib": {
            **ANOMALIB_SETTINGS,
            "patchcore": {**ANOMALIB_SETTINGS["patchcore"], "coreset_sampling_ratio": args.patchcore_coreset},
        },
        "cpu": cpu_description(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("gaussad", "anomalib", "torch", "timm", "lightning")},
    }


def read_every_file(category: Path) -> None:
    """Read each image and mask of a category once: the first method then does not pay alone for reading
    them from disk, and a category without images fails before any method runs."""
    tests = list_test_images(category)
    for path in [*training_images(category), *(t.path for t in tests), *(t.mask_path for t in tests)]:
        if path is not None:
            path.read_bytes()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line; run every (category, method) in turn and write the report after each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="*", type=Path, help="category folders (or folders of them)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--backbone", choices=available_backbones(), default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: backbone's, 224)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds PaDiM's feature subset, PatchCore's start")
    parser.add_argument(
        "--anomalib-allocator",
        choices=("default", "gaussad"),
        default="default",
        help="allocator policy of anomalib's processes: glibc's default, or gaussad's (gaussad.allocator)",
    )
    parser.add_argument(
        "--patchcore-coreset",
        type=float,
        default=ANOMALIB_SETTINGS["patchcore"]["coreset_sampling_ratio"],
        help="PatchCore's coreset sampling ratio (default: anomalib's, 0.1); its fit time grows with it",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_anomalib.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--single", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single is not None:
        run_single(args.single)
        return
    if not args.categories:
        parser.error("give at least one category folder")
    if not 0.0 < args.patchcore_coreset <= 1.0:
        parser.error(f"--patchcore-coreset {args.patchcore_coreset}: expected a fraction in (0, 1]")
    try:
        categories = [c for root in args.categories for c in find_categories(root)]
        for category in categories:  # fail now on bad data, not after an hour of another method
            read_every_file(category)
        settings = _settings(args)
    except GaussADError as error:
        parser.error(str(error))

    command = shlex.join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    records: list[dict[str, Any]] = []
    jobs = [(category, method) for category in categories for method in args.methods]
    for index, (category, method) in enumerate(jobs, 1):
        log(f"[{index}/{len(jobs)}] {category.name}: {method}")
        spec = {**settings, "method": method, "category": str(category)}
        record = run_method(spec)
        if "error" not in record:
            log(
                f"  {method}: image AUROC {record['image_auroc']:.4f}, "
                f"pixel AUROC {record['pixel_auroc']:.4f}, AUPRO {record['aupro']:.4f}, "
                f"fit {record['fit_seconds']:.1f} s, "
                f"{record['test_images_per_second']:.2f} img/s, peak RSS {record['peak_rss_mib']:.0f} MiB"
            )
        records.append(record)
        _write(args, command, settings, records)
    log(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


def _write(args: argparse.Namespace, command: str, settings: dict[str, Any], records: list[dict]) -> None:
    """(Re)write the Markdown report and the optional JSON with the records so far."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(command, settings, records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "settings": settings,
            "results": records,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
