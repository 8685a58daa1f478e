"""pawpular: the PetFinder Pawpularity pipeline (fine-tuned timm Swin + SVR head + OOF-weighted ensemble)."""
__version__ = "0.1.0"
