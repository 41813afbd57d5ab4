"""The one generic per-worker training loop that every model plugs into (see `loop.py`)."""
