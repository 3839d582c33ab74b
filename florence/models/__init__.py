"""Florence's models: the CoSwin image tower, the text tower, the two-tower Florence, named configs."""

from .coswin import CoSwin, coswin_param_count
from .detection import ATSSDetector
from .factory import create_coswin, create_model, get_config, list_models
from .florence import Florence, load_state_dict_strict
from .meter import METER
from .text import TextTransformer
from .video import FlorenceVideo, VideoClassifier, VideoCoSwin, create_video_coswin, load_florence

__all__ = ["ATSSDetector", "CoSwin", "Florence", "FlorenceVideo", "METER", "TextTransformer", "VideoClassifier",
           "VideoCoSwin", "coswin_param_count", "create_coswin", "create_model", "create_video_coswin", "get_config",
           "list_models", "load_florence", "load_state_dict_strict"]  # fmt: skip
