"""Speed and memory benchmarks of libra-rcnn (not tests; they do not run in CI).

Each module is one question, run from the repository root with
``python -m benchmarks.<name> [--device cuda] [--amp] [--smoke]``; it prints a table and writes
it as JSON (``--out``). ``benchmarks/_common.py`` holds the shared measurement code. See
``docs/benchmarks.md`` for the method, the commands and the results.
"""
