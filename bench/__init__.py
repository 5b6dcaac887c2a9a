"""restune's benchmark suite: ``python -m bench [--full]`` (see ``bench/__main__.py``).

Every comparison is measured side by side in one process run and written to
``bench/results/<section>.json``; ``bench/report.py`` turns those into ``REPORT.md`` and plots.
"""
