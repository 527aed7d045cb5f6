"""The signals that stop a long-running command gracefully: `serve` and `worker` (a
graceful shutdown) and `dlq replay` / `dlq discard` (once their batch in progress is
committed)."""

from __future__ import annotations

import signal


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT, and SIGHUP (a terminal or SSH session closed: killed by it, a worker
    left its sends leased for a whole lease, a replay rolled its batch in progress back)
    unless the process was started ignoring it (`nohup`), which is then kept. Called before
    the process installs handlers of its own, it reads the disposition it was started with."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)
