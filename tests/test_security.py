"""Access control and transport security, for real: TLS and mutual TLS with certificates made
here by the openssl command, API keys over real channels, sessions owned by keys, per-key
quotas, and keys kept out of logs, metrics and --help."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lstmd import client
from lstmd.client import AsyncClient, Client
from lstmd.server.app import RunningServer
from lstmd.server.security import SecurityConfigError, load_keys
from lstmd.server.settings import Settings
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import Reference, ServerFactory, memory_sessions, start_process
from tests.test_cli import LSTMD, lstmd
from tests.test_server import assert_matches, code_of

KEY_A = "alice-key-5wWq8mJ3xTz9"  # distinctive, so a search of logs and metrics finds any copy
KEY_B = "bob-key-Lk2p7Rv4QsYn0c"
KEY_C = "Zr8uKd3nFw6Hq1Ye5Tb0"  # unnamed: its id is a hash
KEYS = f"alice:{KEY_A},bob:{KEY_B}, {KEY_C}"
NOBODY = "0" * 32  # a well-formed session id that names no session

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


# settings and key files


def test_tls_and_key_settings_come_from_flags_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"LSTMD_API_KEYS": KEYS, "LSTMD_TLS_CLIENT_CA_FILE": "ca.pem", "LSTMD_MAX_SESSIONS_PER_KEY": "7"}
    settings = Settings.from_args(["--tls-cert-file", "s.pem", "--tls-key-file", "s.key"], environ)
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == ("s.pem", "s.key", "ca.pem")
    assert settings.api_keys == KEYS and settings.max_sessions_per_key == 7
    assert settings.keyless_services == "health,reflection"
    assert KEY_A not in repr(settings)
    assert Settings.from_args(["--api-keys", "x:" + KEY_B], {"LSTMD_API_KEYS": KEYS}).api_keys == "x:" + KEY_B
    with pytest.raises(SystemExit):
        Settings.from_args(["--help"], environ)
    assert "LSTMD_API_KEYS" in capsys.readouterr().out  # documented, with its value nowhere in the help
    for flags, words in [
        (["--tls-cert-file", "s.pem"], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-client-ca-file", "ca.pem"], "needs TLS"),
        (["--keyless-services", "health,lstmd"], "--keyless-services takes"),
        (["--max-sessions-per-key", "-1"], "must not be negative"),
    ]:
        with pytest.raises(SystemExit):
            Settings.from_args(flags, {})
        assert words in capsys.readouterr().err


def test_keys_load_from_a_file_and_the_environment_with_ids(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"# lstmd API keys\n\nalice:{KEY_A}\n  {KEY_C}  \n")
    keys = load_keys(Settings(api_keys_file=str(tmp_path / "keys"), api_keys=f"bob:{KEY_B}"))
    assert keys is not None and [k.id for k in keys.keys][0::2] == ["alice", "bob"]
    assert keys.keys[1].id.startswith("key-") and len(keys.keys[1].id) == 16
    assert keys.identify([("authorization", f"Bearer {KEY_C}")]) == keys.keys[1].id
    assert keys.identify([("authorization", f"bearer {KEY_B}")]) == "bob"
    assert load_keys(Settings()) is None  # keys off


@pytest.mark.parametrize(
    ("file_text", "env", "words"),
    [
        ("# only a comment\n", "", "holds no keys"),
        (f"alice:{KEY_A}\n", f"alice:{KEY_B}", "the key name 'alice' is used twice"),
        (f"alice:{KEY_A}\n", f"bob:{KEY_A}", "the same key is listed twice"),
        ("alice:short-key\n", "", "line 1: the key is shorter than 16 characters"),
        (f"\n\nal ice:{KEY_A}\n", "", "line 3: the name before ':' must be"),
        (f"alice:{KEY_A} {KEY_B}\n", "", "printable ASCII without spaces"),
        (None, "", "cannot read it"),
    ],
)
def test_unusable_keys_stop_start_up_without_showing_the_key(
    tmp_path: Path, file_text: str | None, env: str, words: str
) -> None:
    path = tmp_path / "keys"
    if file_text is not None:
        path.write_text(file_text)
    with pytest.raises(SecurityConfigError) as error:
        load_keys(Settings(api_keys_file=str(path), api_keys=env))
    assert words in str(error.value)
    assert KEY_A not in str(error.value) and KEY_B not in str(error.value) and "short-key" not in str(error.value)


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


# API keys


def open_channel(running: RunningServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")


class As:
    """The lstmd stub, every call carrying ``authorization: Bearer <key>`` (no key: nothing)."""

    def __init__(self, channel: grpc.aio.Channel, key: str | None):
        self._stub = lstmd_pb2_grpc.LstmdStub(channel)
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def __getattr__(self, method: str) -> Any:
        return functools.partial(getattr(self._stub, method), metadata=self._metadata)


@pytest.fixture
async def keyed(make_server: ServerFactory) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    async with make_server(api_keys=KEYS) as (running, _), open_channel(running) as channel:
        yield running, channel


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ((), "this server requires an API key: send the metadata 'authorization: Bearer <key>'"),
        ((("authorization", KEY_A),), "must be 'Bearer <key>'"),
        ((("authorization", "Bearer " + KEY_A[:-1] + "x"),), "the API key is not valid"),
        ((("authorization", "Bearer " + KEY_A + KEY_B),), "the API key is not valid"),
    ],
)
async def test_no_key_or_a_wrong_key_is_unauthenticated_on_every_rpc(
    keyed: tuple[RunningServer, grpc.aio.Channel], metadata: tuple[tuple[str, str], ...], words: str
) -> None:
    running, channel = keyed
    stub = lstmd_pb2_grpc.LstmdStub(channel)
    calls = [
        stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
        stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata),
        stub.GetSession(pb.GetSessionRequest(session_id=NOBODY), metadata=metadata),
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=NOBODY), metadata=metadata),
        stub.ForkSession(pb.ForkSessionRequest(session_id=NOBODY), metadata=metadata),
        stub.Feed(pb.FeedRequest(session_id=NOBODY, text="the"), metadata=metadata),
        stub.Stream(iter([pb.StreamRequest(text="the")]), metadata=metadata).read(),
        stub.Generate(pb.GenerateRequest(max_tokens=3), metadata=metadata).read(),
        stub.Tokenize(pb.TokenizeRequest(text="the"), metadata=metadata),
    ]
    for call in calls:
        code, message = await code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and words in message
        assert KEY_A not in message and KEY_A[:-1] not in message
    assert len(memory_sessions(running)) == 0


async def test_health_and_reflection_need_no_key_and_a_key_works(keyed: tuple[RunningServer, grpc.aio.Channel]) -> None:
    _, channel = keyed
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    assert "lstmd.v1.Lstmd" in {s.name for s in (await call.read()).list_services_response.service}
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",  # the same messages as v1alpha
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    reply = await v1.read()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
    assert "lstmd.v1.Lstmd" in {s.name for s in reply.list_services_response.service}
    for key in (KEY_A, KEY_B, KEY_C):
        assert len((await As(channel, key).ListModels(pb.ListModelsRequest())).models) == 2
        assert [t.word for t in (await As(channel, key).Tokenize(pb.TokenizeRequest(text="the cat"))).tokens] == [
            "the",
            "cat",
        ]


async def test_keyless_services_setting_can_put_health_behind_a_key(make_server: ServerFactory) -> None:
    async with make_server(api_keys=KEYS, keyless_services="reflection") as (running, _), open_channel(running) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        code, _ = await code_of(health.Check(health_pb2.HealthCheckRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=(("authorization", f"Bearer {KEY_B}"),))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_another_key_sees_not_found_and_changes_nothing(
    keyed: tuple[RunningServer, grpc.aio.Channel], reference: Reference
) -> None:
    running, channel = keyed
    alice, bob = As(channel, KEY_A), As(channel, KEY_B)
    session = await alice.CreateSession(pb.CreateSessionRequest())
    sid = session.session_id
    await alice.Feed(pb.FeedRequest(session_id=sid, text="the cat", expected_position=0))
    before = await alice.GetSession(pb.GetSessionRequest(session_id=sid))
    count = len(memory_sessions(running))
    _, missing = await code_of(bob.GetSession(pb.GetSessionRequest(session_id=NOBODY)))

    attempts = {
        "GetSession": bob.GetSession(pb.GetSessionRequest(session_id=sid)),
        "DeleteSession": bob.DeleteSession(pb.DeleteSessionRequest(session_id=sid)),
        "ForkSession": bob.ForkSession(pb.ForkSessionRequest(session_id=sid)),
        "Feed": bob.Feed(pb.FeedRequest(session_id=sid, text="the dog")),
        "Feed replay": bob.Feed(pb.FeedRequest(session_id=sid, text="the cat", expected_position=0)),
        "Stream": bob.Stream(iter([pb.StreamRequest(session_id=sid, text="the dog")])).read(),
        "Generate": bob.Generate(pb.GenerateRequest(session_id=sid, max_tokens=3)).read(),
    }
    for name, call in attempts.items():
        code, message = await code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND, name
        assert message.replace(sid, NOBODY) == missing, f"{name}: the message must not tell a foreign session apart"

    assert await alice.GetSession(pb.GetSessionRequest(session_id=sid)) == before  # position, last use: untouched
    assert len(memory_sessions(running)) == count, "no fork, no ephemeral session left behind"
    after = await alice.Feed(pb.FeedRequest(session_id=sid, text="sat", expected_position=2))
    assert after.position == 3 and not after.replayed
    assert_matches(after, reference.logprobs(reference.ids("the cat sat")))


async def test_concurrent_calls_of_different_keys_each_get_their_own_identity(
    keyed: tuple[RunningServer, grpc.aio.Channel],
) -> None:
    _, channel = keyed
    callers = [As(channel, key) for key in (KEY_A, KEY_B, KEY_C)] * 8
    created = await asyncio.gather(*(c.CreateSession(pb.CreateSessionRequest()) for c in callers))
    owners = await asyncio.gather(*(c.GetSession(pb.GetSessionRequest(session_id=s.session_id))
                                    for c, s in zip(callers, created, strict=True)))  # fmt: skip
    assert [o.session_id for o in owners] == [s.session_id for s in created]
    for i, session in enumerate(created):
        other = callers[(i + 1) % len(callers)]
        code, _ = await code_of(other.GetSession(pb.GetSessionRequest(session_id=session.session_id)))
        assert code == grpc.StatusCode.NOT_FOUND


async def test_per_key_quota_is_resource_exhausted_for_every_way_to_make_a_session(make_server: ServerFactory) -> None:
    async with make_server(api_keys=KEYS, max_sessions_per_key=2) as (running, _), open_channel(running) as channel:
        alice, bob = As(channel, KEY_A), As(channel, KEY_B)
        first = await alice.CreateSession(pb.CreateSessionRequest())
        await alice.ForkSession(pb.ForkSessionRequest(session_id=first.session_id))
        refused = {
            "CreateSession": alice.CreateSession(pb.CreateSessionRequest()),
            "ForkSession": alice.ForkSession(pb.ForkSessionRequest(session_id=first.session_id)),
            "Stream": alice.Stream(iter([pb.StreamRequest(text="the")])).read(),
            "Generate": alice.Generate(pb.GenerateRequest(prompt="the", max_tokens=2)).read(),
        }
        for name, call in refused.items():
            code, message = await code_of(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, name
            assert "API key 'alice' holds its maximum of 2 sessions" in message
            assert "delete sessions" in message and "--max-sessions-per-key" in message
        assert len(memory_sessions(running)) == 2
        # another key is not held back, and a deleted session frees its place
        assert len([r async for r in bob.Stream(iter([pb.StreamRequest(text="the")]))]) == 1
        for _ in range(2):
            await bob.CreateSession(pb.CreateSessionRequest())
        await alice.DeleteSession(pb.DeleteSessionRequest(session_id=first.session_id))
        await alice.CreateSession(pb.CreateSessionRequest())


async def test_keys_never_reach_logs_or_metrics(
    keyed: tuple[RunningServer, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    running, channel = keyed
    caplog.set_level(logging.DEBUG)
    wrong = KEY_A[:-1] + "x"
    alice = As(channel, KEY_A)
    session = await alice.CreateSession(pb.CreateSessionRequest())
    await alice.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat"))
    await code_of(alice.Feed(pb.FeedRequest(session_id=session.session_id, text="")))  # logged INVALID_ARGUMENT
    await code_of(As(channel, KEY_B).GetSession(pb.GetSessionRequest(session_id=session.session_id)))  # NOT_FOUND
    await code_of(As(channel, wrong).ListModels(pb.ListModelsRequest()))
    await code_of(As(channel, None).CreateSession(pb.CreateSessionRequest()))
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5) as reply:
        scraped = reply.read().decode()
    assert "ListModels refused for" in caplog.text and "the API key is not valid" in caplog.text  # not vacuous
    assert 'grpc_code="UNAUTHENTICATED"' in scraped
    for secret in (KEY_A, KEY_B, KEY_C, wrong):
        assert secret not in caplog.text and secret not in scraped


# the client library and the command line, against a server process with mutual TLS and keys


@pytest.fixture(scope="module")
def secure_target(models_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# name:key\nalice:{KEY_A}\nbob:{KEY_B}\n")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in tls_settings(pki, mutual=True).items()]
    process, port = start_process(models_dir, *flags, "--api-keys-file", str(keys), "--log-level", "debug")
    yield f"127.0.0.1:{port}"
    process.terminate()
    assert process.stderr is not None
    with process.stderr:  # read the rest here: communicate() would skip what start_process read ahead
        log = process.stderr.read()
    process.wait(timeout=30)
    assert "TLS on, client certificates required; API keys on: 2 (alice, bob)" in log
    assert KEY_A not in log and KEY_B not in log, "an API key reached the server's log"


def test_sync_client_with_mutual_tls_and_a_key(secure_target: str, pki: Pki) -> None:
    tls: dict[str, Any] = {"root_certificates": pki.read("ca.pem"), "certificate_chain": pki.read("client.pem"),
           "private_key": pki.read("client.key")}  # fmt: skip
    alice, bob = Client(secure_target, api_key=KEY_A, **tls), Client(secure_target, api_key=KEY_B, **tls)
    with alice, bob, alice.create_session() as session:
        assert session.feed("the cat").position == 2
        assert [r.position for r in alice.stream(["sat"], session_id=session.id)] == [3]
        with alice.open_stream(session.id) as stream:
            assert stream.feed("on").position == 4
        assert session.refresh().position == 4
        assert [t.position for t in session.generate(max_tokens=2, seed=1)] == [5, 6]
        with pytest.raises(client.NotFound):
            bob.get_session(session.id)
    with Client(secure_target, retries=0, **tls) as nobody, pytest.raises(client.Unauthenticated, match="API key"):
        nobody.list_models()
    no_cert = Client(secure_target, api_key=KEY_A, root_certificates=pki.read("ca.pem"), retries=0, timeout=5)
    with no_cert, pytest.raises(client.Unavailable):
        no_cert.list_models()


def test_cli_takes_tls_files_and_the_key_from_flag_or_environment(secure_target: str, pki: Pki) -> None:
    tls = ["--target", secure_target, "--tls-ca-file", pki.path("ca.pem"), "--tls-cert-file",
           pki.path("client.pem"), "--tls-key-file", pki.path("client.key")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "LSTMD_API_KEY"}
    assert lstmd("health", *tls).stdout.strip().endswith("SERVING")  # health needs no key
    refused = _lstmd_env(env, "models", *tls)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "--api-key" in refused.stderr
    assert "tiny" in _lstmd_env(env, "models", *tls, "--api-key", KEY_A).stdout
    assert "tiny" in _lstmd_env({**env, "LSTMD_API_KEY": KEY_B}, "models", *tls).stdout
    no_tls = _lstmd_env({**env, "LSTMD_API_KEY": KEY_B}, "models", "--target", secure_target, "--timeout", "5")
    assert no_tls.returncode == 1 and "UNAVAILABLE" in no_tls.stderr


def _lstmd_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LSTMD, *args], capture_output=True, text=True, timeout=120, env=env)


async def test_the_health_port_answers_plaintext_probes_of_a_mutual_tls_server_and_nothing_else(
    make_server: ServerFactory, pki: Pki
) -> None:
    """A container or kubelet probe speaks neither TLS nor client certificates: --health-port serves
    the health service alone, in plaintext, with the main server's status (NOT_SERVING at shutdown)."""
    async with make_server(**tls_settings(pki, mutual=True), api_keys=KEYS, health_port=0) as (running, _):
        assert running.health_only is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_only[1]}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            for service in ("", "lstmd.v1.Lstmd"):
                reply = await probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await lstmd_pb2_grpc.LstmdStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as main:  # the main port: TLS only
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_pb2_grpc.HealthStub(main).Check(health_pb2.HealthCheckRequest(), timeout=2)
            await running.health.enter_graceful_shutdown()
            reply = await probe.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
