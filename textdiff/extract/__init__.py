"""The extract stage: run the frozen encoders once per image, view and timestep into the cache."""
