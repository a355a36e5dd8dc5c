"""The websockets versions wsd works with, checked when the runtime is imported.

The runtime uses parts of websockets below its documented API, all of them in ``wsadapter.py``, and they
changed between releases: ``ServerProtocol`` (``accept``, ``reject``, ``select_subprotocol``,
``send_response``, ``available_extensions``), ``protocol.Protocol.parse`` and the protocol's ``parser``
generator and ``reader``, ``send_ping``/``send_close``/``fail``, ``data_to_send``/``events_received``/
``close_expected``, ``frames.Frame.serialize`` (and ``asyncio.messages.MAX_FRAGMENTS`` where a release
has it). All of them are present, with the signatures used, from websockets 16.0 to 17.x.
"""

from __future__ import annotations

import re

MIN_WEBSOCKETS = (16, 0)
WEBSOCKETS_RANGE = ">=16,<18"


def websockets_problem(version: str) -> str | None:
    """Why websockets ``version`` cannot run wsd (one line), or None when it can.

    Only the minimum is enforced here; the upper bound (a release not yet tried) is pyproject's.
    """
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        return f"wsd cannot tell which websockets this is (version {version!r}); it needs websockets {WEBSOCKETS_RANGE}"
    if (int(m.group(1)), int(m.group(2))) >= MIN_WEBSOCKETS:
        return None
    return (f"wsd needs websockets 16.0 or newer, found {version}: pip install 'websockets{WEBSOCKETS_RANGE}'")


def require_websockets() -> None:
    import websockets

    problem = websockets_problem(websockets.__version__)
    if problem is not None:
        raise ImportError(problem)
