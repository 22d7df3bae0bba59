"""med_train: train BLIP-style image captioners (timm ViT + multimodal BERT decoder).

    med train configs/shapes.yaml
    med eval --model runs/latest
    med caption photo.jpg --model runs/latest
"""

__version__ = "0.1.0"
