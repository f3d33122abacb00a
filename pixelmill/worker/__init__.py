"""The server side: the Celery app and its settings, the batch task, the batching loop, the
device supervisor (one process per device) and the embedded broker. Calls ``db`` for state and
``models`` for inference; holds no SQL or model internals itself."""
