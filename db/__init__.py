"""Persistence: the SQL schema, engine and sessions, the functions that change job state,
Alembic migrations, and the object store. Knows nothing of Celery or torch."""
