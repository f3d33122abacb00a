"""`pixelmill dashboard`: the operator's live view of the fleet, the batches and their
failures, with pause, resume, cancel, retry and priority, and a JSON API under /api that the
page itself uses (README, "Dashboard"). ``cli`` is the command, ``server`` the tornado app,
``data`` what it reads; the page is ``templates/index.html`` with ``static/``."""
