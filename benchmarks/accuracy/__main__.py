"""``python -m benchmarks.accuracy [--quick | --all] [--out DIR] [--work DIR] [--reuse]``.

Default: the matrix that fits make bench's hour (see :data:`plan.DEFAULT`); ``--all`` the
whole matrix; ``--quick`` the smoke version (a minute or two, numbers mean nothing).
Writes ``accuracy.md`` (docs/bench/ by default) and ``accuracy_*.png`` (docs/img/), and
the numbers to ``WORK/accuracy.json``.
"""

from benchmarks.accuracy import main

if __name__ == "__main__":
    main()
