"""Training, evaluation and inference machinery.

Submodules are imported on use (``from libra_rcnn.engine.train import train``) so that importing
one of them does not pull in the others' dependencies (pycocotools, tensorboard, matplotlib).
"""
