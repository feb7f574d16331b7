"""ddlib: dataset distillation for teaching and research."""
__version__ = "0.1.0"
