"""The optimization core: recorded edits, per-call state, the Optimization base, recipes, accelerate()."""

from diffspeed.core.accelerate import Accelerated, accelerate
from diffspeed.core.edits import Edits
from diffspeed.core.optimization import (
           OptConfig,
           Optimization,
           all_optimizations,
           get_optimization,
           param,
           register,
)
from diffspeed.core.recipe import Recipe, RecipeError
from diffspeed.core.state import RunState

__all__ = ["Accelerated", "Edits", "OptConfig", "Optimization", "Recipe", "RecipeError", "RunState", "accelerate",
           "all_optimizations", "get_optimization", "param", "register"]
