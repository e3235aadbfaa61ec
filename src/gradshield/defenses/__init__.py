"""Defenses: training recipes (a batch -> a loss) and the inference-time concealment module."""

from gradshield.defenses.concealment import GradientConcealment, conceal
from gradshield.defenses.recipes import RECIPES, Recipe, StandardRecipe, make_recipe

__all__ = ["RECIPES", "GradientConcealment", "Recipe", "StandardRecipe", "conceal", "make_recipe"]
