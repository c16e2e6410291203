"""DPO-family preference optimisation pipeline: reusable core (stages/ call into this) and Prefect flows."""

__version__ = "0.1.0"
