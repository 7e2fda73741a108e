"""Data: dataset caches, importers, the quickstart glyph set and the task sampler."""
