"""The command line (``main``, ``args``) over the Python API (``pawpular.api``), ``doctor`` and the ``select --as``
branch. The top layer: nothing imports it but ``python -m pawpular``."""
