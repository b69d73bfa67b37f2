"""minimrcnn: Mask R-CNN from scratch, small enough to read, fast enough to train on a laptop.

Conventions used everywhere in the package:

- boxes are absolute-pixel ``xyxy`` float32 tensors ``[R, 4]``;
- label 0 is the background and ``num_classes`` counts it;
- RoIs are ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)``;
- images are float ``[3, H, W]`` RGB in [0, 1]; the model normalizes them itself.
"""

from minimrcnn.config import Config, get_config, list_configs

__version__ = "0.1.0"


def __getattr__(name):
    # The model pulls in every module; import it only when asked for.
    if name == "MaskRCNN":
        from minimrcnn.modeling.model import MaskRCNN

        return MaskRCNN
    raise AttributeError(f"module 'minimrcnn' has no attribute {name!r}")


__all__ = ["Config", "MaskRCNN", "get_config", "list_configs", "__version__"]
