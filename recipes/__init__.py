"""Whole-pipeline recipes (`python -m align recipe=<file stem>`); see align/config/recipes.py."""
