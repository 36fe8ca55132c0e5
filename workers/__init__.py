"""Celery at the rim of vmq: the app, thin tasks, and the host worker's inventory agent."""
