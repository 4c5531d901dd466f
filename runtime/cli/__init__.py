"""The ``m2cache`` command line: ``main`` (generate, fetch, convert, demo, bench, ...) and ``quality``
(train-predictor, policies, tune, eval). The outermost layer: imports everything, imported by nothing.
"""
