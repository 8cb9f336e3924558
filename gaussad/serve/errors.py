"""The service's refusals: an HTTP status and one line naming the problem, answered as {"error": ...}."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses (4xx) or cannot serve now (503), with the status to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
