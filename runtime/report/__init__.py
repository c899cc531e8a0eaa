"""``diffiml report``: the static HTML page over a scan's table or a ``localize --report`` run. It reads the scan
table with pyarrow, imported inside this package only (tests/test_layout.py)."""
