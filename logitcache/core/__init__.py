"""Shared core: configuration, data, models, views, features, training machinery and file I/O."""
