"""Display names of the pack's nodes: defined once, used by the node schemas (``nodes/texts.py``) and
by the adapter's error messages (which start with the name of the node that failed). No ComfyUI import."""

CHECKPOINT_NODE = "DCM Checkpoint Loader"
EXPERT_NODE = "DCM Expert LoRA Loader"
SCHEDULE_NODE = "DCM Schedule"
SPLIT_NODE = "DCM Timestep Split"
SAMPLER_NODE = "DCM Dual-Expert Sampler"
GUIDER_NODE = "DCM Dual-Expert Guider"
TOY_TEXT_NODE = "DCM Toy Text Encode"
TOY_DECODE_NODE = "DCM Toy Decode"
