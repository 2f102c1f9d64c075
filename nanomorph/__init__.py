"""nanomorph: self-supervised TEM image analysis, from unlabeled folders to a served model."""

__version__ = "0.1.0"
