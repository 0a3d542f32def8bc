"""``genserve bench``: a load generator for genserve or any OpenAI-images-compatible endpoint.

workload.py (pure: request mix, arrival times) · runner.py (HTTP) · report.py (pure: summary,
tables, comparison) · plot.py (PNG).
"""
