"""GILL: a frozen causal LM and a frozen CLIP vision encoder joined by small trained layers and learned
[IMG] tokens, reading interleaved images and text and answering with text, retrieved, generated and edited
images.

``import gill`` stays light: torch only; transformers, diffusers, faiss and friends load where used.
"""

from gill.checkpoint import CheckpointError, convert_original, load_model, read_model_dir, save_model
from gill.config import ConfigError, DecisionConfig, GILLConfig, MapperConfig, PreprocessConfig, TokenConfig
from gill.decision import DecisionHead
from gill.generate import DecodeOptions
from gill.diffusion import DiffusionOptions
from gill.model import CaptionOutput, GILLAdapter, GILLModel, ImageEncoding, ImgTokenOutput, LMOutput
from gill.pipeline import GILL, EditedImage, EditSource, GeneratedImage, NoEditSourceError, RetrievedImage, Segment, Text
from gill.settings import LIBRARY_DEFAULTS, RunSettings, resolve_settings
from gill.retrieval import EmbeddingIndex, FaissIndex, ImageEmbedder, ImageRecord, IndexMismatchError, open_index
from gill.tokens import ImageTokens, add_image_tokens

__version__ = "0.1.0"

__all__ = [
    "GILL", "DecodeOptions", "DiffusionOptions", "EditedImage", "EditSource", "EmbeddingIndex", "GeneratedImage",
    "ImageRecord", "NoEditSourceError",
    "RetrievedImage", "Segment", "Text", "FaissIndex", "ImageEmbedder", "IndexMismatchError", "open_index",
    "CaptionOutput", "CheckpointError", "ConfigError", "DecisionConfig", "DecisionHead", "GILLAdapter",
    "GILLConfig", "GILLModel", "ImageEncoding", "ImageTokens", "ImgTokenOutput", "LMOutput", "MapperConfig",
    "PreprocessConfig", "TokenConfig", "add_image_tokens", "convert_original", "load_model", "read_model_dir",
    "save_model", "RunSettings", "LIBRARY_DEFAULTS", "resolve_settings",
]
