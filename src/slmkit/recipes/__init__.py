"""Recipes: each stage of the lifecycle as one function that reads top to bottom, over the library packages.
The CLI calls these; a Python user can too."""
