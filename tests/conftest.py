"""Suite-wide pytest hooks."""

import os
import sys

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). It must be chosen
# before Triton is first imported, so here, before any test module imports flora.kernels.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    # After a full run (Ray clusters, Serve, DeepSpeed's gloo groups and torch thread pools
    # started and stopped in one process) the interpreter can crash in native finalizers at
    # exit, turning a green run red. Once pytest has reported, leave with its own status and
    # skip those finalizers.
    if _exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
