"""Fuzzing a running server: hostile uploads (:mod:`reliability.hostile`) and schemathesis.

Both send real HTTP requests to a server on 127.0.0.1 and count responses by status. The targets:
no response >= 500, no connection dropped, every refusal of an upload endpoint a JSON body with
``error`` and ``reason`` (docs/service.md), and the server still ready afterwards.

Schemathesis (https://schemathesis.readthedocs.io) generates requests from the service's own
OpenAPI document (``/docs.json``): schema-conforming ones ("positive") and deliberately
non-conforming ones ("negative": wrong types, missing fields, bad media types), through its
hypothesis strategies, with shrinking off so the count of requests stays bounded.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.hostile import Case

UPLOAD_ENDPOINTS = ("/classify", "/embed", "/segment", "/similar", "/preview")
#: 503 reasons the service documents as deliberate (a component not configured or loaded, load
#: shedding): counted apart, not as server errors.
DOCUMENTED_503 = ("model_unavailable", "index_unavailable", "overloaded")


@dataclass
class Finding:
    """A response that broke a target: a 5xx, a dropped connection, a refusal without our JSON body."""

    name: str
    endpoint: str
    status: int | None
    detail: str

    @property
    def severity(self) -> str:
        """``server_error`` (5xx or no response), ``control_refused`` or ``error_body``."""
        if self.status is None or self.status >= 500:
            return "server_error"
        return "control_refused" if self.detail.startswith("control") else "error_body"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "status": self.status,
            "severity": self.severity,
            "detail": self.detail,
        }


@dataclass
class FuzzReport:
    """Responses by status (``"error"`` for a request that got no response) and what broke a target."""

    label: str
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    ready_after: bool | None = None
    notes: list[str] = field(default_factory=list)

    unavailable: Counter[str] = field(default_factory=Counter)

    @property
    def server_errors(self) -> int:
        """Responses >= 500 plus requests that got no response, less documented 503s."""
        total = sum(n for s, n in self.by_status.items() if s == "error" or int(s) >= 500)
        return total - sum(self.unavailable.values())

    def count(self, severity: str) -> int:
        """Findings of one severity (see :attr:`Finding.severity`)."""
        return sum(f.severity == severity for f in self.findings)

    def add(self, kind: str, status: int | None, reason: str | None = None) -> None:
        key = "error" if status is None else str(status)
        if status == 503 and reason in DOCUMENTED_503:
            self.unavailable[reason] += 1
        self.requests += 1
        self.by_status[key] += 1
        self.by_kind.setdefault(kind, Counter())[key] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(self.by_kind.items())},
            "server_errors": self.server_errors,
            "documented_503": dict(self.unavailable),
            "control_refused": self.count("control_refused"),
            "error_bodies_off_format": self.count("error_body"),
            "findings": [f.to_dict() for f in self.findings[:50]],
            "seconds": round(self.seconds, 1),
            "ready_after": self.ready_after,
            "notes": self.notes[:20],
        }


def _check_body(endpoint: str, response: httpx.Response) -> str | None:
    """None when a refusal of an upload endpoint has the documented JSON body, else what is wrong."""
    if endpoint not in UPLOAD_ENDPOINTS or response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"non-JSON {response.status_code} body: {response.text[:200]!r}"
    if not isinstance(body, dict) or not {"error", "reason"} <= set(body):
        return f"{response.status_code} body without error/reason: {str(body)[:200]}"
    return None


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _reason(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("reason") if isinstance(body, dict) else None


def send_case(client: httpx.Client, url: str, case: Case) -> tuple[int | None, str | None, str | None]:
    """Sends one case; returns ``(status or None, problem or None, the body's reason or None)``."""
    try:
        r = client.post(url + case.endpoint, **case.request_kwargs())
    except httpx.HTTPError as exc:
        return None, f"no response: {type(exc).__name__}: {exc}", None
    reason = _reason(r) if r.status_code >= 400 else None
    if r.status_code >= 500 and not (r.status_code == 503 and reason in DOCUMENTED_503):
        return r.status_code, f"server error: {r.text[:300]!r}", reason
    if case.expect_ok and r.status_code != 200:
        return r.status_code, f"control case refused: {r.text[:300]!r}", reason
    return r.status_code, _check_body(case.endpoint, r), reason


def run_hostile(
    url: str,
    cases: Iterable[Case],
    *,
    concurrency: int = 4,
    timeout: float = 120.0,
    save_dir: Path | None = None,
    time_limit_s: float = 1800.0,
) -> FuzzReport:
    """Sends hostile uploads with ``concurrency`` clients and counts the answers.

    Args:
        url: server base URL (127.0.0.1).
        cases: the requests (e.g. :func:`reliability.hostile.generate`).
        concurrency: parallel clients.
        timeout: per-request timeout (s).
        save_dir: where to write every failing case's request body, for reproduction.
        time_limit_s: stop sending new cases after this long (the run is bounded in time).

    Returns:
        The :class:`FuzzReport` (``ready_after`` checked at the end).
    """
    report = FuzzReport(label="hostile uploads")
    t0 = time.monotonic()
    deadline = t0 + time_limit_s

    def one(case: Case) -> tuple[Case, int | None, str | None, str | None]:
        if time.monotonic() > deadline:
            return case, -1, None, None
        with httpx.Client(timeout=timeout) as client:
            status, problem, reason = send_case(client, url, case)
        return case, status, problem, reason

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for case, status, problem, reason in pool.map(one, cases):
            if status == -1:  # skipped: over the time limit
                continue
            report.add(case.kind, status, reason)
            if problem is not None:
                report.findings.append(Finding(case.name, case.endpoint, status, problem))
                if save_dir is not None:
                    _save_case(save_dir, case, problem)
    report.seconds = time.monotonic() - t0
    report.ready_after = _ready(url)
    return report


def _save_case(folder: Path, case: Case, problem: str) -> None:
    """Writes a failing case (files, fields, headers) so it can be replayed with curl."""
    d = folder / case.name
    d.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "endpoint": case.endpoint,
        "data": case.data,
        "headers": case.headers,
        "params": case.params,
        "problem": problem,
        "files": [],
    }
    for i, (fld, (fname, data, ctype)) in enumerate(case.files):
        (d / f"part{i}.bin").write_bytes(data)
        meta["files"].append({"field": fld, "filename": fname, "content_type": ctype, "path": f"part{i}.bin"})
    if case.content is not None:
        (d / "body.bin").write_bytes(case.content)
    (d / "case.json").write_text(json.dumps(meta, indent=1, ensure_ascii=True))


