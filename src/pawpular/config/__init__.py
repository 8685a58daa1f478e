"""The typed config: the YAML schema and its load-time checks (``schema``, ``checks``, ``set_checks``), the SVR heads
a config declares (``heads``), the YAML reader and writer, and ``pawpular config``'s view. Imports ``store`` only."""
