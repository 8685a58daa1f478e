"""The neural network: the timm backbone and head with its fine-tuning modes, one fold's training, the one
inference path (precision, TTA), compression, and what identifies a frozen backbone. Imports ``scores`` and the
packages below it, never ``svr``."""
