"""Offline tools that write or judge a store: fetch/convert, synth, export-gguf, train-predictor, tune, eval.

They run before (or beside) the engine, never inside it; they may import the engine.
"""
