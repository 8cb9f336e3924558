"""The model's option names and defaults, importable without torch: the CLI builds its parser from them."""

REDUCTIONS: tuple[str, ...] = ("opca", "pca", "none")
LOCALIZATIONS: tuple[str, ...] = ("hybrid", "shared", "per-position")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_REDUCTION = "opca"
DEFAULT_VARIANCE = 0.05  # OPCA: the smallest components holding 5% of the variance (paper)
DEFAULT_LOCALIZATION = "hybrid"  # measured: README, "How the defaults were chosen"
DEFAULT_BLUR_SIGMA = 2.0  # measured likewise
DEFAULT_IMAGE_GRID = 4  # image score: level features averaged per cell of a 4 x 4 grid (measured likewise)
DEFAULT_PRECISION = "fp32"
DEFAULT_FOLDS = 5  # label-free calibration
DEFAULT_FALSE_ALARM_RATE = 0.01
DEFAULT_BATCH_SIZE = 16  # as fast as 32 on CPU with the allocator kept warm (gaussad.allocator), 150 MiB less
DEFAULT_WORKERS = 2  # threads decoding images
