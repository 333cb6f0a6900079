"""TLS, mutual TLS, bearer tokens and the health-only port, against real servers with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from optic.client.vision import Credentials, VisionClient
from optic.export.data import make_scenes
from tests.conftest import MODEL_REPO, ROOT, SIDE, encode, start_server

TOKENS = ("first-token-0123456789abcdef", "rotated-token-fedcba9876543210")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path
    tokens: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("optic test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    tokens = d / "tokens"
    tokens.write_text("# one token per line; either is accepted\n" + "\n".join(TOKENS) + "\n")
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", _cert("localhost", server_key, ca, ca_key, server=True)),
        server_key=_write(d / "server.key", key=server_key),
        client_cert=_write(d / "client.pem", _cert("client", client_key, ca, ca_key)),
        client_key=_write(d / "client.key", key=client_key),
        rogue_cert=_write(d / "rogue.pem", _cert("rogue", rogue_key, rogue_ca, rogue_ca_key)),
        rogue_key=_write(d / "rogue.key", key=rogue_key),
        tokens=tokens,
    )


@pytest.fixture(scope="module")
def one_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the classifier: these servers start in a second."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "classifier").symlink_to(MODEL_REPO / "classifier", target_is_directory=True)
    return repo


IMAGE = encode(make_scenes(1, seed=3)[0].image)


def tls_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


def _classify(url: str, credentials: Credentials) -> str:
    with VisionClient(url, timeout=10, credentials=credentials) as client:
        return client.classify(IMAGE, top_k=1)[0].label


def _code(fn: object, *args: object) -> grpc.StatusCode:
    try:
        fn(*args)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()
    raise AssertionError("the call succeeded")


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, one_model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(
        tmp_path_factory.mktemp("mtls"),
        *tls_flags(pki),
        "--tls-client-ca",
        str(pki.ca),
        repo=one_model_repo,
        health_port=True,
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def test_tls_server_answers_tls_clients_only(pki: Pki, one_model_repo: Path, tmp_path: Path) -> None:
    srv = start_server(
        tmp_path,
        *tls_flags(pki),
        repo=one_model_repo,
        health_port=True,
    )
    try:
        assert _classify(srv.url, Credentials(ca=pki.ca))
        # A plaintext client and a client that does not trust the server's CA both fail to connect.
        assert _code(_classify, srv.url, Credentials()) == grpc.StatusCode.UNAVAILABLE
        assert _code(_classify, srv.url, Credentials(ca=pki.rogue_cert)) == grpc.StatusCode.UNAVAILABLE
        # The stock Triton client over TLS.
        client = tc.InferenceServerClient(srv.url, ssl=True, root_certificates=str(pki.ca))
        x = tc.InferInput("images", [1, 3, SIDE, SIDE], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, SIDE, SIDE), np.float32))
        assert client.infer("classifier", [x]).as_numpy("logits").shape == (1, 5)
        assert "TLS" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki, mtls_server) -> None:
    url = mtls_server.url
    assert _classify(url, Credentials(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
    assert _code(_classify, url, Credentials(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    rogue = Credentials(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)
    assert _code(_classify, url, rogue) == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.health() == health_pb2.HealthCheckResponse.SERVING  # the plaintext health port


def test_health_port_serves_health_and_nothing_else(mtls_server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(service="optic.liveness"), timeout=5).status == 1
        call = ch.unary_unary("/optic.v1.Vision/Classify")
        assert _code(call, b"", 5) == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(scope="module")
def token_server(pki: Pki, one_model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("token"), "--auth-token-file", str(pki.tokens), repo=one_model_repo)
    yield srv
    assert srv.stop() == 0, srv.log()


def _reflect(url: str, metadata: tuple = ()) -> list[str]:
    with grpc.insecure_channel(url) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, metadata=metadata
        )
        return [s.name for a in answers for s in a.list_services_response.service]


def test_bearer_token_required_and_rotation_accepted(token_server) -> None:
    url = token_server.url
    for token in TOKENS:  # either line of the token file works
        assert _classify(url, Credentials(token=token))
    for wrong, needle in ((None, "missing bearer token"), ("not-the-token-0123456789", "invalid bearer token")):
        with pytest.raises(grpc.RpcError) as err:
            _classify(url, Credentials(token=wrong))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert needle in err.value.details()
    # A token without the Bearer scheme, or with a prefix of a real one, is refused too.
    with grpc.insecure_channel(url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ServerLive")
        for header in (TOKENS[0], f"Bearer {TOKENS[0][:-1]}", f"Basic {TOKENS[0]}"):
            assert _code(call, b"", 5, (("authorization", header),)) == grpc.StatusCode.UNAUTHENTICATED
    # Health is open by default (kubelet probes send no token); reflection is not.
    assert token_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert _code(_reflect, url) == grpc.StatusCode.UNAUTHENTICATED
    assert "optic.v1.Vision" in _reflect(url, (("authorization", f"Bearer {TOKENS[0]}"),))
    # The stock Triton client passes the header through `headers`.
    client = tc.InferenceServerClient(url)
    assert client.is_server_live(headers={"authorization": f"Bearer {TOKENS[1]}"})
    with pytest.raises(tc.InferenceServerException, match=r"UNAUTHENTICATED|missing bearer token"):
        client.is_server_live()
    log = token_server.log()
    assert "bearer token" in log and not any(t in log for t in TOKENS)
    metrics = __import__("urllib.request").request.urlopen(token_server.metrics_url, timeout=5).read().decode()
    assert 'code="UNAUTHENTICATED"' in metrics


def test_optic_bench_reaches_a_token_server(pki: Pki, token_server, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[0] + "\n")
    base = [sys.executable, "-m", "optic.server.cli", "bench", "--url", token_server.url, "--requests", "20",
            "--concurrency", "2", "--warmup", "0", "--no-progress", "--image-size", "64", "64"]  # fmt: skip
    ok = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and "errors: none" in ok.stdout, ok.stdout + ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "UNAUTHENTICATED" in refused.stdout + refused.stderr


def test_auth_open_choices(pki: Pki, one_model_repo: Path, tmp_path: Path) -> None:
    srv = start_server(
        tmp_path, "--auth-token-file", str(pki.tokens), "--auth-open", "none", repo=one_model_repo, health_port=True
    )
    try:
        with grpc.insecure_channel(srv.url) as ch:  # health on the main port now needs the token too
            stub = health_pb2_grpc.HealthStub(ch)
            assert _code(stub.Check, health_pb2.HealthCheckRequest(), 5) == grpc.StatusCode.UNAUTHENTICATED
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING  # the health-only port stays open
    finally:
        assert srv.stop() == 0
    srv = start_server(
        tmp_path, "--auth-token-file", str(pki.tokens), "--auth-open", "health,reflection", repo=one_model_repo
    )
    try:
        assert "optic.v1.Vision" in _reflect(srv.url)
        assert _code(_classify, srv.url, Credentials()) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert srv.stop() == 0


def test_tls_and_token_together_with_optic_infer(pki: Pki, one_model_repo: Path, tmp_path: Path) -> None:
    srv = start_server(
        tmp_path,
        *tls_flags(pki),
        "--auth-token-file",
        str(pki.tokens),
        repo=one_model_repo,
        health_port=True,
    )
    try:
        image = tmp_path / "scene.png"
        image.write_bytes(IMAGE)
        base = [sys.executable, "-m", "optic.server.cli", "infer", "--url", f"localhost:{srv.grpc_port}", str(image)]
        token_file = tmp_path / "token"
        token_file.write_text(TOKENS[1] + "\n")
        ok = subprocess.run(
            [*base, "--tls-ca", str(pki.ca), "--token-file", str(token_file)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run([*base, "--tls-ca", str(pki.ca)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tls-cert", "{cert}"], "needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "cannot read TLS certificate"),
        (["--tls-cert", "{tokens}", "--tls-key", "{key}"], "must be PEM files"),
        (["--auth-token-file", "{missing}"], "cannot read token file"),
        (["--auth-token-file", "{short}"], "shorter than 16 characters"),
        (["--auth-token-file", "{empty}"], "holds no token"),
        (["--auth-token-file", "{tokens}", "--auth-open", "metrics"], "--auth-open 'metrics'"),
        (["--max-inflight", "0"], "--max-inflight 0 is out of range: choose 1 to"),
    ],
)
def test_security_flag_mistakes_stop_the_server_at_once(pki: Pki, tmp_path: Path, flags, needle) -> None:
    (tmp_path / "short").write_text("abc\n")
    (tmp_path / "empty").write_text("# nothing\n\n")
    paths = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "ca": pki.ca,
        "tokens": pki.tokens,
        "missing": tmp_path / "nope.pem",
        "short": tmp_path / "short",
        "empty": tmp_path / "empty",
    }
    args = [f.format(**paths) for f in flags]
    done = subprocess.run(
        [sys.executable, "-m", "optic.server.cli", "serve", "--model-repo", str(MODEL_REPO), "--grpc-port", "0",
         "--workers", "1", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
