"""Persistence: the SQL schema, engine and sessions (``engine.open_database``), the records
(``records``), the functions that change job state (``jobs``) and those that read it
(``reads``), Alembic migrations, dead letters, and the object store. Knows nothing of Celery or
torch."""
