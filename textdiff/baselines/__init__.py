"""What TextDiff is measured against through the same stages: hematoxylin + Otsu (no labels),
MONAI's U-Net from scratch, and Cellpose 3 from scratch (the `cellpose` package, its own loop)."""
