"""Checks run before expensive work, and one-line messages for the OS errors that end a job (issue 8.4, 8.9).

A job that trains for minutes and then cannot write its result has lost that work; so every output and cache
location is checked (created if needed, then a probe file written and removed) before anything is computed, and
an unreachable MLflow server is detected with a short connection timeout instead of hanging.

:func:`describe_os_error` turns disk full / read-only / permission denied / broken input files into one line that
names the file and the fix; the CLI entry points print it and exit non-zero.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["LocationError", "check_tracking_uri", "check_writable_dir", "describe_os_error",
           "TRACKING_CONNECT_TIMEOUT_S"]

# Seconds to wait for a TCP connection to an http(s) MLflow server before giving up.
TRACKING_CONNECT_TIMEOUT_S = 5.0


class LocationError(ValueError):
    """An output or cache location that cannot be written; the message names it and the fix."""


def _fix(what: str, flag: str | None) -> str:
    return f"pass another {flag}" if flag else f"choose another {what}"


def check_writable_dir(path: str | os.PathLike, what: str, flag: str | None = None) -> Path:
    """Create ``path`` if needed and prove it writable (a probe file is written and removed).

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        What the directory is for, in messages ("output directory", "model cache").
    flag : str, optional
        The CLI flag that sets it (``--output-dir``), named in the fix.

    Raises
    ------
    LocationError
        If ``path`` (or a parent) is a regular file, or the directory cannot be created or written.
    """
    path = Path(path).expanduser()
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise LocationError(f"{what} {path} cannot be used: {parent} is a file, not a directory; "
                                f"{_fix(what, flag)}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LocationError(f"{what} {path} is not writable ({describe_os_error(exc, bare=True)}); "
                            f"{_fix(what, flag)}") from None
    return path


def describe_os_error(exc: BaseException, *, bare: bool = False) -> str:
    """One line for an OS error: what failed, on which file, and (unless ``bare``) what to do."""
    name = getattr(exc, "filename", None)
    where = f" ({name})" if name else ""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        text, fix = f"disk full{where}", "free some space or write to another disk (--output-dir / --cache-dir)"
    elif code == errno.EROFS:
        text, fix = f"read-only file system{where}", "choose a writable --output-dir / --cache-dir"
    elif code in (errno.EACCES, errno.EPERM):
        text, fix = f"permission denied{where}", "fix the permissions or choose another --output-dir / --cache-dir"
    elif code == errno.EDQUOT:
        text, fix = f"disk quota exceeded{where}", "free some space or write elsewhere"
    else:
        text, fix = (f"{exc.strerror}{where}" if getattr(exc, "strerror", None) else str(exc) or type(exc).__name__), ""
    return text if bare or not fix else f"{text}: {fix}"


def check_tracking_uri(uri: str, timeout: float = TRACKING_CONNECT_TIMEOUT_S) -> None:
    """Fail fast when an http(s) MLflow tracking server does not accept connections within ``timeout`` seconds.

    Also bounds MLflow's own HTTP requests (``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``..._MAX_RETRIES``, unless set by
    the user) so that a server that dies mid-run cannot hang the job for minutes. Local URIs (sqlite, file) pass.

    Raises
    ------
    RuntimeError
        Naming the URI, what failed, and the ways out (start the server, fix ``--tracking-uri``, ``--no-mlflow``).
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "connection timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise RuntimeError(f"cannot reach the MLflow tracking server {uri} ({reason} after <= {timeout:g}s): "
                           "start it, fix --tracking-uri, or pass --no-mlflow") from None
