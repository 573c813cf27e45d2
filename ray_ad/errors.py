"""User-facing errors.

Everything that a user can cause (a bad URI, a corrupt file, a wrong config value) raises a subclass
of `RayADError` whose message names the bad value. The CLI turns these into one line on stderr and a
non-zero exit code instead of a traceback from deep inside torch.
"""


class RayADError(Exception):
    """Base class for errors caused by input, not by a bug."""


class ConfigError(RayADError, ValueError):
    """A config file or `--set key=value` override is invalid."""


class DataError(RayADError):
    """A dataset, image, mask or manifest is missing, unreadable or inconsistent."""


class ImageTooLarge(DataError):
    """An image whose header declares more pixels than the caller's limit (nothing of it is decoded)."""


class WeightsError(RayADError):
    """A backbone weight source is missing or does not fit the model."""


class BundleError(RayADError):
    """A model bundle is missing, truncated or tampered with."""
