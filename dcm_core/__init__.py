"""dcm_core: the DCM engine (schedules, routing, checkpoint formats, sampler, trainer).

Nothing in this package imports ComfyUI except :mod:`dcm_core.comfy_adapter`, which the
nodes use. Importing ``dcm_core`` is cheap: submodules are imported on demand.
"""

__version__ = "0.1.0"
