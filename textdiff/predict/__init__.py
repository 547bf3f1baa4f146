"""`textdiff predict`: a trained model on new images and whole slides."""
