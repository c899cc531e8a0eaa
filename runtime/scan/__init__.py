"""``diffiml scan``: localize many images on Ray Data into a resumable Parquet table. Its optional dependencies, Ray
and pyarrow (``pip install 'diffiml[scan]'``), are imported inside this package only; the core runtime never needs
them (tests/test_layout.py)."""
