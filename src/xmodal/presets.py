"""``xmodal.presets``, the name the README gives: the presets (:mod:`xmodal.models.presets`),
:func:`load_model` (:mod:`xmodal.models.loading`) and :func:`assemble`
(:mod:`xmodal.models.assembly`), importable from here too."""

from xmodal.models.assembly import assemble, image_processor_options
from xmodal.models.loading import load_model
from xmodal.models.presets import PRESETS, offline_default, preset_configs, seed

__all__ = [
    "PRESETS",
    "assemble",
    "image_processor_options",
    "load_model",
    "offline_default",
    "preset_configs",
    "seed",
]
