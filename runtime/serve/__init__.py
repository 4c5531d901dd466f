"""``m2cache serve``: an OpenAI-compatible HTTP server over one engine (FastAPI on uvicorn).

``protocol`` (request and response shapes), ``generation`` (token ids to text deltas, stop strings),
``metrics`` (Prometheus), ``app`` (the routes and what errors get), ``server`` (uvicorn, draining).
Needs the ``serve`` extra; imports the engine, imported only by the CLI.
"""
