"""In-process tests of the service's parts: settings, guard, batcher, the service class itself, the
serve command, and the import rules."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nanomorph import serve as serve_cmd
from service.batching import Batcher, Overloaded
from service.guard import GuardError, check_token, decode_upload
from service.settings import ENV_VARS, MIB, TASKS, Settings, available_cores
from tests.fixtures.images import png_bytes, speck_image
from tests.fixtures.server import REPO_ROOT

# ------------------------------------------------------------------------------------- settings


def test_settings_defaults_and_overrides() -> None:
    s = Settings.from_env({})
    assert s.store == "bentoml"
    assert s.models == {t: f"nanomorph-{t}:latest" for t in TASKS}
    assert (s.max_batch_size, s.max_latency_ms, s.max_upload_bytes) == (32, 60000, 136 * MIB)
    assert not s.auth_enabled and not s.protect_metrics and s.required == ()
    assert s.access_log and not Settings.from_env({"NANOMORPH_ACCESS_LOG": "0"}).access_log
    s = Settings.from_env(
        {
            "NANOMORPH_STORE": "/models",
            "NANOMORPH_CLASSIFY_MODEL": "mine-classify:v2",
            "NANOMORPH_API_TOKENS": " a , b ,",
            "NANOMORPH_REQUIRE_MODELS": "all",
            "NANOMORPH_MAX_UPLOAD_MB": "0.5",
            "NANOMORPH_PROTECT_METRICS": "yes",
            "NANOMORPH_PRECISION": "FP32",
        }
    )
    assert s.store == "/models" and s.models["classify"] == "mine-classify:v2"
    assert s.precision == "fp32" and Settings.from_env({}).precision == "auto"
    assert s.api_tokens == ("a", "b") and s.required == TASKS and s.protect_metrics
    assert s.max_upload_bytes == MIB // 2


def test_concurrent_calls_share_the_cores_between_their_sessions() -> None:
    auto = Settings.from_env({})
    assert (
        auto.concurrent_calls
        == 0
        == Settings.from_env({"NANOMORPH_CONCURRENT_CALLS": "Auto"}).concurrent_calls
    )
    assert auto.session_threads(1, cores=16) == 0  # one call: onnxruntime's default, all
    assert auto.session_threads(2, cores=2) == 1 and auto.session_threads(2, cores=16) == 8
    two = Settings.from_env({"NANOMORPH_CONCURRENT_CALLS": "2"})
    assert two.concurrent_calls == 2 and two.lanes(adaptive=False) == 2
    assert Settings.from_env({"NANOMORPH_CONCURRENT_CALLS": "1"}).lanes(adaptive=False) == 1
    pinned = Settings.from_env({"NANOMORPH_CONCURRENT_CALLS": "2", "NANOMORPH_ORT_THREADS": "3"})
    assert pinned.session_threads(2, cores=2) == 3  # an explicit thread count is the operator's call


def test_auto_calls_adapt_only_classify_and_embed_on_a_multicore_cpu() -> None:
    auto, cpu = Settings.from_env({}), ["CPUExecutionProvider"]
    assert auto.adaptive_calls("classify", cpu, cores=2) and auto.adaptive_calls("embed", cpu, cores=16)
    assert auto.lanes(adaptive=True) == 2
    assert not auto.adaptive_calls("segment", cpu, cores=2)  # large frames: one call, one arena
    assert not auto.adaptive_calls("classify", cpu, cores=1)
    assert not auto.adaptive_calls("classify", ["CUDAExecutionProvider", "CPUExecutionProvider"], cores=16)
    one = Settings.from_env({"NANOMORPH_CONCURRENT_CALLS": "1"})
    assert not one.adaptive_calls("classify", cpu, cores=2)  # a count is a fixed number of calls


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NANOMORPH_MAX_BATCH_SIZE", "zero"),
        ("NANOMORPH_MAX_BATCH_SIZE", "0"),
        ("NANOMORPH_PROTECT_METRICS", "maybe"),
        ("NANOMORPH_REQUIRE_MODELS", "detect"),
        ("NANOMORPH_PRECISION", "int4"),
        ("NANOMORPH_CONCURRENT_CALLS", "0"),
        ("NANOMORPH_CONCURRENT_CALLS", "many"),
    ],
)
def test_settings_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_every_setting_is_documented() -> None:
    doc = (REPO_ROOT / "docs" / "service.md").read_text(encoding="utf-8")
    for var in ENV_VARS:
        assert f"`{var}`" in doc, var


# ---------------------------------------------------------------------------------------- guard


def test_check_token() -> None:
    tokens = ("alpha", "beta")
    assert check_token("Bearer alpha", tokens) and check_token("bearer  beta", tokens)
    for header in (None, "", "Bearer", "Bearer gamma", "Basic alpha", "alpha", "Bearer alph"):
        assert not check_token(header, tokens), header
    assert check_token(None, ())  # no tokens configured: open


def test_decode_upload_limits_and_errors() -> None:
    settings = Settings(max_upload_bytes=10_000, max_pixels=64 * 64)
    image, meta = decode_upload(png_bytes(speck_image(False, size=40)), "ok.png", settings)
    assert image.shape == (40, 48) and image.dtype == np.float32 and meta.shape[:2] == (40, 48)
    big = png_bytes((np.random.default_rng(0).random((120, 120)) * 255).astype(np.uint8))
    cases = [
        (b"", 400, "empty"),
        (big, 413, "too_large"),
        (png_bytes(np.zeros((80, 80), np.uint8)), 413, "too_many_pixels"),
        (b"plain text " * 10, 415, "unsupported_format"),
    ]
    for data, status, reason in cases:
        with pytest.raises(GuardError) as info:
            decode_upload(data, "f.bin", settings)
        assert (info.value.status, info.value.reason) == (status, reason)
        assert "f.bin" in info.value.message
        assert info.value.body() == {"error": info.value.message, "reason": reason}


# -------------------------------------------------------------------------------------- batcher


def test_batcher_gathers_concurrent_requests_and_chunks() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def fn(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        gate.wait(2)  # hold the first call so that the others queue up behind it
        return batch * 2

    async def main() -> list[list[np.ndarray]]:
        b = Batcher(fn, max_batch_size=4)
        first = asyncio.ensure_future(b.submit(np.array([[0.0]])))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(np.array([[float(i)]]))) for i in range(1, 6)]
        big = asyncio.ensure_future(b.submit(np.arange(9, dtype=float)[:, None]))  # > max: chunked
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *rest, big)
        b.close()
        return out

    out = asyncio.run(main())
    assert [float(r[0][0]) for r in out[:6]] == [0, 2, 4, 6, 8, 10]
    assert [float(x[0]) for x in out[6]] == [2.0 * i for i in range(9)]
    assert calls[0] == 1 and max(calls) == 4 and sum(calls) == 15


def test_batcher_runs_calls_side_by_side_with_concurrent_calls() -> None:
    """With two lanes a second call starts while the first still runs (each would wait forever for
    the other at one lane: the barrier times out); requests keep their own results."""

    def run(concurrent_calls: int) -> tuple[list[int], bool]:
        barrier = threading.Barrier(2, timeout=1)
        sizes: list[int] = []
        met = True

        def fn(batch: np.ndarray) -> np.ndarray:
            nonlocal met
            sizes.append(len(batch))
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                met = False
            return batch + 1

        async def main() -> list[list[np.ndarray]]:
            b = Batcher(fn, max_batch_size=4, concurrent_calls=concurrent_calls)
            first = asyncio.ensure_future(b.submit(np.array([[0.0]])))
            await asyncio.sleep(0.05)  # the first call is running (and waiting at the barrier)
            second = asyncio.ensure_future(b.submit(np.array([[10.0], [20.0]])))
            out = await asyncio.gather(first, second)
            b.close()
            return out

        out = asyncio.run(main())
        assert [float(x[0]) for r in out for x in r] == [1.0, 11.0, 21.0]
        return sizes, met

    assert run(2) == ([1, 2], True)
    assert run(1)[1] is False  # one lane: the second call only starts after the first gave up


def test_batcher_with_adaptive_calls_runs_a_lone_request_alone_and_shares_out_a_queue() -> None:
    """Adaptive calls: a lone request runs on ``fn`` (all cores) with no call beside it, even when
    another arrives meanwhile; requests queued together are shared out between the two lanes,
    which run ``narrow_fn`` side by side (the barrier is met only if both calls run at once)."""
    log: list[tuple[str, int, float, float]] = []
    barrier = threading.Barrier(2, timeout=2)

    def record(kind: str, batch: np.ndarray, work: Callable[[], object]) -> np.ndarray:
        start = time.monotonic()
        work()
        log.append((kind, len(batch), start, time.monotonic()))
        return batch + 1

    def wide(batch: np.ndarray) -> np.ndarray:
        return record("wide", batch, lambda: time.sleep(0.2))

    def narrow(batch: np.ndarray) -> np.ndarray:
        return record("narrow", batch, barrier.wait)

    async def main() -> list[list[np.ndarray]]:
        b = Batcher(wide, max_batch_size=8, concurrent_calls=2, narrow_fn=narrow)
        lone = asyncio.ensure_future(b.submit(np.array([[0.0]])))
        await asyncio.sleep(0.05)  # the lone call is running
        late = asyncio.ensure_future(b.submit(np.array([[1.0]])))
        first = await asyncio.gather(lone, late)
        queued = await asyncio.gather(*(b.submit(np.array([[float(i)]])) for i in range(10, 14)))
        b.close()
        return [*first, *queued]

    out = asyncio.run(main())
    assert [float(r[0][0]) for r in out] == [1.0, 2.0, 11.0, 12.0, 13.0, 14.0]
    assert [(k, n) for k, n, _, _ in log[:2]] == [("wide", 1), ("wide", 1)]
    assert log[1][2] >= log[0][3]  # the late request waited for the lone call to end
    assert sorted((k, n) for k, n, _, _ in log[2:]) == [("narrow", 2), ("narrow", 2)]


def test_batcher_errors_and_overload() -> None:
    def boom(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("model failed")

    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return batch

    async def main() -> None:
        b = Batcher(boom)
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit(np.zeros((2, 1)))
        b.close()
        s = Batcher(slow, max_batch_size=1, max_latency_ms=50)
        results = await asyncio.gather(
            *(s.submit(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True
        )
        s.close()
        assert isinstance(results[0], list)
        assert any(isinstance(r, Overloaded) for r in results[1:])

    asyncio.run(main())


# ---------------------------------------------------------------------------- the service class


def test_service_class_in_process(tiny_store: tuple[Path, dict[str, str]]) -> None:
    from starlette.datastructures import Headers, UploadFile

    from service.service import Nanomorph

    store, tags = tiny_store
    svc = Nanomorph.inner(  # type: ignore[attr-defined]
        settings=Settings(store=str(store), models={**Settings().models, "segment": "nope-segment:1"})
    )
    assert svc._ready.wait(30)
    assert svc.__is_ready__()
    out = svc.classify_batch(np.zeros((3, 1, 32, 32), np.float32))
    assert len(out) == 3 and all(r["label"] == "singular" for r in out)
    assert svc.embed_batch(np.ones((2, 1, 32, 32), np.float32)).shape == (2, 4)

    def upload(data: bytes, name: str) -> UploadFile:
        return UploadFile(
            io.BytesIO(data), size=len(data), filename=name, headers=Headers({"content-type": "image/png"})
        )

    async def call() -> object:
        return await svc.classify(images=[upload(png_bytes(speck_image(True)), "b.png")])

    resp = asyncio.run(call())
    assert resp.model == tags["classify"] and resp.results[0].label == "network"  # type: ignore[attr-defined]
    with pytest.raises(GuardError) as info:
        svc._slot("segment")
    assert info.value.status == 503 and "nope-segment" in info.value.message
    models = svc.models()
    assert {m.task: m.available for m in models.models} == {"classify": True, "embed": True, "segment": False}
    svc._shutdown()


def test_service_with_two_concurrent_calls_shares_the_cores(tiny_store: tuple[Path, dict[str, str]]) -> None:
    """NANOMORPH_CONCURRENT_CALLS reaches the batchers and the sessions: two lanes, each session
    with its share of the cores, and concurrent requests still get their own answers."""
    from service.service import Nanomorph

    store, _ = tiny_store
    settings = Settings(
        store=str(store), concurrent_calls=2, models={**Settings().models, "segment": "no-segment:1"}
    )
    svc = Nanomorph.inner(settings=settings)  # type: ignore[attr-defined]
    assert svc._ready.wait(30)
    slot = svc._slot("classify")
    assert (
        slot.batcher.concurrent_calls == 2 and slot.batcher.narrow_fn is None and slot.narrow_helper is None
    )
    threads = slot.onnx.session.get_session_options().intra_op_num_threads
    assert threads == settings.session_threads(2) >= 1

    async def both() -> list[list[dict[str, object]]]:
        dark, bright = np.zeros((1, 1, 32, 32), np.float32), np.ones((2, 1, 32, 32), np.float32)
        return list(await asyncio.gather(slot.batcher.submit(dark), slot.batcher.submit(bright)))

    dark, bright = asyncio.run(both())
    alone = svc.classify_batch(
        np.concatenate([np.zeros((1, 1, 32, 32)), np.ones((2, 1, 32, 32))]).astype(np.float32)
    )
    assert [r["label"] for r in dark + bright] == [r["label"] for r in alone]
    assert len(dark) == 1 and len(bright) == 2
    svc._shutdown()


@pytest.mark.skipif(available_cores() < 2, reason="auto adapts only with two or more cores")
def test_service_auto_calls_give_classify_a_second_session_of_half_the_cores(
    tiny_store: tuple[Path, dict[str, str]],
) -> None:
    """The default (auto) on CPU: classify gets a session of all the cores for lone requests and one
    of half of them for calls side by side; a queue shared out between the two lanes answers
    every request as one call would; segment keeps one call on one session."""
    from service.service import Nanomorph

    store, _ = tiny_store
    settings = Settings(store=str(store))
    svc = Nanomorph.inner(settings=settings)  # type: ignore[attr-defined]
    assert svc._ready.wait(30)
    slot = svc._slot("classify")
    assert slot.batcher.concurrent_calls == 2 and slot.batcher.narrow_fn is not None
    narrow = slot.narrow_helper.model.session.get_session_options().intra_op_num_threads
    assert narrow == available_cores() // 2
    assert slot.onnx.session.get_session_options().intra_op_num_threads == 0  # all cores
    segment = svc._slot("segment")
    assert segment.batcher.concurrent_calls == 1 and segment.narrow_helper is None

    images = [np.full((1, 1, 32, 32), v, np.float32) for v in (0.0, 1.0, 0.5, 0.25)]

    async def queued() -> list[list[dict[str, object]]]:
        return list(await asyncio.gather(*(slot.batcher.submit(x) for x in images)))

    shared = asyncio.run(queued())
    alone = svc.classify_batch(np.concatenate(images))
    assert [r[0]["label"] for r in shared] == [r["label"] for r in alone]
    for got, want in zip(shared, alone, strict=True):
        for name, value in want["probabilities"].items():  # type: ignore[attr-defined]
            assert got[0]["probabilities"][name] == pytest.approx(value, abs=1e-5)  # type: ignore[index]
    svc._shutdown()


def test_service_import_never_imports_torch_or_training() -> None:
    code = (
        "import sys, service.service; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ the serve CLI


def test_serve_options_become_environment() -> None:
    from nanomorph.cli import build_parser

    parser = build_parser("serve")
    args = parser.parse_args(
        ["--port", "4000", "--store", "/s", "--classify-model", "x-classify:1", "--max-batch-size", "8"]
        + ["--precision", "fp32"]
    )
    assert (args.host, args.port) == ("127.0.0.1", 4000)
    assert serve_cmd.env_from_args(args) == {
        "NANOMORPH_STORE": "/s",
        "NANOMORPH_CLASSIFY_MODEL": "x-classify:1",
        "NANOMORPH_MAX_BATCH_SIZE": "8",
        "NANOMORPH_PRECISION": "fp32",
    }
    assert serve_cmd.command("0.0.0.0", 4000, grace_s=12.5)[-7:] == [
        "service.service:Nanomorph",
        "--host",
        "0.0.0.0",
        "--port",
        "4000",
        "--timeout-graceful-shutdown",  # each worker's uvicorn drains for at most the grace
        "13",
    ]
    args = parser.parse_args(
        ["--shutdown-grace-s", "5", "--recycle-requests", "10000", "--recycle-rss-mb", "900"]
        + ["--concurrent-calls", "2"]
    )
    assert serve_cmd.env_from_args(args) == {
        "NANOMORPH_CONCURRENT_CALLS": "2",
        "NANOMORPH_SHUTDOWN_GRACE_S": "5.0",
        "NANOMORPH_RECYCLE_REQUESTS": "10000",
        "NANOMORPH_RECYCLE_RSS_MB": "900.0",
    }
    assert serve_cmd.grace_seconds({}) == 30.0
    assert serve_cmd.grace_seconds({"NANOMORPH_SHUTDOWN_GRACE_S": "5"}) == 5.0
    for bad in ("soon", "-1", "inf"):
        with pytest.raises(ValueError, match="NANOMORPH_SHUTDOWN_GRACE_S"):
            serve_cmd.grace_seconds({"NANOMORPH_SHUTDOWN_GRACE_S": bad})


def test_serve_bad_port_is_a_clear_cli_error() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nanomorph.cli", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "70000" in r.stderr and "Traceback" not in r.stderr
    assert json.dumps(r.stderr)  # one readable line


def test_serve_bad_setting_is_a_clear_cli_error_before_any_worker_starts() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nanomorph.cli", "serve", "--port", "31997", "--concurrent-calls", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BENTOML_HOME": "/nonexistent-never-created"},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "NANOMORPH_CONCURRENT_CALLS='0' must be 'auto' or a count >= 1" in r.stderr
