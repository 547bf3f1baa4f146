"""TextDiff: a frozen diffusion teacher + clinical text -> a light pixel classifier.

Data flows one way: dataset -> teacher features -> zarr cache -> classifier -> metrics.
"""

__version__ = "0.1.0"
