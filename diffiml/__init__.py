"""DiffIML: score-based image manipulation localization."""
__version__ = "0.1.0"
