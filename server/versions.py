"""New model versions while sessions live: reloading the models folder, draining the versions no
longer served, and unloading them.

A reload (SIGHUP, the admin call ReloadModels, or the poll every ``models_poll_s``) chooses each
model's version again (its pin, else its newest folder) and loads the new ones in a thread, so the
event loop keeps serving. All or nothing: a folder that cannot be served fails the whole reload
(FAILED_PRECONDITION naming it; on SIGHUP or the poll an ERROR log line) and nothing changes. A
version that stops being served drains: new sessions go to the served one, its own sessions (and
their forks) stay on it. Every CHECK_S it unloads when it holds no session, or, at its deadline
(``version_drain_s`` after it stopped being served), its sessions no call is using end ("unloaded")
and any in use end as soon as their call or stream ends (with Redis: all at once); then it
unloads, freeing its batcher and its ONNX Runtime session. With a shared store each replica
announces every CHECK_S the versions it serves, and a deadline ends a version's sessions only once
no other replica serves it (a canary reloaded alone must not end the sessions the others still
create on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lstmd.server import metrics
from lstmd.server.engine import Engine
from lstmd.server.errors import FailedPrecondition, InvalidInput, PermissionDenied, StoreUnavailable, echo
from lstmd.server.registry import Model, ModelError, choose, load_model, version_folders, version_order
from lstmd.server.settings import Settings

log = logging.getLogger(__name__)
CHECK_S = 1.0  # how often draining versions are checked (and their session counts published)
# How long a replica's announcement that it serves a version lasts: a few rounds (announced every CHECK_S
# by a task of its own, which no reload holds up); a replica that stops serving a version, or stops,
# removes its announcement.
ANNOUNCE_S = 5 * CHECK_S


@dataclass(frozen=True)
class Reloaded:
    """What a reload did, each as "name/version"."""

    loaded: list[str]
    draining: list[str]


@dataclass(frozen=True)
class VersionInfo:
    """A loaded version as ListModels shows it."""

    model: Model
    is_default: bool
    sessions: int
    serving: bool
    unload_at: float | None  # draining: when it unloads (None: no deadline)


class Versions:
    """The loaded versions of an Engine's registry, changed only here. ``admins``: the API key ids
    that may reload (None: keys are off, and every caller may)."""

    def __init__(self, settings: Settings, engine: Engine, admins: frozenset[str] | None):
        self.settings = settings
        self.engine = engine
        self.registry = engine.registry
        self.admins = admins
        self._changing = asyncio.Lock()  # one reload or check at a time: neither sees the other half done
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[None]] = set()  # reload_soon's, referenced until done
        self._counts: dict[tuple[str, str], int] = {}  # each version's sessions, as the store last said
        self._held_loaded = False  # the versions a shared store's sessions are on: loaded, or asked again each round
        self._kept_for_others: set[Model] = set()  # past their deadline, kept by other replicas serving them (warned)
        self._reload_number: int | None = None  # the newest ReloadModels of the fleet this replica followed or made
        self._fleet = asyncio.Lock()  # a ReloadModels made here and one followed never interleave

    async def start(self) -> None:
        try:
            await self._load_held()
        except StoreUnavailable as e:
            log.warning("cannot learn which model versions the sessions in the store are on: %s; asking again "
                        "every %g s, and until then a session on an older version answers UNAVAILABLE here", e,
                        CHECK_S)  # fmt: skip
        with contextlib.suppress(StoreUnavailable):  # else the first look of the check loop
            self._reload_number, _, _ = await self.engine.store.last_reload()
        for model in self.registry.loaded():
            self.publish(model)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._check_forever(), name="model-versions"),
                       loop.create_task(self._announce_forever(), name="model-versions-announce")]  # fmt: skip

    async def stop(self) -> None:
        """Stop the checks and any reload still running (none may add a version to a stopped engine),
        and take this replica's announcements back: it serves nothing now."""
        tasks = [*self._reloads, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(StoreUnavailable):
            await self.engine.store.announce([], self.registry.loaded(), 0)

    async def admin_reload(self, pins: dict[str, str]) -> Reloaded:
        """ReloadModels: reload here, then tell the replicas sharing the session store, which follow
        within a check round or two, with the same pins (server.redis_store: ``lstmd:reload``)."""
        async with self._fleet:
            done = await self.reload(pins)
            try:
                self._reload_number = await self.engine.store.publish_reload(self.registry.pins)
            except StoreUnavailable as e:
                log.warning("reloaded here, but the other replicas were not told (%s): reload each of them", e)
            return done

    async def _follow_reloads(self) -> None:
        """Reload as the newest ReloadModels on another replica did, with its pins exactly. Not followed:
        one made before this replica started (the first look: it chose its versions at start), one
        made here, and none at all (0: Redis lost its data). Any other change of the number is a new
        one, also after Redis restarted without its data. Never at once with admin_reload."""
        async with self._fleet:
            number, pins, mine = await self.engine.store.last_reload()
            seen, self._reload_number = self._reload_number, number
            if seen is None or number in (0, seen) or mine:
                return
            try:
                done = await self.reload(dict.fromkeys(self.registry.pins, "") | pins)
            except (FailedPrecondition, InvalidInput) as e:
                log.error("could not follow another replica's reload (ReloadModels %d): %s", number, e)
                return
        log.info("followed another replica's reload (ReloadModels %d): loaded %s; draining %s", number,
                 ", ".join(done.loaded) or "nothing", ", ".join(done.draining) or "nothing")  # fmt: skip

    def reload_soon(self, why: str) -> None:
        """``reload_logged`` in a task of its own (a signal handler cannot wait for it)."""
        task = asyncio.get_running_loop().create_task(self.reload_logged(why))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def allow(self, caller: str) -> None:
        """PermissionDenied unless ``caller`` may make admin calls."""
        if self.admins is not None and caller not in self.admins:
            raise PermissionDenied(f"API key {caller!r} may not make admin calls (ReloadModels): name it in "
                                   "LSTMD_ADMIN_KEYS (--admin-keys)")  # fmt: skip

    async def reload(self, pins: dict[str, str] | None = None) -> Reloaded:
        """Choose, load and serve each model's version; ``pins`` ("" unpins) change the operator's
        choice first (InvalidInput for a pin of a model or version the folder lacks). FailedPrecondition,
        with nothing changed, when a folder cannot be served."""
        async with self._changing:
            registry, root = self.registry, Path(self.settings.models_dir)
            for name, version in (pins or {}).items():
                _check_pin(root, name, version)
            wanted = {name: version for name, version in {**registry.pins, **(pins or {})}.items() if version}
            try:
                chosen = await asyncio.to_thread(choose, root, wanted)
                missing = [folder for folder in chosen.values() if self._loaded(folder) is None]
                new = await asyncio.to_thread(lambda: [load_model(folder, self.settings) for folder in missing])
            except ModelError as e:
                raise FailedPrecondition(f"{e}: nothing was reloaded; fix or remove that folder (or the pin) and "
                                         "reload again") from None  # fmt: skip
            registry.pins = wanted
            for model in new:
                self.engine.add_model(model)
                self.publish(model)
            by_folder = {m.folder: m for m in [*registry.loaded(), *new]}
            now, draining = time.time(), []
            for name, folder in chosen.items():
                served = by_folder[folder]
                old = registry.serve(served, self.settings.version_drain_s, now)
                if old is not None:
                    draining.append(f"{old.name}/{old.version}")
                    log.info("serving %s version %s; version %s drains (unloads when its last session ends, at "
                             "the latest in %g s)", name, served.version, old.version,
                             self.settings.version_drain_s)  # fmt: skip
            return Reloaded([f"{m.name}/{m.version}" for m in new], draining)

    async def reload_logged(self, why: str) -> None:
        """A reload nobody waits for (SIGHUP, the poll): a failure is an ERROR log line, and the server serves on."""
        try:
            done = await self.reload()
        except FailedPrecondition as e:
            log.error("reload of the models folder on %s failed: %s", why, e)
            return
        if done.loaded or done.draining:
            log.info("reload on %s: loaded %s; draining %s", why, ", ".join(done.loaded) or "nothing",
                     ", ".join(done.draining) or "nothing")  # fmt: skip

    def _loaded(self, folder: Path) -> Model | None:
        return next((m for m in self.registry.loaded() if m.folder == folder), None)

    def load_draining(self, name: str, version: str) -> Model | None:
        """At start, before serving: the draining version ``version`` of ``name`` loaded from its
        folder, for sessions a snapshot holds on it; None when the folder is gone or broken (logged)."""
        model = self._load_old(name, version)
        return self._drain(model) if model else None

    def _load_old(self, name: str, version: str) -> Model | None:
        """Version ``version`` of served model ``name`` from its folder, for sessions still on it; None
        when the folder is gone or broken (logged). Blocking."""
        folder = Path(self.settings.models_dir) / name / version
        unsafe = any("/" in part or part.startswith(".") for part in (name, version))  # a stored name, not a path
        if unsafe or not folder.is_dir() or name not in self.registry.models:
            return None
        try:
            return load_model(folder, self.settings)
        except ModelError as e:
            log.error("cannot load %s for the sessions still on it: %s", folder, e)
            return None

    def _drain(self, model: Model) -> Model:
        self.registry.draining[model] = time.time() + self.settings.version_drain_s
        self.engine.add_model(model)
        self.publish(model)
        return model

    async def _load_held(self) -> None:
        """With a shared store, load (draining) each older version that sessions there are still on, as
        a snapshot's are, so that a replica restarted after an upgrade serves them: at start, and each
        round until the store has answered once (StoreUnavailable until then). A newer one is left alone:
        draining it here would end, at its deadline, the sessions of replicas that serve it."""
        held = await self.engine.store.versions_held()
        async with self._changing:
            for name, version in sorted(held):
                served = self.registry.models.get(name)
                if served is None or self.registry.find(name, version) is not None:
                    continue
                older = version_order(version) < version_order(served.version)
                model = await asyncio.to_thread(self._load_old, name, version) if older else None
                if model:
                    self._drain(model)
                else:
                    log.warning("sessions in the store are on %s version %s, which this replica does not load (it "
                                "serves %s, and that folder is newer, gone or broken): they answer UNAVAILABLE "
                                "here", name, version, served.version)  # fmt: skip
            self._held_loaded = True

    async def check(self) -> None:
        """Unload the draining versions whose sessions have all ended, ending those of a version past
        its deadline first unless another replica still serves it; publish every version's session count."""
        async with self._changing:
            now, store = time.time(), self.engine.store
            for model, deadline in list(self.registry.draining.items()):
                if deadline is not None and now >= deadline and not await self._served_elsewhere(model):
                    left = await store.end_version(model, now)
                else:
                    left = await store.count(model)
                if not left:
                    await self._unload(model)
            for info in await self.infos():
                metrics.model_sessions.labels(info.model.name, info.model.version).set(info.sessions)

    async def _served_elsewhere(self, model: Model) -> bool:
        """Whether another replica still serves ``model`` (draining here, past its deadline): then its
        sessions live on, and it unloads here once they have all ended. Warned once per version."""
        others = await self.engine.store.others_serving(model)
        if others and model not in self._kept_for_others:
            self._kept_for_others.add(model)
            log.warning("%s version %s is past its drain deadline here, but other replicas still serve it (%s): its "
                        "sessions are not ended while they do; reload them too", model.name, model.version,
                        ", ".join(others))  # fmt: skip
        return bool(others)

    def publish(self, model: Model) -> None:
        """``lstmd_model_info`` of a loaded version."""
        default = str(model.name == self.registry.default).lower()
        metrics.model_info.labels(model.name, model.version, model.card.precision, default).set(1)

    async def _unload(self, model: Model) -> None:
        # Forgotten in the same turn as the registry, so ListModels and a scrape never disagree; the
        # batcher holds its own series, so steps finishing while it stops bring none back.
        self.registry.unload(model)
        self._kept_for_others.discard(model)
        metrics.forget(model.name, model.version, model.card.precision, model.name == self.registry.default)
        await self.engine.remove_model(model)
        log.info("unloaded %s version %s: its sessions have ended", model.name, model.version)

    async def infos(self) -> list[VersionInfo]:
        """Every loaded version, by name, oldest first: the registry as of one moment, and the session
        counts asked together (one round trip to a shared store; while it is unreachable, the counts
        it gave last)."""
        registry = self.registry
        loaded = [(m, m.name == registry.default, registry.models[m.name] is m, registry.draining.get(m))
                  for m in registry.loaded()]  # fmt: skip
        try:
            counts = await asyncio.gather(*(self.engine.store.count(m) for m, *_ in loaded))
            self._counts = {(m.name, m.version): n for (m, *_), n in zip(loaded, counts, strict=True)}
        except StoreUnavailable:
            counts = [self._counts.get((m.name, m.version), 0) for m, *_ in loaded]
        return [VersionInfo(m, default, sessions, serving, deadline)
                for (m, default, serving, deadline), sessions in zip(loaded, counts, strict=True)]  # fmt: skip

    async def _announce_forever(self) -> None:
        """Tell a shared store's other replicas, every CHECK_S, which versions this one serves."""
        while True:
            try:
                await self.engine.store.announce(list(self.registry.models.values()), list(self.registry.draining),
                                                 ANNOUNCE_S)  # fmt: skip
            except StoreUnavailable:
                pass  # counted in lstmd_store_errors_total; the check loop logs the outage
            except Exception as e:  # a bug: logged, and the next round tries again
                log.exception("announcing the served model versions failed", exc_info=e)
            await asyncio.sleep(CHECK_S)

    async def _check_forever(self) -> None:
        poll_s, polled = self.settings.models_poll_s, time.monotonic()
        while True:
            try:
                if poll_s and time.monotonic() - polled >= poll_s:
                    polled = time.monotonic()
                    await self.reload_logged("the folder poll")
                if not self._held_loaded:
                    await self._load_held()
                await self._follow_reloads()
                await self.check()
            except StoreUnavailable as e:  # counted in lstmd_store_errors_total; the next round tries again
                log.warning("cannot count the sessions of the model versions: %s", e)
            except Exception as e:  # a bug: logged, and the next round tries again
                log.exception("checking the model versions failed", exc_info=e)
            await asyncio.sleep(CHECK_S if not poll_s else min(CHECK_S, poll_s))


def _check_pin(root: Path, name: str, version: str) -> None:
    """InvalidInput unless ``root`` holds model ``name`` and, unless unpinning (""), its ``version``."""
    if "/" in name or name.startswith(".") or not (root / name).is_dir():
        raise InvalidInput(f"cannot pin {echo(name)}: the models folder holds no model of that name")
    if version and (version.startswith(".") or "/" in version or not (root / name / version).is_dir()):
        versions = ", ".join(p.name for p in version_folders(root, name))
        raise InvalidInput(f"cannot pin {name} to version {echo(version)}: the models folder's {name}/ holds no "
                           f"such folder (it holds {versions})")  # fmt: skip
