"""Recipes to build, update, query and import retrieval indexes (``python -m index.build`` ...)."""
