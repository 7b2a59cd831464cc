"""fedge hub: aggregates site prototypes, synthesizes with a foundation model, trains and unlearns.

Importing `hub` is cheap; torch loads only with the modules that need it.
"""
