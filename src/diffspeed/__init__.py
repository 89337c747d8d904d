"""diffspeed: fast, lean Stable Diffusion inference, with the quality cost of every speed-up measured."""

__version__ = "0.1.0"

from diffspeed.errors import DiffspeedError  # noqa: E402
from diffspeed.generate import GenerateRequest, GenerateResult, generate, save_images  # noqa: E402
from diffspeed.pipelines.load import SHIPPED, load, model_hash  # noqa: E402

__all__ = ["DiffspeedError", "GenerateRequest", "GenerateResult", "SHIPPED", "generate", "load", "model_hash",
           "save_images", "__version__"]

from diffspeed.core import Accelerated, Recipe, RecipeError, accelerate  # noqa: E402

__all__ += ["Accelerated", "Recipe", "RecipeError", "accelerate"]

from diffspeed.pipelines.cache import ModelCache  # noqa: E402
from diffspeed.pipelines.convert import ConvertReport, convert_checkpoint  # noqa: E402

__all__ += ["ConvertReport", "ModelCache", "convert_checkpoint"]

# diffspeed.bench(...) runs a benchmark (the package is callable; its modules stay diffspeed.bench.<module>)
from diffspeed import bench  # noqa: E402
from diffspeed.presets import PRESETS, preset_recipe  # noqa: E402

__all__ += ["PRESETS", "bench", "preset_recipe"]
