"""The trained part: the pixel classifier, its losses, its predictions and its card on disk."""
