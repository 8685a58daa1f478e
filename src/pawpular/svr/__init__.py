"""The SVR head: its features and kernel, the fits and what ships of them (``head``), the Optuna study that tunes
it and its storage, its search space and memory, the embedding sets it reads, and forward selection. Imports
``scores`` and the packages below it, never ``model``."""
