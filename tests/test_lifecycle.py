"""Repository lifecycle against real servers on temporary repositories: config.pbtxt, versions,
explicit load/unload, polling with swaps under load, statistics, streaming, classification extension."""

from __future__ import annotations

import asyncio
import gc
import queue
import shutil
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from optic.server.app import settle_heap
from optic.server.repository import LoadFailed, ModelRepository
from optic.server.runtime import RuntimeOptions
from optic.server.scheduler import BatchingConfig
from tests.conftest import MODEL_REPO, SIDE, start_server

CLASSIFIER = MODEL_REPO / "classifier" / "1" / "model.onnx"

CONFIG = f"""
name: "classifier"
max_batch_size: 8
version_policy: {{ all {{ }} }}
input [ {{ name: "images" data_type: TYPE_FP32 dims: [ 3, {SIDE}, {SIDE} ] }} ]
dynamic_batching {{
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 5000
  default_queue_policy {{ max_queue_size: 64 default_timeout_microseconds: 20000000 }}
}}
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
parameters {{ key: "note" value: {{ string_value: "from a test" }} }}
model_warmup [ {{
  name: "zeros" batch_size: 2
  inputs {{ key: "images" value: {{ data_type: TYPE_FP32 dims: [ 3, {SIDE}, {SIDE} ] zero_data: true }} }}
}} ]
optimization {{ graph {{ level: 1 }} }}
response_cache {{ enable: true }}
"""


def _repo(tmp: Path, versions: tuple[int, ...] = (1,), config: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    repo = tmp / "repo"
    for v in versions:
        (repo / "classifier" / str(v)).mkdir(parents=True)
        shutil.copy(CLASSIFIER, repo / "classifier" / str(v) / "model.onnx")
    if config is not None:
        (repo / "classifier" / "config.pbtxt").write_text(config)
    for name in extra:
        shutil.copytree(MODEL_REPO / name, repo / name)
    return repo


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, SIDE, SIDE)).astype(np.float32)


