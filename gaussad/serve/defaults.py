"""The service's defaults, stated once for the command line and the settings (no imports: the CLI's help
reads them without loading the service)."""

DEFAULT_AUDIT = "gaussad-audit.sqlite3"  # a SQLite file in the working folder
MAX_BATCH_SIZE = 16
MAX_QUEUE_DELAY_MS = 5.0
MAX_QUEUE = 256  # images in the service at once; more are answered 503
MAX_BODY_BYTES = 32 << 20
MAX_PIXELS = 100_000_000  # gaussad.images.DEFAULT_MAX_PIXELS, restated here to keep the CLI help light
DRIFT_WINDOW = 500
