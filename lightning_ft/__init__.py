"""lightning_ft: fine-tune and pretrain Hugging Face language models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
