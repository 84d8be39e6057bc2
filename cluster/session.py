"""Which Ray cluster a run uses: a private one on this machine (the default), or one given by address.

A private local Ray gets the cores this process may use (its CPU affinity, not the host's count; two at least),
no dashboard, its node bound to 127.0.0.1, and token authentication with the token and every
temporary file (sockets, logs, spilled objects) in the run folder (``runs/ray``), so nothing lands
in ``~/.ray`` or ``/tmp/ray`` (the temporary files go to a private folder under $TMPDIR instead
where the run folder's path is too long for Ray's sockets); it is shut down when the run ends.
Ray's own ports still listen on all interfaces (Ray offers no way to bind them to loopback): the
token is what keeps other hosts out.

A cluster address (``HOST:PORT`` of a ``ray start --head`` node, or ``ray://HOST:10001``) is joined
as Ray documents it, with the user's own authentication settings, and left running.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile

from cnnbench.common.device import available_cores
from cnnbench.common.errors import InputError, UserError
from cnnbench.common.runs import RUNS_ROOT

LOCAL = "auto"
DEFAULT_RAY_DIR = os.path.join(RUNS_ROOT, "ray")
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+$")
_TOKEN_FILE = "auth_token"
# Ray puts its Unix sockets at <temp dir>/session_<date>_<time>_<pid>/sockets/plasma_store, and a socket's
# path must fit in 107 bytes (Linux's sun_path): that suffix takes up to 64, which leaves 43 for the folder.
MAX_TEMP_DIR_BYTES = 107 - 64


class RayError(UserError, RuntimeError):
    """Ray is not installed, or the cluster cannot be reached or started."""


def check_address(address: str) -> str:
    """``auto`` or a Ray address; anything else (often a path swallowed by ``--ray``) is an InputError."""
    if address == LOCAL or _ADDRESS.match(address):
        return address
    raise InputError(f"--ray {address!r} is neither 'auto' nor a cluster address (HOST:PORT or ray://HOST:PORT); "
                     "when the images follow --ray, write --ray=auto (or put --ray after them)")


@contextlib.contextmanager
def ray_session(address: str = LOCAL, ray_dir=DEFAULT_RAY_DIR):
    """Ray connected for the duration of the block; yields {"address"} (and "temp_dir" of a private Ray).

    A Ray already initialised in this process (a notebook's, a test's) is used as it is and left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield {"address": "existing"}
        return
    address = check_address(address)
    if address == LOCAL and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    with _quiet_ray_logs():
        if address == LOCAL:
            with local_ray(ray_dir) as temp_dir:
                yield {"address": "local", "temp_dir": temp_dir}
            return
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayError(f"cannot join the Ray cluster at {address}: {e}") from None
        try:
            yield {"address": address}
        finally:
            ray.shutdown()


@contextlib.contextmanager
def local_ray(ray_dir=DEFAULT_RAY_DIR):
    """A private Ray on this machine for the duration of the block (see the module docstring); yields the
    folder of Ray's sockets and logs: ``ray_dir``, or a private temporary folder (removed afterwards)
    where ``ray_dir``'s path is too long for the sockets Ray makes inside it."""
    ray = import_ray()
    folder = os.path.abspath(ray_dir)
    os.makedirs(folder, exist_ok=True)
    temp_dir = folder if len(folder.encode()) <= MAX_TEMP_DIR_BYTES else tempfile.mkdtemp(prefix="cnnbench-ray-")
    with _local_auth(folder):
        try:
            # Ray's CPUs are scheduling tokens: at least two, so that a model actor and a decode task run side by
            # side even on one core (as local predict's model and decoding worker do).
            ray.init(num_cpus=max(2, available_cores()), include_dashboard=False, _node_ip_address="127.0.0.1",
                     _temp_dir=temp_dir, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            raise RayError(f"cannot start a local Ray in {temp_dir}: {e}") from None
        try:
            yield temp_dir
        finally:
            ray.shutdown()
            if temp_dir != folder:
                shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _local_auth(folder: str):
    """Token authentication with the token in the run folder, for this process and the Ray it starts;
    the previous environment restored afterwards. A user's own RAY_AUTH_MODE wins (e.g. ``disabled``)."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    if saved["RAY_AUTH_MODE"] is None:
        token = os.path.join(folder, _TOKEN_FILE)
        _ensure_token(token)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = token
        _reload_auth_settings()
    try:
        yield
    finally:
        if saved["RAY_AUTH_MODE"] is None:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _reload_auth_settings()


def _reload_auth_settings() -> None:
    """Make this process read RAY_AUTH_MODE and the token again: Ray caches both from the environment
    when it is imported (Ray's own token setup refreshes them the same way; its API for it is internal)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ensure_token(path: str) -> None:
    """A random token readable by this user only (Ray itself would write one to ~/.ray/auth_token)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


@contextlib.contextmanager
def _quiet_ray_logs():
    """Ray Data announces every execution at INFO on stderr; a run's own progress bar says enough."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is what the runs use; fail here, not mid-run
    except ImportError:
        raise RayError('--ray needs Ray Data: pip install -e ".[ray]" (on every node of a cluster)') from None
    return ray
