"""TEMPORARY placeholder (the parity branch brings the real one)."""
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class MMDetTransform(GeneralizedRCNNTransform):
    def __init__(self, min_size, max_size):
        super().__init__(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
