"""The exceptions comfy-dmd2 raises for bad input. Each message is one line that names the problem and the fix.

Every command catches :class:`DMD2Error`, prints ``error: <message>`` and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class DMD2Error(Exception):
    """Base class: a problem with what the user gave us, not a bug."""


class ModelLoadError(DMD2Error):
    """A model path or file cannot be read: missing, truncated, corrupt, or a pickle without opt-in."""


class UnsupportedModelError(DMD2Error):
    """The file is readable but is not an SDXL-family checkpoint (SD1.5, SD2, Flux, a LoRA, ...)."""


class ConfigError(DMD2Error):
    """An invalid training or generation option."""


class DataError(DMD2Error):
    """Prompts or images that cannot be used: empty prompt list, missing folder, unreadable image."""


class LoRAFormatError(DMD2Error):
    """A LoRA file whose keys do not map onto the model."""


class TrainingDivergedError(DMD2Error):
    """A loss became NaN or infinite; the last good checkpoint is left untouched."""
