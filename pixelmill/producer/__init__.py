"""The client side: submit work, wait for it, read status and results.

    from pixelmill.producer import Client

    with Client() as pm:
        batch = pm.submit("classify", ["photos/"])
        pm.wait(batch.batch_id)
        for job in pm.results(batch.batch_id):
            print(job.input, job.status, job.result)

Knows nothing of torch or models.
"""

from pixelmill.db.records import JobResult
from pixelmill.producer.client import Client, Submission
from pixelmill.producer.inputs import expand_inputs

__all__ = ["Client", "JobResult", "Submission", "expand_inputs"]
