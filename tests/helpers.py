"""Small helpers the subprocess-driven tests share."""

import time


def wait_for(predicate, seconds: float) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `seconds` pass (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
