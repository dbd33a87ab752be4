"""Worker-exit tests: an objective that leaves a non-daemon thread running forever, so the
worker's normal interpreter exit never finishes (the supervisor's bounded wait must end it)."""

import threading

_forever = threading.Event()


def objective(trial):
    if not any(t.name == "never-ends" for t in threading.enumerate()):
        threading.Thread(target=_forever.wait, name="never-ends", daemon=False).start()
    return trial.suggest_float("x", -1.0, 1.0)
