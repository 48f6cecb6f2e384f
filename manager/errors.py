"""Errors of the manager, one class per failure class; the dispatcher maps each to one gRPC code
in one place (NotFound -> NOT_FOUND, AlreadyExists -> ALREADY_EXISTS, InvalidArgument ->
INVALID_ARGUMENT, FailedPrecondition -> FAILED_PRECONDITION, CorruptAdapter -> DATA_LOSS/INTERNAL,
Unauthenticated -> UNAUTHENTICATED, PermissionDenied -> PERMISSION_DENIED).
Every message names the thing and the problem."""


class ManagerError(Exception):
    pass


class NotFoundError(ManagerError):
    pass


class AlreadyExistsError(ManagerError):
    pass


class InvalidArgumentError(ManagerError, ValueError):
    pass


class FailedPreconditionError(ManagerError):
    """E.g. an adapter that does not fit the backbone, a suspended tenant, an adapter in use."""


class CorruptAdapterError(ManagerError):
    """A stored adapter file fails its checksum or cannot be parsed; it is never served."""


class UnauthenticatedError(ManagerError):
    pass


class PermissionDeniedError(ManagerError):
    pass
