"""What TextDiff is measured against through the same stages: hematoxylin + Otsu (no labels) and
MONAI's U-Net from scratch."""
