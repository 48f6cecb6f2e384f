"""Exit codes of the commands that call a server (serving and training commands alike), by gRPC status."""
from __future__ import annotations

EXIT_CODES_EPILOG = """\b
Exit codes of the commands that call a server:
  0  ok
  1  internal or unknown error (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, CANCELLED)
  2  usage error (bad flags or arguments, no admin token or API key found)
  3  UNAUTHENTICATED or PERMISSION_DENIED (bad key or token, suspended tenant)
  4  NOT_FOUND (tenant, adapter or version)
  5  ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, OUT_OF_RANGE, ABORTED
  6  RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED (try again later)"""
EXIT_OF_STATUS = {"UNAUTHENTICATED": 3, "PERMISSION_DENIED": 3, "NOT_FOUND": 4, "ALREADY_EXISTS": 5,
                  "FAILED_PRECONDITION": 5, "INVALID_ARGUMENT": 5, "OUT_OF_RANGE": 5, "ABORTED": 5,
                  "RESOURCE_EXHAUSTED": 6, "UNAVAILABLE": 6, "DEADLINE_EXCEEDED": 6}


def exit_code(status_name: str) -> int:
    """The exit code of a gRPC status name (1 for the ones not listed)."""
    return EXIT_OF_STATUS.get(status_name, 1)