def _input(x: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _expected(x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(CLASSIFIER)).run(None, {"images": x})[0]


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("configured")
    srv = start_server(tmp, repo=_repo(tmp, (1, 2), CONFIG))
    with tc.InferenceServerClient(srv.url) as client:
        yield srv, client
    assert srv.stop() == 0, srv.log()


def test_config_pbtxt_is_applied_and_completed(configured):
    srv, client = configured
    config = client.get_model_config("classifier", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["platform"] == "onnxruntime_onnx"
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    assert config["instance_group"][0]["count"] == 2
    assert config["parameters"]["note"]["string_value"] == "from a test"
    assert config["output"][0]["name"] == "logits" and config["output"][0]["dims"] == ["5"]  # filled from the model
    log = srv.log()
    assert "ModelConfig.optimization" in log and "ModelConfig.response_cache" in log  # named, not fatal


def test_versions_all_served_and_named(configured):
    _, client = configured
    assert list(client.get_model_metadata("classifier").versions) == ["1", "2"]
    assert client.is_model_ready("classifier", "1") and client.is_model_ready("classifier", "2")
    x = _images(3)
    for version in ("1", "2", ""):
        result = client.infer("classifier", [_input(x)], model_version=version)
        assert result.get_response().model_version == (version or "2")  # the default is the latest
        np.testing.assert_allclose(result.as_numpy("logits"), _expected(x), atol=1e-4)
    with pytest.raises(InferenceServerException, match="no version '7'"):
        client.infer("classifier", [_input(x)], model_version="7")


def test_batched_results_equal_unbatched_for_64_concurrent_inputs(configured):
    _, client = configured
    x = _images(64, seed=3)
    results: queue.Queue = queue.Queue()
    for i in range(64):
        client.async_infer(
            "classifier", [_input(x[i : i + 1])], lambda result, error, i=i: results.put((i, result, error))
        )
    got = np.zeros((64, 5), np.float32)
    for _ in range(64):
        i, result, error = results.get(timeout=60)
        assert error is None, error
        got[i] = result.as_numpy("logits")[0]
    np.testing.assert_allclose(got, _expected(x), atol=1e-4)
    stats = client.get_inference_statistics("classifier", as_json=True)["model_stats"]
    sizes = {int(b["batch_size"]) for s in stats for b in s.get("batch_stats", [])}
    assert max(sizes) > 1, sizes  # some requests really were batched together


def test_statistics(configured):
    _, client = configured
    before = client.get_inference_statistics("classifier", "1", as_json=True)["model_stats"][0]
    for _ in range(5):
        client.infer("classifier", [_input(_images(2))], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer("classifier", [_input(_images(9))], model_version="1")  # over max_batch_size: not counted
    after = client.get_inference_statistics("classifier", "1", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 10
    stats = after["inference_stats"]
    assert (
        int(stats["success"]["count"]) - int(before.get("inference_stats", {}).get("success", {}).get("count", 0)) == 5
    )
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(stats[key]["count"]) > 0 and int(stats[key]["ns"]) > 0, key
    assert int(after["execution_count"]) >= 5 and int(after["last_inference"]) > 0
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} == {("classifier", "1"), ("classifier", "2")}
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")


def test_classification_extension(configured):
    _, client = configured
    x = _images(2, seed=9)
    result = client.infer(
        "classifier", [_input(x)], outputs=[tc.InferRequestedOutput("logits", class_count=3)]
    ).as_numpy("logits")
    assert result.shape == (2, 3)
    want = _expected(x)
    labels = ("circle", "square", "triangle", "star", "hexagon")
    for row, logits in zip(result, want, strict=True):
        entries = [e.decode().split(":") for e in row]
        assert [int(e[1]) for e in entries] == list(np.argsort(-logits)[:3])
        assert all(abs(float(e[0]) - logits[int(e[1])]) < 1e-4 and e[2] == labels[int(e[1])] for e in entries)


def test_stream_infer_in_order_with_errors_in_band(configured):
    srv, _ = configured
    got: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as client:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        x = _images(20, seed=4)
        for i in range(20):
            if i == 7:  # a bad request mid-stream: wrong input name
                bad = tc.InferInput("pixels", [1, 3, SIDE, SIDE], "FP32")
                bad.set_data_from_numpy(x[:1])
                client.async_stream_infer("classifier", [bad], request_id="bad")
            client.async_stream_infer("classifier", [_input(x[i : i + 1])], request_id=str(i))
        answers = [got.get(timeout=30) for _ in range(21)]
        client.stop_stream()
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and "no input 'pixels'" in str(errors[0])
    ids = [r.get_response().id for r, e in answers if e is None]
    assert ids == [str(i) for i in range(20)]
    outputs = np.concatenate([r.as_numpy("logits") for r, e in answers if e is None])
    np.testing.assert_allclose(outputs, _expected(x), atol=1e-4)


def test_a_preferred_size_above_the_servers_cap_is_ignored_with_a_word(tmp_path):
    """The default models prefer batches of 8 (their config.pbtxt); an operator's smaller --max-batch-size is a
    memory bound and wins, instead of failing the model's load."""
    config = "dynamic_batching { preferred_batch_size: [ 2, 8 ] }"
    srv = start_server(tmp_path, "--max-batch-size", "4", repo=_repo(tmp_path, config=config))
    try:
        with tc.InferenceServerClient(srv.url) as client:
            served = client.get_model_config("classifier", as_json=True)["config"]
            assert served["max_batch_size"] == 4 and served["dynamic_batching"]["preferred_batch_size"] == [2]
            x = _images(3)
            np.testing.assert_allclose(client.infer("classifier", [_input(x)]).as_numpy("logits"), _expected(x),
                                       atol=1e-4)  # fmt: skip
    finally:
        assert srv.stop() == 0
    assert "preferred_batch_size [8] is above --max-batch-size 4; ignored" in srv.log()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ('name: "other"', "names the model 'other'"),
        ("max_batch_size: -1", "max_batch_size must be 0 or more"),
        ('input [ { name: "images" data_type: TYPE_INT64 } ]', "declared TYPE_INT64"),
        ('input [ { name: "images" dims: [ 3, 32, 32 ] } ]', "has dims [3, 32, 32]"),
        ("version_policy: { specific { versions: [ 4 ] } }", "version(s) [4] that are not on disk"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 16 ] }", "preferred_batch_size [16]"),
        ("max_batch_size: {", "config.pbtxt"),
        (
            'parameters { key: "intra_op_thread_count" value: { string_value: "-2" } }',
            "intra_op_thread_count must be a whole number of threads, not '-2'",
        ),
        ("instance_group [ { count: 40 }, { count: 40 } ]", "instance_group counts add up to 80"),
    ],
    ids=["name", "negative-batch", "datatype", "dims", "versions", "preferred", "syntax", "threads", "slots"],
)
def test_bad_config_fails_only_that_model(tmp_path, config, reason):
    srv = start_server(tmp_path, repo=_repo(tmp_path, config=config, extra=("segmenter",)))
    try:
        with tc.InferenceServerClient(srv.url) as client:
            assert client.is_model_ready("segmenter") and not client.is_model_ready("classifier")
            assert not client.is_server_ready()
            index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
            assert index["classifier"]["state"] == "UNAVAILABLE" and reason in index["classifier"]["reason"]
            with pytest.raises(InferenceServerException, match="failed to load") as err:
                client.infer("classifier", [_input(_images(1))])
            assert err.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        assert srv.stop() == 0


