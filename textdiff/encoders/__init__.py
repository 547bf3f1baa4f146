"""The frozen encoders: image features (the diffusion teacher, or raw pixels for the control) and
the report's token embeddings."""
