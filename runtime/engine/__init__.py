"""The engine at run time: config, tier sizing, policies, loading, the ``Engine`` and its stats
(``metrics``, over ``m2cache.figures``).

May import ``m2cache.actors``, ``.storage``, ``.model``, ``.trace.recorder`` and the package root; never
the offline tools, the bench or the CLI.
"""