def test_explicit_mode_load_and_unload(tmp_path):
    srv = start_server(
        tmp_path,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "classifier",
        repo=_repo(tmp_path, extra=("segmenter",)),
    )
    try:
        with tc.InferenceServerClient(srv.url) as client:
            assert client.is_model_ready("classifier") and not client.is_model_ready("segmenter")
            index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
            assert index["segmenter"]["state"] == "UNAVAILABLE"
            client.load_model("segmenter")
            assert client.is_model_ready("segmenter")
            client.unload_model("classifier")
            assert not client.is_model_ready("classifier")
            with pytest.raises(InferenceServerException, match="unloaded"):
                client.infer("classifier", [_input(_images(1))])
            client.load_model("classifier")
            assert client.is_model_ready("classifier")
            for name in ("nope", "../repo", "classifier/1", ""):
                with pytest.raises(InferenceServerException) as err:
                    client.load_model(name)
                assert err.value.status() == "StatusCode.NOT_FOUND", name
            ready = client.get_model_repository_index(as_json=True)["models"]
            assert {(m["name"], m.get("state")) for m in ready} == {("classifier", "READY"), ("segmenter", "READY")}
    finally:
        assert srv.stop() == 0


def test_load_rpcs_refused_outside_explicit_mode(configured):
    _, client = configured
    with pytest.raises(InferenceServerException) as err:
        client.load_model("classifier")
    assert err.value.status() == "StatusCode.FAILED_PRECONDITION" and "explicit" in str(err.value)


def test_poll_mode_swaps_under_load_with_zero_failures(tmp_path):
    repo = _repo(tmp_path)
    srv = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2", repo=repo)
    failures: list[str] = []
    answered: list[str] = []
    stop = threading.Event()

    def load() -> None:
        x = _images(1)
        with grpc.insecure_channel(srv.url), tc.InferenceServerClient(srv.url) as client:
            while not stop.is_set():
                try:
                    answered.append(client.infer("classifier", [_input(x)]).get_response().model_version)
                except InferenceServerException as exc:
                    failures.append(str(exc))

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        with tc.InferenceServerClient(srv.url) as client:
            _wait(lambda: len(answered) > 20)
            (repo / "classifier" / "2").mkdir()
            shutil.copy(CLASSIFIER, repo / "classifier" / "2" / "model.onnx")
            _wait(lambda: client.get_model_metadata("classifier").versions == ["2"])
            _wait(lambda: answered[-1] == "2")
            # A corrupt new version: the serving one stays, the error is reported.
            (repo / "classifier" / "3").mkdir()
            (repo / "classifier" / "3" / "model.onnx").write_bytes(b"not an onnx file")
            _wait(
                lambda: any(
                    m.get("state") == "UNAVAILABLE" and m.get("version") == "3"
                    for m in client.get_model_repository_index(as_json=True)["models"]
                )
            )
            n = len(answered)
            _wait(lambda: len(answered) > n + 20)
            assert client.is_model_ready("classifier", "2") and answered[-1] == "2"
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
        code = srv.stop()
    assert failures == [], failures[:3]
    assert code == 0
    assert "failed to load classifier (still serving version(s): 2)" in srv.log()


def test_queue_policy_timeout_rejects_before_inference(tmp_path):
    config = """
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 1000000
  default_queue_policy { default_timeout_microseconds: 100000 allow_timeout_override: true }
}
"""
    # The fixed window keeps a lone request queued for the whole delay, longer than the policy's timeout.
    srv = start_server(tmp_path, "--batch-window", "fixed", repo=_repo(tmp_path, config=config))
    try:
        with tc.InferenceServerClient(srv.url) as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as err:
                client.infer("classifier", [_input(_images(1))])
            assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED" and time.monotonic() - started < 0.9
            stats = client.get_inference_statistics("classifier", as_json=True)["model_stats"][0]
            assert "execution_count" not in stats  # nothing reached the session
            assert int(stats["inference_stats"]["fail"]["count"]) == 1
            # The request's own timeout (allowed by the policy) replaces the default: it waits out the delay.
            result = client.infer("classifier", [_input(_images(1))], timeout=5_000_000)
            assert result.as_numpy("logits").shape == (1, 5)
    finally:
        assert srv.stop() == 0


