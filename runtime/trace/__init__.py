"""Tracing: the recorder every actor writes spans to (``recorder``) and the exporters that turn a trace
into Chrome trace-event JSON, a summary, PNG and HTML (``export``, gathering ``chrome``, ``summary``,
``png`` and ``html``, which share ``layout``); ``browser`` checks the HTML page in headless Chromium.
"""
