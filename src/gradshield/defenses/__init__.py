"""Defenses: training recipes (a batch -> a loss) and inference-time modules."""

from gradshield.defenses.recipes import RECIPES, Recipe, StandardRecipe, make_recipe

__all__ = ["RECIPES", "Recipe", "StandardRecipe", "make_recipe"]
