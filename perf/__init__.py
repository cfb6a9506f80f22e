"""Performance benches (`make bench-...`): each prints a table and writes JSON.

Speeds are compared as ratios measured side by side in one run, never against a number from another run.
"""
