"""The operator's live view of the fleet, the batches and their failures, with pause, resume,
cancel, retry and priority, and a JSON API under /api that the page itself uses (docs,
"Dashboard"). ``server`` is the tornado app, ``data`` what it reads, ``prometheus`` what it
serves at /metrics, ``serving`` how one is started; the page is ``templates/index.html`` with
``static/``. The command is ``pixelmill.cli.dashboard``."""
