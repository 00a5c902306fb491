"""What fine-tuning trains: `builders` (timm models by name, `vgg-mlp`, and the image format each wants)
and `hf` (transformers models: which to load, how, and their preprocessing)."""
