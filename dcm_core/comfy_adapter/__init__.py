"""The only part of the pack that talks to ComfyUI (``comfy``, ``folder_paths``, ``latent_preview``).

The nodes in ``nodes/`` are thin V3 schemas; each ``execute`` makes one call into this package:

* :mod:`.loading`  — folder lookups, the DCM checkpoint loader (semantic ModelPatcher + detail
  clone with weight patches and a coverage check), the expert-LoRA loader, the read cache.
* :mod:`.sampling` — the dual-expert GUIDER (two chained ``CFGGuider`` runs split at the
  boundary) shared by the sampler node and the guider node, input validation, NaN detection,
  progress / cancel handling and restoring the shared base weights afterwards.
* :mod:`.plot`     — the schedule picture of ``DCM Schedule`` (PIL + numpy only, no ComfyUI).

This ``__init__`` imports nothing from ComfyUI, so ``dcm_core.comfy_adapter.plot`` can be used
(and unit-tested) without a ComfyUI work tree.
"""
