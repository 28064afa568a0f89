"""The benchmark: dbservice against its alternatives, side by side, in one run.

Run it with ``python -m dbservice.bench`` (``--help`` lists the options).
"""
