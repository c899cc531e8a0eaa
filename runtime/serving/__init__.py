"""``diffiml serve`` and its client: a bundle behind NVIDIA Triton (PyTriton). PyTriton, which forces numpy < 2 and so
lives in its own venv (``.venv-serve``), is imported inside this package only (tests/test_layout.py)."""
