"""Evaluation of frozen backbones: weighted k-NN, linear probe, feature extraction.

``knn_eval``, ``linear_probe`` and ``extract_features`` are the functions behind ``dino knn``,
``dino linear`` and ``dino extract``; each takes a module or anything
:func:`dino.load_backbone` accepts.
"""

from dino.eval.api import extract_features, knn_eval
from dino.eval.linear import linear_probe

__all__ = ["extract_features", "knn_eval", "linear_probe"]
