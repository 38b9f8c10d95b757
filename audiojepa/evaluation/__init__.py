"""Downstream evaluation of frozen encoders: task sources, linear probe, kNN, reports."""
