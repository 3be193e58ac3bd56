"""Weight conversion from public checkpoints (segment-anything SAM, ...) to PosSAM's layout."""

from .sam import convert_sam_image_encoder, infer_sam_vision_config, load_checkpoint


__all__ = ["convert_sam_image_encoder", "infer_sam_vision_config", "load_checkpoint"]
from .open_clip import convert_open_clip, open_clip_to_possam_kwargs


__all__ += ["convert_open_clip", "open_clip_to_possam_kwargs"]
from .fcclip import FCCLIP_DROPPED_PREFIXES, convert_fcclip_decoder, load_fcclip_checkpoint


__all__ += ["FCCLIP_DROPPED_PREFIXES", "convert_fcclip_decoder", "load_fcclip_checkpoint"]
