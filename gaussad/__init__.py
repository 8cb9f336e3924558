"""gaussad: unsupervised visual anomaly detection with Gaussians over deep CNN features."""

from gaussad.errors import GaussADError

__version__ = "0.1.0"
__all__ = ["GaussAD", "GaussADError", "Prediction", "__version__"]


def __getattr__(name: str):
    """Import the model (and so torch) only when it is used: metrics and CLI help start fast."""
    if name in ("GaussAD", "Prediction"):
        from gaussad import model

        return getattr(model, name)
    raise AttributeError(f"module 'gaussad' has no attribute {name!r}")
