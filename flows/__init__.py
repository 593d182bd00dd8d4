"""Prefect flows that chain the stages. Stage code logs to "medlm.*" loggers; Prefect attaches its
handlers to them (PREFECT_LOGGING_EXTRA_LOGGERS=medlm, see flows/prefect_env.py), and this level lets
their progress lines through to each run's logs."""

import logging

logging.getLogger("medlm").setLevel(logging.INFO)
