"""ImageNet's per-channel pixel statistics (RGB, pixels in [0, 1]): the normalization of the
reference recipe and of every network pretrained on ImageNet."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
