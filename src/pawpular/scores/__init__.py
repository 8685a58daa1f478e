"""Scores and the choices made on them: RMSE, the OOF blend, nested scores and paired bootstraps, comparisons
between experiments, whether a score can be trusted, the inference budget, and the submission file. Imports the
packages below it (``store``, ``config``, ``machine``, ``logs``, ``data``)."""