def test_metrics_are_labelled_by_model_and_version(configured):
    import urllib.request

    srv, client = configured
    client.infer("classifier", [_input(_images(1))], model_version="1")
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    for line in (
        'optic_model_ready{model="classifier",version="1"} 1.0',
        'optic_model_ready{model="classifier",version="2"} 1.0',
        'optic_queue_size{model="classifier",version="2"}',
        'optic_inferences_total{model="classifier",outcome="success",version="1"}',
        'optic_batch_size_bucket{le="1.0",model="classifier",version="1"}',
        'optic_compute_duration_seconds_count{model="classifier",version="1"}',
    ):
        assert line in text, line


def test_the_default_repository_ships_the_export_stages_serving_configs(server):
    """model_repo's config.pbtxt files are what ``optic export`` writes (no drift), and the server applies them: the
    captioner's parts run one batch at a time on one thread, the CNNs get the default two lanes where there are 2+
    cores."""
    from optic.export.recipe import SERVING_CONFIG
    from optic.server.runtime import default_instances, default_threads

    shipped = {p.parent.name: p.read_text() for p in MODEL_REPO.glob("*/config.pbtxt")}
    assert shipped == SERVING_CONFIG
    with tc.InferenceServerClient(server.url) as client:
        served = {name: client.get_model_config(name, as_json=True)["config"] for name in shipped}
    counts = {
        name: served[name]["instance_group"][0]["count"]
        for name in ("captioner_encoder", "captioner_decoder", "classifier", "segmenter")
    }
    preferred = {
        name: served[name]["dynamic_batching"].get("preferred_batch_size")
        for name in ("classifier", "detector", "segmenter")
    }
    threads = {
        name: served[name].get("parameters", {}) for name in ("captioner_encoder", "captioner_decoder", "classifier")
    }
    lanes = default_instances(default_threads())
    assert counts == {"captioner_encoder": 1, "captioner_decoder": 1, "classifier": lanes, "segmenter": lanes}
    # The captioner's runs take one thread each (applied: test_a_config_sets_its_models_threads_capped_at_the_servers).
    one = {"intra_op_thread_count": {"string_value": "1"}}
    assert threads == {"captioner_encoder": one, "captioner_decoder": one, "classifier": {}}
    # The CNNs gather batches of 8 under load: cheaper per image than 32, and half the segmenter's peak memory.
    assert preferred == {"classifier": [8], "detector": [8], "segmenter": [8]}


async def _unload_and_wait(repo: ModelRepository) -> weakref.ref:
    """Unload the classifier and wait until its retired version is released and the loop has turned again (for
    the repository's ``on_change``); a weak reference to its wide session."""
    released = weakref.ref(repo.get("classifier").runtime)
    await repo.unload("classifier")
    while repo._retiring:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return released


def _explicit_repo(tmp_path: Path, on_change=None) -> ModelRepository:
    return ModelRepository(
        _repo(tmp_path),
        RuntimeOptions(),
        BatchingConfig(),
        control_mode="explicit",
        startup_models=(),
        on_change=on_change,
    )


def _threads_config(threads: str) -> str:
    return f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}'


