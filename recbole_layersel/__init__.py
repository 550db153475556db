"""recbole_layersel: a RecBole plugin that turns a pretrained LLM into a fast sequential recommender
by keeping only its most important transformer layers."""

from recbole_layersel.errors import LayerSelError

__version__ = "0.1.0"
__all__ = ["LayerSelError", "__version__"]
