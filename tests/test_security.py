"""Transport security, for real: TLS and mutual TLS with certificates made here by the openssl
command."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

import client
from client import AsyncClient
from server.security import SecurityConfigError
from server.settings import Settings
from tests.conftest import ServerFactory

# certificates


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a client
    certificate signed by another CA the server does not trust."""

    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(folder)


def tls_settings(pki: Pki, mutual: bool = False) -> dict[str, str]:
    settings = {"tls_cert_file": pki.path("server.pem"), "tls_key_file": pki.path("server.key")}
    return {**settings, "tls_client_ca_file": pki.path("ca.pem")} if mutual else settings


def test_tls_settings_come_from_flags_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"LSTMD_TLS_CLIENT_CA_FILE": "ca.pem"}
    settings = Settings.from_args(["--tls-cert-file", "s.pem", "--tls-key-file", "s.key"], environ)
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == ("s.pem", "s.key", "ca.pem")
    for flags, words in [
        (["--tls-cert-file", "s.pem"], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-client-ca-file", "ca.pem"], "needs TLS"),
    ]:
        with pytest.raises(SystemExit):
            Settings.from_args(flags, {})
        assert words in capsys.readouterr().err


# TLS


async def test_tls_serves_and_plaintext_to_the_tls_port_fails(make_server: ServerFactory, pki: Pki) -> None:
    async with make_server(**tls_settings(pki)) as (running, _):
        target = f"127.0.0.1:{running.port}"
        async with AsyncClient(target, root_certificates=pki.read("ca.pem"), retries=0) as secure:
            assert await secure.health() == "SERVING"
            async with await secure.create_session() as session:
                assert (await session.feed("the cat")).position == 2
        async with AsyncClient(target, retries=0, timeout=5) as plaintext:
            with pytest.raises(client.Unavailable):
                await plaintext.list_models()
        async with AsyncClient(target, root_certificates=pki.read("other-ca.pem"), retries=0, timeout=5) as wrong:
            with pytest.raises(client.Unavailable):  # a server certificate the client does not trust
                await wrong.list_models()


async def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(
    make_server: ServerFactory, pki: Pki
) -> None:
    async with make_server(**tls_settings(pki, mutual=True)) as (running, _):
        target, ca = f"127.0.0.1:{running.port}", pki.read("ca.pem")
        async with AsyncClient(target, root_certificates=ca, certificate_chain=pki.read("client.pem"),
                               private_key=pki.read("client.key"), retries=0) as trusted:  # fmt: skip
            assert len(await trusted.list_models()) == 2
        async with AsyncClient(target, root_certificates=ca, retries=0, timeout=5) as anonymous:
            with pytest.raises(client.Unavailable):
                await anonymous.list_models()
        async with AsyncClient(target, root_certificates=ca, certificate_chain=pki.read("stranger.pem"),
                               private_key=pki.read("stranger.key"), retries=0, timeout=5) as stranger:  # fmt: skip
            with pytest.raises(client.Unavailable):
                await stranger.list_models()
    with pytest.raises(ValueError, match="go together"):
        AsyncClient(target, certificate_chain=pki.read("client.pem"))


async def test_unreadable_tls_files_stop_start_up(make_server: ServerFactory, pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "not.pem").write_text("hello")
    for overrides, words in [
        ({**tls_settings(pki), "tls_key_file": str(tmp_path / "missing.key")}, "--tls-key-file"),
        ({**tls_settings(pki), "tls_cert_file": str(tmp_path / "not.pem")}, "not a PEM file"),
    ]:
        with pytest.raises(SecurityConfigError, match=words):
            async with make_server(**overrides):
                pass
