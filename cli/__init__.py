"""The ``cloudai`` command line (click). Thin: the operations live in :mod:`cloudai.api`."""
