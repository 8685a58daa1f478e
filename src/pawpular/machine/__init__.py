"""The machine: its facts (driver, GPU, torch build), the CUDA and RAPIDS build rules, the installer
(``install_plan.py``, also run as a file with the standard library only), the one module that imports cuDF / cuML
(``backend``), and torchrun's process group (``distributed``). Imports ``store`` only."""
