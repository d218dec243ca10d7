"""zspace's benchmarks: `python -m benchmarks.NAME` from a checkout (README.md here gives the order).

Every script prints its figures, writes them to benchmarks/results/NAME.json and
checks them against the targets in targets.py; harness.py holds what they share
(free ports, server child processes, closed-loop load, side-by-side rounds).
"""
