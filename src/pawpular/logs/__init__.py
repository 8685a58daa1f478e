"""What a run tells as it goes: the terminal log and progress bars (``progress``), Ctrl-C handling
(``interrupts``), and the experiment trackers (TensorBoard, W&B: ``tracking``). Imports ``store``,
``config`` and ``machine``."""
