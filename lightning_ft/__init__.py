"""lightning_ft: fine-tune and pretrain Hugging Face language models with PyTorch Lightning and Hydra."""

import time

__version__ = "0.1.0"
IMPORTED_AT = time.perf_counter()  # start-up is measured from here (the first lightning_ft import of the process)
