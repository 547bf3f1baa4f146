"""cache/features.zarr: the spec of what the features depend on, the store (write, verify, read) and
training's samples."""
