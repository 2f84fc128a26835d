"""Evaluation of frozen backbones: weighted k-NN, linear probe, feature extraction.

``knn_eval``, ``linear_probe`` and ``extract_features`` are the functions behind ``dino knn``,
``dino linear`` and ``dino extract``; ``video_segmentation``, ``image_retrieval`` and
``copy_detection`` those behind ``dino track``, ``dino retrieval`` and ``dino copy-detection``;
``classify_images`` and ``finetune_backbone`` those behind ``dino classify`` and ``dino finetune``;
each takes a module or anything :func:`dino.load_backbone` accepts.
"""

from dino.eval.api import extract_features, knn_eval
from dino.eval.classify import classify_images
from dino.eval.copy_detection import copy_detection
from dino.eval.finetune import finetune_backbone
from dino.eval.linear import linear_probe
from dino.eval.retrieval import image_retrieval
from dino.eval.video_segmentation import video_segmentation

__all__ = [
    "classify_images",
    "copy_detection",
    "extract_features",
    "finetune_backbone",
    "image_retrieval",
    "knn_eval",
    "linear_probe",
    "video_segmentation",
]
