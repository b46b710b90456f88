"""Periodic maintenance, scheduled by Celery beat. Thin: the logic lives in :mod:`cloudai.maintenance`."""
