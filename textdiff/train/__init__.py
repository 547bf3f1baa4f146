"""The train stage: one loop for every trained model (the classifier and the U-Net baseline)."""
