"""What ships: ``pawpular export`` (one folder for an offline Kaggle notebook), ``predict`` from that folder, the
shipped model file, the notebook and the library versions recorded. Imports the pipeline (``runner``, ``stages``)
and the packages below it; the predictor itself imports no stage."""