@pytest.mark.parametrize(
    ("threads", "cores", "flag", "expected"),
    [("1", 2, 0, 1), ("3", 4, 0, 3), ("64", 2, 0, 2), ("2", 4, 1, 1), ("0", 2, 0, 0)],
    ids=["one", "three-of-four", "capped-at-cores", "capped-at-flag", "servers-choice"],
)
def test_a_config_sets_its_models_threads_capped_at_the_servers(tmp_path, caplog, threads, cores, flag, expected):
    """Triton's onnxruntime-backend parameter: every run of the model uses that many threads, no narrow lane opens
    and, unless the file has an instance_group, it runs one batch at a time, as with --intra-op-threads (the
    default captioner runs on one: docs/model-repository.md). More than the server would give a run (its cores,
    or --intra-op-threads) is capped, with a word; 0 leaves the server's choice (two lanes on 2+ cores)."""
    repo = ModelRepository(
        _repo(tmp_path, config=_threads_config(threads)),
        RuntimeOptions(cores=cores, intra_op_threads=flag),
        BatchingConfig(instances=2),
        control_mode="explicit",
        startup_models=(),
    )

    async def scenario() -> None:
        await repo.load("classifier")
        model = repo.get("classifier")
        if expected:
            assert model.runtime.threads == expected and model.runtime.narrow == []
            assert model.batching.instances == 1
        else:
            assert model.runtime.threads == cores and [m.threads for m in model.runtime.narrow] == [cores // 2]
            assert model.batching.instances == 2
        x = _images(2)
        got = await asyncio.gather(*(model.batcher.infer({"images": x[i : i + 1]}) for i in range(2)))
        np.testing.assert_allclose(np.concatenate([g["logits"] for g in got]), _expected(x), atol=1e-4)
        await repo.close()

    asyncio.run(scenario())
    cap = flag or cores
    capped = f"intra_op_thread_count {threads} is above this server's {cap}; {cap} used"
    assert (capped in caplog.text) == (int(threads) > cap)


def test_an_unloaded_model_is_released_without_waiting_for_the_cyclic_collector(tmp_path):
    """An unloaded version's onnxruntime sessions go when it is released, by reference counting alone: the
    queue-size gauge used to hold the batcher in prometheus-client's own cycle, so they waited for a full
    collection."""
    repo = _explicit_repo(tmp_path)

    async def scenario() -> None:
        await repo.load("classifier")
        released = await _unload_and_wait(repo)
        assert released() is None
        await repo.close()

    gc.disable()
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()


def test_a_frozen_heap_still_gives_up_an_unloaded_model_in_a_cycle(tmp_path):
    """The server freezes what a load made (settle_heap); a model whose objects end up in a cycle must still be
    collected once it is released, which needs the freeze undone and a collection: the repository's on_change."""
    frozen: list[int] = []

    def settle() -> None:
        settle_heap()
        frozen.append(gc.get_freeze_count())

    repo = _explicit_repo(tmp_path, settle)

    async def scenario() -> None:
        await repo.load("classifier")
        await asyncio.sleep(0)  # on_change runs on the next turn of the loop
        runtime = repo.get("classifier").runtime
        runtime.cycle = runtime  # type: ignore[attr-defined]
        del runtime
        assert len(frozen) == 1 and frozen[0] > 0
        released = await _unload_and_wait(repo)
        assert len(frozen) == 2
        assert released() is None
        await repo.load("classifier")
        await asyncio.sleep(0)
        assert len(frozen) == 3
        await repo.close()
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(frozen) == 3  # closing settles nothing

    gc.disable()  # only settle_heap's own collections
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_version_loaded_again_while_its_old_copy_drains_keeps_its_gauges(tmp_path):
    """Unload, then load the same version while a request still holds the unloaded copy: when that copy is
    released, the live version's ready and queue-size series stay (they are the same series)."""
    repo = _explicit_repo(tmp_path)
    labels = {"model": "classifier", "version": "1"}

    async def scenario() -> None:
        await repo.load("classifier")
        with repo.use("classifier"):
            await repo.unload("classifier")
            await repo.load("classifier")
            assert REGISTRY.get_sample_value("optic_model_ready", labels) == 1
        while repo._retiring:
            await asyncio.sleep(0.01)
        assert REGISTRY.get_sample_value("optic_model_ready", labels) == 1
        assert REGISTRY.get_sample_value("optic_queue_size", labels) == 0
        await repo.close()
        assert REGISTRY.get_sample_value("optic_queue_size", labels) is None  # unloaded for good: gone

    asyncio.run(scenario())


def test_a_failed_load_settles_the_heap_too(tmp_path):
    """A failure's traceback holds what the load built in a reference cycle: the repository asks for a settling
    (collect, then freeze) after it as after a success, or a later freeze could keep that cycle for good."""
    calls: list[int] = []
    repo = _explicit_repo(tmp_path, lambda: calls.append(1))
    (tmp_path / "repo" / "classifier" / "1" / "model.onnx").write_bytes(b"not an onnx file")

    async def scenario() -> None:
        with pytest.raises(LoadFailed):
            await repo.load("classifier")
        await asyncio.sleep(0)
        assert calls == [1]
        await repo.close()

    asyncio.run(scenario())
