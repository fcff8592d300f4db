"""The source layouts of design.md §5.2: detection, configuration and the name/shape map.

The map runs from the MLX model's side: for every parameter of `SFLLaVA(config)` a
template gives the source tensor(s) it is made of and how (copy, conv transpose,
position-table reshape, q/k/v fusion). What that leaves over in the checkpoint is
either known to be unused (dropped, with a reason), a learned separator (an error:
design.md §1.6 has no place for it) or unknown (an error).
"""

from .configs import model_config, text_config, vision_config
from .names import HF, LAYOUTS, ORYX, SIGLIP, canonical_names, detect_layout
from .rules import (
    STORED_HF_MARKERS,
    Rule,
    TensorMap,
    group_dropped,
    map_tensors,
    report,
    stored_hf_weights,
    summary_line,
    transform,
)

__all__ = ["HF", "LAYOUTS", "ORYX", "TensorMap", "Rule", "SIGLIP", "STORED_HF_MARKERS", "canonical_names", "detect_layout",
           "group_dropped", "model_config", "map_tensors", "report", "stored_hf_weights", "summary_line", "text_config",
           "transform", "vision_config"]
