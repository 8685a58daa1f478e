"""Files on disk: the project's error types, every output path (``artifacts``), atomic writes and reads
(``files``), manifests, locks, the rule for what a command may write over (``guards``), secret masking, and the
shared embedding cache. The bottom layer: it imports no other pawpular package."""
