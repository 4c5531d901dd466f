"""Tracing: the recorder every actor writes spans to (``recorder``) and the exporters that turn a trace
into Chrome trace-event JSON, a summary, PNG and HTML (``export``). The recorder imports nothing of m2cache.
"""
