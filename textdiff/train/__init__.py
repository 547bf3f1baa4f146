"""The train stage: one loop for every trained model (the classifier and the U-Net baseline), and
Cellpose's own loop for the Cellpose baseline (`cellpose.py`)."""
