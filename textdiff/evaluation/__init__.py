"""The evaluate stage: scoring against the ground truths, the metrics themselves, and the panels."""
