"""An asyncio client for wsd: reconnects, resumes, dedupes, acks and reports every hole as a Gap.

See docs/client.md."""

from wsd.client.client import Client, State, Subscription, token_exp
from wsd.client.policy import CLOSE_ACTIONS, Backoff, CloseAction, close_action
from wsd.client.types import (
                              ClientClosed,
                              ClientError,
                              ConnectionLost,
                              Gap,
                              History,
                              Kicked,
                              Message,
                              NotAdmitted,
                              Position,
                              RequestError,
                              TakenOver,
)

__all__ = ["CLOSE_ACTIONS", "Backoff", "Client", "ClientClosed", "ClientError", "CloseAction", "ConnectionLost", "Gap",
           "History", "Kicked", "Message", "NotAdmitted", "Position", "RequestError", "State", "Subscription",
           "TakenOver", "close_action", "token_exp"]
