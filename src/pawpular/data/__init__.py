"""The competition's data: the CSV contract (``tables``), photo decoding, fingerprints (``digest``), the torch
dataset, folds and holdout (``splits``), duplicate photos, and the embedded synthetic competition. Imports
``store``, ``config`` and ``logs``."""
