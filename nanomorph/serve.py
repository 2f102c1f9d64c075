"""``nanomorph serve``: serve stored models over HTTP with BentoML.

Runs ``bentoml serve service.service:Nanomorph`` in a child process with the options turned into
the service's environment variables (``NANOMORPH_*``, docs/service.md "Configuration"). Options
left unset keep the environment's values, so the variables and the flags can be mixed. This module
never imports bentoml (the child does), so ``nanomorph --help`` stays light.

Stopping: SIGTERM, SIGINT or SIGHUP to ``nanomorph serve`` is passed on to the server's whole
process group (:mod:`nanomorph.supervise`); the workers stop accepting connections, finish the
requests in flight within ``--shutdown-grace-s`` seconds, and ``nanomorph serve`` exits with the
server's exit status once no process of the group is left (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from nanomorph.supervise import run_supervised
from nanomorph.tasks import TASKS

log = logging.getLogger(__name__)

SERVICE_IMPORT = "service.service:Nanomorph"
REPO_ROOT = Path(__file__).resolve().parent.parent

# option dest -> environment variable of the service
_ENV_OPTIONS = {
    "store": "NANOMORPH_STORE",
    "classify_model": "NANOMORPH_CLASSIFY_MODEL",
    "embed_model": "NANOMORPH_EMBED_MODEL",
    "segment_model": "NANOMORPH_SEGMENT_MODEL",
    "require": "NANOMORPH_REQUIRE_MODELS",
    "providers": "NANOMORPH_PROVIDERS",
    "precision": "NANOMORPH_PRECISION",
    "workers": "NANOMORPH_WORKERS",
    "max_batch_size": "NANOMORPH_MAX_BATCH_SIZE",
    "concurrent_calls": "NANOMORPH_CONCURRENT_CALLS",
    "max_latency_ms": "NANOMORPH_MAX_LATENCY_MS",
    "max_upload_mb": "NANOMORPH_MAX_UPLOAD_MB",
    "shutdown_grace_s": "NANOMORPH_SHUTDOWN_GRACE_S",
    "recycle_requests": "NANOMORPH_RECYCLE_REQUESTS",
    "recycle_rss_mb": "NANOMORPH_RECYCLE_RSS_MB",
}
#: Drain grace when neither --shutdown-grace-s nor $NANOMORPH_SHUTDOWN_GRACE_S sets one.
DEFAULT_GRACE_S = 30.0


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The ``NANOMORPH_*`` variables the given options set (unset options are left out)."""
    env: dict[str, str] = {}
    for dest, var in _ENV_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None and value != "":
            env[var] = str(value)
    return env


def command(host: str, port: int, grace_s: float = DEFAULT_GRACE_S) -> list[str]:
    """The ``bentoml serve`` command line (same Python, so the same virtualenv).

    ``--timeout-graceful-shutdown`` (a hidden BentoML option, handed to each worker's uvicorn)
    bounds how long a stopping worker waits for its requests in flight.
    """
    return [
        *(sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)),
        *("--timeout-graceful-shutdown", str(max(1, math.ceil(grace_s)))),
    ]


def grace_seconds(env: Mapping[str, str]) -> float:
    """The drain grace from ``NANOMORPH_SHUTDOWN_GRACE_S`` (default :data:`DEFAULT_GRACE_S`).

    Raises:
        ValueError: not a number, or negative.
    """
    raw = env.get("NANOMORPH_SHUTDOWN_GRACE_S", "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"NANOMORPH_SHUTDOWN_GRACE_S={raw!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"NANOMORPH_SHUTDOWN_GRACE_S={raw!r} must be a finite number >= 0")
    return value


def serve(host: str = "127.0.0.1", port: int = 3000, env_overrides: Mapping[str, str] | None = None) -> int:
    """Serves the stored models until stopped; returns the server's exit status.

    SIGTERM, SIGINT and SIGHUP stop the server gracefully (see :mod:`nanomorph.supervise`).

    Args:
        host: interface to listen on.
        port: TCP port.
        env_overrides: ``NANOMORPH_*`` (or any) variables set for the server on top of ``os.environ``
            (``NANOMORPH_SHUTDOWN_GRACE_S`` also bounds the drain on a stop signal).

    Raises:
        ValueError: bad port or grace, or the serving extra is not installed.
    """
    if not 0 < int(port) < 65536:
        raise ValueError(f"--port {port} is not a TCP port (1-65535)")
    if importlib.util.find_spec("bentoml") is None or importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("serving needs bentoml and onnxruntime: pip install 'nanomorph[serving]'")
    env = {**os.environ, **dict(env_overrides or {})}
    # The service package lives at the repository root; make it importable without installing.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    grace = grace_seconds(env)
    check_settings(env)
    shown = {k: v for k, v in (env_overrides or {}).items() if "TOKEN" not in k}
    log.info(
        "serving on http://%s:%d (%s)",
        host,
        port,
        ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults",
    )
    return run_supervised(command(host, int(port), grace), env, grace_s=grace)


def check_settings(env: Mapping[str, str]) -> None:
    """Reads the service's settings from ``env`` as each worker will, so that a bad value (e.g.
    ``--concurrent-calls 0``) is one clear error here instead of a traceback from every worker.

    Raises:
        ValueError: a variable has a bad value (the message names it).
    """
    if not (REPO_ROOT / "service" / "settings.py").is_file():
        return  # an install without the service package: the server reports it
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from service.settings import Settings

    Settings.from_env(env)


def missing_default_models(store: str | None) -> list[str]:
    """Tags of the default models that ``store`` does not hold (an unverifiable model counts as missing)."""
    from nanomorph.store import resolve

    missing = []
    for task in TASKS:
        tag = f"nanomorph-{task}:latest"
        try:
            resolve(tag, store, verify=False)
        except (FileNotFoundError, ValueError):
            missing.append(tag)
    return missing


def build_default(store: str | None, demo_dir: str) -> None:
    """Builds the default models with ``nanomorph demo`` (in-process), forcing a fresh export."""
    from nanomorph.cli import main as cli_main

    marker = Path(demo_dir) / "exported.json"
    marker.unlink(missing_ok=True)  # the store lacks the models, so the export must run again
    argv = ["demo", "--out", demo_dir, "--store", store or "bentoml"]
    if cli_main(argv) != 0:
        raise ValueError(f"building the default model failed; see the log above (working folder {demo_dir})")


def run(args: argparse.Namespace) -> int:
    if args.build_default:
        store = args.store or os.environ.get("NANOMORPH_STORE") or "bentoml"
        missing = missing_default_models(store)
        if missing:
            log.info(
                "no default model in store %s (%s): building it from synthetic data",
                store,
                ", ".join(missing),
            )
            build_default(store, args.demo_dir)
        else:
            log.info("default models found in store %s", store)
    return serve(args.host, args.port, env_from_args(args))
