"""What a user reads: ``pawpular runs`` (experiments side by side), ``pawpular report`` and its results tables and
plots. Imports the pipeline (``runner``, ``stages``) and the packages below it."""
