"""The Celery side of a worker host. Thin: the logic lives in :mod:`cloudai`."""