def run_schemathesis(
    url: str,
    *,
    max_examples: int = 100,
    modes: tuple[str, ...] = ("positive", "negative"),
    timeout: float = 60.0,
    seed: int = 0,
) -> FuzzReport:
    """Schemathesis against the server's own OpenAPI document (``/docs.json``).

    For every operation and generation mode, hypothesis draws up to ``max_examples`` requests
    from the operation's schemathesis strategy (no shrinking, no example database: a bounded,
    reproducible number of requests) and sends each to the server.

    Args:
        url: server base URL.
        max_examples: requests per operation and mode.
        modes: schemathesis generation modes (``positive``, ``negative``).
        timeout: per-request timeout (s).
        seed: hypothesis seed.
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    document = httpx.get(url + "/docs.json", timeout=30).json()
    report_notes = []
    if str(document.get("openapi", "")).startswith("3.0"):
        # BentoML (1.4.40) labels the merged document 3.0.2, but the FastAPI routes' schemas in it use
        # JSON Schema 2020-12 / OpenAPI 3.1 forms (numeric exclusiveMinimum, type null, contentMediaType);
        # strict 3.0 validation rejects /segment outright. Read it as what its contents are: 3.1.
        report_notes.append(
            f"document declares openapi {document['openapi']}; fuzzed as 3.1.0 (3.1 schemas inside)"
        )
        document["openapi"] = "3.1.0"
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport(label="schemathesis", notes=report_notes)
    session = requests.Session()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation schemathesis cannot read: note it, fuzz the others
            report.notes.append(f"operation skipped: {result.err()}"[:300])
            continue
        op = result.ok()
        for mode in modes:
            label = f"{op.method.upper()} {op.path} ({mode})"
            probe = _schemathesis_probe(op, mode, label, url, session, report, timeout)
            wrapped = hseed(seed)(
                settings(
                    max_examples=max_examples,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(given(case=op.as_strategy(generation_mode=GenerationMode(mode)))(probe))
            )
            try:
                wrapped()
            except Exception as exc:  # a strategy that cannot be satisfied: note it, carry on
                if (
                    type(exc).__name__ == "Unsatisfiable"
                ):  # e.g. a GET without parameters has no negative case
                    report.notes.append(f"{label}: nothing to generate (no parameters to negate)")
                else:
                    report.notes.append(f"{label}: generation stopped: {type(exc).__name__}: {exc}"[:300])
    report.seconds = time.monotonic() - t0
    report.ready_after = _ready(url)
    return report


def _schemathesis_probe(
    op: Any, mode: str, label: str, url: str, session: Any, report: FuzzReport, timeout: float
) -> Any:
    """The hypothesis test body for one operation and mode: send the case, count the answer."""
    import requests

    def probe(case: Any) -> None:
        try:
            r = case.call(base_url=url, session=session, timeout=timeout)
        except requests.RequestException as exc:
            report.add(label, None)
            report.findings.append(Finding(label, op.path, None, f"no response: {exc}"))
            return
        reason = _reason(r) if r.status_code >= 400 else None
        report.add(label, r.status_code, reason)
        if r.status_code >= 500 and not (r.status_code == 503 and reason in DOCUMENTED_503):
            curl = case.as_curl_command()
            report.findings.append(
                Finding(label, op.path, r.status_code, f"{curl[:500]} -> {r.text[:300]!r}")
            )

    return probe
