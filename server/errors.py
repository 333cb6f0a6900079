"""Errors that carry the gRPC status they map to.

The engine (repository, scheduler, tasks) raises these without knowing gRPC;
the API layer turns each into its status code and message.
"""

from __future__ import annotations


class OpticError(Exception):
    """Base class: ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(OpticError):
    code = "INVALID_ARGUMENT"


class NotFound(OpticError):
    code = "NOT_FOUND"


class ResourceExhausted(OpticError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(OpticError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(OpticError):
    code = "UNAVAILABLE"


class Internal(OpticError):
    code = "INTERNAL"


class FailedPrecondition(OpticError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(OpticError):
    code = "ALREADY_EXISTS"


class PermissionDenied(OpticError):
    code = "PERMISSION_DENIED"


class Unimplemented(OpticError):
    """A feature this server does not offer, or offers only when a flag turns it on."""

    code = "UNIMPLEMENTED"
