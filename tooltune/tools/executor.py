"""Run one tool function safely: a timeout, exceptions captured, the result as JSON text.

The tool loop feeds ``ToolResult.content`` straight back to the model, so every outcome,
including a crash or a hang, becomes content the model can read, never an exception.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolResult:
    """What a call returned: ``content`` is JSON text (``{"error": ...}`` on failure)."""

    content: str
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> ToolResult:
        return cls(content=json.dumps({"error": error}, ensure_ascii=False), error=error)


def run_tool(fn: Callable[..., Any], arguments: dict[str, Any], timeout_s: float | None) -> ToolResult:
    """Call ``fn(**arguments)`` in a daemon thread and wait at most ``timeout_s`` seconds.

    A thread, not a process: forking a process that holds CUDA or Ray state is unsafe, and
    tools are small. The cost is that a hung thread cannot be killed; it is abandoned (daemon,
    so it never blocks exit). A tool that can block inside one C call, where the GIL is never
    released, must bound its own work (the calculator does). ``timeout_s=None`` runs ``fn`` in
    the caller's thread: for trusted, bounded tools in bulk (ground truth), where a thread per
    call would cost more than the call.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(**arguments)
        except Exception as e:  # a tool's failure is data for the model, not a crash of the loop
            outcome["error"] = f"{type(e).__name__}: {e}"

    if timeout_s is None:
        target()
    else:
        thread = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'fn')}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            return ToolResult.failed(f"timed out after {timeout_s:g} s")
    if "error" in outcome:
        return ToolResult.failed(outcome["error"])
    try:
        return ToolResult(content=json.dumps(outcome.get("value"), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        return ToolResult.failed(f"the tool returned a value that is not JSON: {e}")
