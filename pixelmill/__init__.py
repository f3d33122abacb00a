"""pixelmill: an asynchronous job queue for batch image processing.

The shared core lives here: the one settings object (`pixelmill.settings`), the error tree
(`pixelmill.errors`) and the command line (`pixelmill.cli`). The work itself lives in the
top-level packages `producer`, `worker`, `db` and `models` (see ARCHITECTURE.md).
"""

__version__ = "0.1.0"
