"""``m2cache bench``: the harness, the systems it measures (each in a child process), the memory limit,
the bench model and the report. Imports the engine and the offline tools; nothing imports it but the CLI.
"""
