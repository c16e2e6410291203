"""Typed settings, parsed from ``params.yaml``: one module per section, and :mod:`.base` for loading.

Each stage declares the sections it reads as a :class:`~pipeline.settings.base.StageParams` view, so its
DVC code deps are exactly the settings it reads; :mod:`.params` validates the whole file.
"""
