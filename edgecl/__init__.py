"""edgecl: online continual learning for edge devices."""
__version__ = "0.1.0"
