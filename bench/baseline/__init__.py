"""The baseline: the same pipeline as a Python team would build it with FastAPI and Celery."""
