"""wsd: the WebSocket layer of an API gateway."""

__version__ = "0.1.0"
