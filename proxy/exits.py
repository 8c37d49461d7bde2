"""The process exit codes of `splitter`, defined once for the CLI, the server, the supervisor and workers.

A supervisor passes a worker's code on when the worker fails to start (bad rules stay 2), so the
codes mean the same in every process; a deployment's restart policy can tell a bad rules file (2:
restarting will not help, fix the file) from a port in use or a locked spool (3: it may pass).
"""

from __future__ import annotations

OK = 0  # a clean stop: SIGTERM/SIGINT, drained
WORKER_KILLED = 1  # `serve --workers N`: a worker did not stop within the drain timeout and was killed
BAD_RULES = 2  # the rules file does not compile (every problem is logged as FILE:LINE: path: message)
BAD_INPUT = BAD_RULES  # check / explain / simulate: bad rules or bad input, the message names the file and line
BAD_GEOIP_DB = BAD_RULES  # serve --geoip-db: the file is missing or not a country database (the log names the path)
STARTUP_FAILURE = 3  # a bad flag, a port in use, a locked or unreadable spool, a worker that could not start
