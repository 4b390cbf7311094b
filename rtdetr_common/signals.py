"""Signal handlers that belong to the process that installs them."""

from __future__ import annotations

import os
from typing import Any, Callable

Handler = Callable[[int, Any], Any]


def owned_handler(handler: Handler) -> Handler:
    """``handler`` for the calling process only.

    A process forked from it inherits its handlers; a library's worker pool (Jittor compiles
    in one) is then stopped with SIGTERM at exit and would run the parent's handler instead of
    ending, leaving the parent waiting for it. In any process but the installing one the
    returned handler ends the process at once, as the default action would.
    """
    owner = os.getpid()

    def handle(signum: int, frame: Any) -> Any:
        if os.getpid() != owner:
            os._exit(128 + signum)
        return handler(signum, frame)
    return handle
