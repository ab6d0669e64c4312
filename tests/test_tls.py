"""TLS on both ports (--tls-cert/--tls-key) and mutual TLS (--tls-client-ca), with certificates made by openssl.

A test CA signs a server certificate for localhost/127.0.0.1 and a client certificate; clients trust the CA
only, as they would in a real deployment. Plaintext clients and clients trusting another CA are refused.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import rwkvd

from service.app import App
from service.config import build_config, parse_serve_args
from tests.support import running_app

on_module_loop = pytest.mark.asyncio(loop_scope="module")  # the loop the module's servers live on


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        *("req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        *("-keyout", str(key), "-out", str(cert)),
    )
    return key, cert


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    _openssl(
        *("req", "-new", "-nodes", "-subj", f"/CN={name}", "-newkey", "ec"),
        *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(csr)),
    )
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extensions
    )
    ca_key, ca_cert = ca
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial"),
        *("-days", "1", "-extfile", str(ext), "-out", str(cert)),
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "test-ca")
    _, other_ca = _make_ca(directory, "other-ca")
    server_key, server_cert = _make_leaf(
        directory, "server", ca, "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    client_key, client_cert = _make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[1], server_cert, server_key, client_cert, client_key, other_ca)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_app(pki: Pki) -> AsyncIterator[App]:
    async with running_app(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as app:
        yield app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mtls_app(pki: Pki) -> AsyncIterator[App]:
    settings = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca)}
    async with running_app(**settings) as app:
        yield app


def ports(app: App) -> tuple[int, int]:
    assert app.grpc is not None
    assert app.http is not None
    return app.grpc.port, app.http.port


def trusting(ca: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(certfile=str(client[0]), keyfile=str(client[1]))
    return context


@on_module_loop
async def test_grpc_over_tls_with_the_typed_client(tls_app: App, pki: Pki) -> None:
    grpc_port, _ = ports(tls_app)
    async with rwkvd.AsyncClient(f"localhost:{grpc_port}", tls=True, root_certificates=pki.read(pki.ca)) as client:
        assert [m.id for m in await client.list_models()] == ["local/rwkv7-demo"]
        events = [e async for e in client.complete_stream("Hello", max_tokens=3, ignore_eos=True, temperature=0)]
    assert events[-1].finished.usage.completion_tokens == 3


@on_module_loop
async def test_https_with_a_client_that_trusts_the_ca(tls_app: App, pki: Pki) -> None:
    _, http_port = ports(tls_app)
    async with httpx.AsyncClient(base_url=f"https://localhost:{http_port}", verify=trusting(pki.ca)) as http:
        assert (await http.get("/health/ready")).status_code == 200
        body = {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert response.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["object"] == "text_completion"
    assert tls_app.base_url.startswith("https://")  # prediction URLs and webhooks name the right scheme


@on_module_loop
async def test_plaintext_and_untrusted_clients_are_refused(tls_app: App, pki: Pki) -> None:
    grpc_port, http_port = ports(tls_app)
    async with rwkvd.AsyncClient(f"localhost:{grpc_port}", max_attempts=1) as plaintext:
        with pytest.raises(rwkvd.Unavailable):
            await plaintext.list_models(timeout=5)
    other = pki.read(pki.other_ca)
    async with rwkvd.AsyncClient(f"localhost:{grpc_port}", tls=True, root_certificates=other, max_attempts=1) as bad:
        with pytest.raises(rwkvd.Unavailable):
            await bad.list_models(timeout=5)
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(httpx.TransportError):  # the server answers a TLS alert, never HTTP
            await http.get(f"http://localhost:{http_port}/health/ready")
    async with httpx.AsyncClient(verify=trusting(pki.other_ca), timeout=5) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"https://localhost:{http_port}/health/ready")


@on_module_loop
async def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(mtls_app: App, pki: Pki) -> None:
    grpc_port, http_port = ports(mtls_app)
    ca = pki.read(pki.ca)
    identity = {"private_key": pki.read(pki.client_key), "certificate_chain": pki.read(pki.client_cert)}
    async with rwkvd.AsyncClient(f"localhost:{grpc_port}", tls=True, root_certificates=ca, **identity) as client:
        assert len(await client.list_models()) == 1
    async with rwkvd.AsyncClient(f"localhost:{grpc_port}", tls=True, root_certificates=ca, max_attempts=1) as anon:
        with pytest.raises(rwkvd.Unavailable):
            await anon.list_models(timeout=5)
    with_cert = trusting(pki.ca, (pki.client_cert, pki.client_key))
    async with httpx.AsyncClient(base_url=f"https://localhost:{http_port}", verify=with_cert) as http:
        assert (await http.get("/v1/models")).status_code == 200
    async with httpx.AsyncClient(base_url=f"https://localhost:{http_port}", verify=trusting(pki.ca)) as http:
        with pytest.raises(httpx.TransportError):  # TLS 1.3: the refusal arrives with the first read
            await http.get("/v1/models")


@on_module_loop
async def test_a_missing_certificate_file_fails_the_start(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with running_app(tls_cert=str(tmp_path / "absent.crt"), tls_key=str(pki.server_key)):
            pass


def test_tls_settings_are_checked_and_read_from_flags_and_environment(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        build_config({"tls_cert": str(pki.server_cert)})
    with pytest.raises(ValueError, match="needs tls_cert"):
        build_config({"tls_client_ca": str(pki.ca)})
    config = parse_serve_args(
        ["--tls-cert", str(pki.server_cert)], {"RWKVD_TLS_KEY": str(pki.server_key), "RWKVD_TLS_CLIENT_CA": "ca.pem"}
    )
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        str(pki.server_cert),
        str(pki.server_key),
        "ca.pem",
    )
