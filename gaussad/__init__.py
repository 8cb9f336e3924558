"""gaussad: unsupervised visual anomaly detection with Gaussians over deep CNN features."""

from gaussad.config import ModelConfig
from gaussad.errors import GaussADError

__version__ = "0.1.0"
__all__ = ["GaussAD", "GaussADError", "ModelConfig", "Prediction", "__version__", "cpu_tuning"]

_LAZY = {"GaussAD": "gaussad.model", "Prediction": "gaussad.model", "cpu_tuning": "gaussad.tuning"}


def __getattr__(name: str):
    """Import the model (and so torch) only when it is used: metrics and CLI help start fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gaussad' has no attribute {name!r}")
