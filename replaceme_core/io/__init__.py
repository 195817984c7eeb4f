"""What the method and every experiment share: loading a model by name, directory or hub id (``models``),
calibration and held-out text turned into token batches (``data``), and content-hashed, atomically written
cache files (``cache``)."""
