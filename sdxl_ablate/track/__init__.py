"""Recording: the MLflow tracker, the write-ahead journal of every run (all of it, so a failed
store loses nothing), and its replay."""

import os

# MLflow's own HTTP defaults (7 retries with backoff, 120 s timeout) make one call to a dead
# tracking server take about 4 minutes; a run asks it in the preflight, at the first failure
# and in its read-back. These bound a call to a dead server to a few seconds (a hung one to
# about a timeout per try) and still ride out a brief hiccup. MLflow reads them at each request;
# they are set here, on the first import of any tracking module and so before any MLflow client
# is made, and only where the user has not set them.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
for _name, _value in MLFLOW_HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

# Two known library messages that are noise here, filtered by their text (quiet.py).
from sdxl_ablate.track.quiet import silence_known_noise  # noqa: E402

silence_known_noise()
