"""Public device API: init, one update cycle, status, confirm, revert.

Every function that writes takes the state directory's file lock and first lets
:meth:`Device.recover` finish or undo what a killed process left, so a kill at any instant
resumes or reverts on the next call. Outcomes of a cycle are returned as an
:class:`UpdateResult` (with the exit code the CLI should use); only misuse (an uninitialised
state dir, a held lock) raises.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import filelock

from ota._atomic import write_bytes
from ota.bundle import DEFAULT_LIMITS, Limits
from ota.errors import (
    ConfigError,
    ConflictError,
    ExitCode,
    InputError,
    OtaError,
    SecurityError,
    SmokeError,
    TransientError,
)

from . import _slots
from ._device import Device
from ._fetch import FetchConfig, FetchStats, SlowRetrievalError, make_pool
from ._install import (
    Choice,
    FloorProof,
    Progress,
    SmokeRunner,
    Verifier,
    choose,
    default_smoke,
    default_verifier,
    install,
)
from ._journal import Phase, Txn
from ._policy import ROLLOUT_KINDS, Skip, nothing_status
from ._report import ReportOutcome, flush_events
from ._state import DeviceConfig, StateDir
from ._tuf import TufSession

# Worst first: the exit code of a multi-model cycle is that of its worst outcome.
_SEVERITY = ["security", "smoke_failed", "reverted", "local_error", "transient", "conflict",
             "no_such_model", "kept_yanked", "reverted_locally", "pending_confirmation",
             "yank_reverted", "updated", "confirmed", "not_in_rollout", "up_to_date"]
_EXIT = {
    "no_such_model": ExitCode.NO_SUCH_MODEL, "not_in_rollout": ExitCode.NOT_IN_ROLLOUT,
    "kept_yanked": ExitCode.KEPT_YANKED, "reverted_locally": ExitCode.REVERTED_LOCALLY,
    "security": ExitCode.SECURITY, "smoke_failed": ExitCode.SMOKE_FAILED,
    "reverted": ExitCode.SMOKE_FAILED, "local_error": ExitCode.LOCAL,
    "transient": ExitCode.TRANSIENT, "conflict": ExitCode.CONFLICT,
    "pending_confirmation": ExitCode.OK, "yank_reverted": ExitCode.OK,
    "updated": ExitCode.OK, "confirmed": ExitCode.OK,
    "up_to_date": ExitCode.UP_TO_DATE,
}


@dataclass(frozen=True)
class ModelOutcome:
    """What one cycle did for one model. ``status`` is one of the keys of the exit table:
    up_to_date, updated (confirmed in this cycle), pending_confirmation (health window open),
    confirmed, reverted (health check failed or window expired), yank_reverted (the current
    release was yanked: back on the previous slot), smoke_failed, security, transient,
    local_error, conflict; and when nothing was installed for a reason other than being up to
    date: no_such_model (the repository has no such model), not_in_rollout (a newer release
    exists but its ring, percentage or pause leaves this device out), kept_yanked (the current
    release is yanked and nothing safe is left to revert to), reverted_locally (the device runs
    an older slot than its committed release, after ``ota device revert``)."""

    model: str
    status: str
    version: str | None = None
    reason: str = ""
    remedy: str = ""
    skipped: tuple[dict[str, Any], ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "status": self.status, "version": self.version,
                "reason": self.reason, "remedy": self.remedy, "skipped": list(self.skipped),
                "figures": self.figures}


@dataclass(frozen=True)
class UpdateResult:
    outcomes: tuple[ModelOutcome, ...]
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    report: ReportOutcome | None = None  # events forwarded after the cycle, if configured

    @property
    def status(self) -> str:
        return min((o.status for o in self.outcomes), key=_SEVERITY.index, default="up_to_date")

    @property
    def exit_code(self) -> ExitCode:
        return _EXIT[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": int(self.exit_code),
                "models": [o.to_dict() for o in self.outcomes], "requests": self.requests,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "report": self.report.to_dict() if self.report else None}


_INIT_LOCK_WAIT_S = 30.0
_REPORT_LOCK_WAIT_S = 5.0  # a reporter reads or acks the queue; it never holds the lock long


def init_device(state_dir: Path | str, repo_url: str, root: bytes, device_id: str,
                models: list[str] | tuple[str, ...], *,
                floors: Mapping[str, int] | None = None, **options: Any) -> DeviceConfig:
    """Initialise a state directory: device facts, repository URL, trusted root.

    ``options`` are :class:`DeviceConfig` fields (ring, tier, arch, runtime_version,
    providers, health_timeout_s, health_cmd, hook_cmd, max_attempts). Re-running init on an
    initialised directory updates the config but keeps committed state and slots.
    ``floors`` (model -> release counter) provisions security floors, like the trusted root,
    from a source the device trusts: a device that has never polled cannot learn a floor that
    an attacker holding the online keys hides. Kept floors only ever rise.

    Raises:
        ConfigError: a bad option or a root that python-tuf rejects.
        InputError: an unknown option, or a floor for a model not followed or out of range.
    """
    for m, f in (floors or {}).items():
        if m not in models or isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= 2**53:
            raise InputError(f"bad security floor {m}={f!r}",
                             remedy="give MODEL=COUNTER for a model this device follows")
    if isinstance(options.get("report_url"), str):
        options["report_url"] = options["report_url"].rstrip("/")
    try:
        cfg = DeviceConfig(device_id=device_id, repo_url=repo_url.rstrip("/"),
                           models=tuple(models), **options).validate()
    except TypeError as e:
        raise InputError(f"unknown device option: {e}") from e
    sd = StateDir(state_dir)
    _check_root(root, sd.root)
    sd.root.mkdir(parents=True, exist_ok=True)
    # Re-init of a live device: wait (bounded) for a running updater rather than change its
    # config and trust anchor under it. The lock only; a corrupt config must stay fixable.
    try:
        with filelock.FileLock(str(sd.lock_path), timeout=_INIT_LOCK_WAIT_S):
            write_bytes(sd.root_path, root)
            sd.save_config(cfg)
            state = sd.load_state()
            raised = state
            for m, f in (floors or {}).items():
                raised = raised.with_floor(m, f)
            if raised is not state:
                sd.save_state(raised)
    except filelock.Timeout as e:
        raise ConflictError(f"an updater holds {sd.lock_path}",
                            remedy="retry when it has finished its cycle") from e
    return cfg


def _check_root(root: bytes, where: Path) -> None:
    """python-tuf decides: its Updater refuses a root that is not validly self-signed."""
    import tempfile

    from tuf.ngclient.updater import Updater

    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        try:
            Updater(tmp, "http://127.0.0.1:9/", bootstrap=root)
        except Exception as e:
            raise ConfigError(f"the trusted root is not a valid TUF root: {e}") from e


def update_once(state_dir: Path | str, *, model: str | None = None,
                verifier: Verifier = default_verifier, smoke: SmokeRunner = default_smoke,
                fetch_config: FetchConfig | None = None, limits: Limits = DEFAULT_LIMITS,
                clock: Callable[[], float] = time.time, report: bool = True,
                progress: Progress | None = None) -> UpdateResult:
    """One full update cycle (recover, health window, refresh, then each followed model),
    then, when the device has a report URL and ``report``, the queued events are forwarded
    to the fleet service (:mod:`ota.client._report`; its failure never fails the update).
    ``progress`` (model, version, bytes staged, bundle size) is called while a bundle stages.

    Raises:
        ConfigError: the state dir is not initialised; ``model`` is not followed.
        ConflictError: another updater holds the state dir's lock.
    """
    dev = Device(state_dir, clock=clock)
    names = dev.cfg.models if model is None else (model,)
    if model is not None and model not in dev.cfg.models:
        raise ConfigError(f"this device does not follow {model!r}")
    fcfg = fetch_config or FetchConfig()
    stats = FetchStats()
    t0 = time.monotonic()
    with dev.locked():
        outcomes = _cycle(dev, names, _Ctx(fcfg, stats, limits, verifier, smoke, progress))
    sent = _report(dev, fcfg) if report else None  # after the lock: see flush_events
    return UpdateResult(tuple(outcomes), stats.requests, stats.bytes, time.monotonic() - t0,
                        sent)


def _report(dev: Device, fcfg: FetchConfig) -> ReportOutcome:
    """Forward queued events with few retries: the update is done, the events keep."""
    try:
        return flush_events(dev, replace(fcfg, retries=min(fcfg.retries, 2)),
                            lock=lambda: dev.locked(timeout=_REPORT_LOCK_WAIT_S))
    except OtaError as e:  # a bad token file: the update itself stands
        return ReportOutcome("failed", pending=len(dev.events.pending()), error=str(e))


def report_events(state_dir: Path | str, *,
                  fetch_config: FetchConfig | None = None) -> ReportOutcome:
    """Forward the queued events now (``ota device report``).

    Raises:
        ConfigError: not initialised, no report URL, or an unreadable token.
        ConflictError: an updater holds the state dir's lock.
    """
    dev = Device(state_dir)
    if not dev.cfg.report_url:
        raise ConfigError("this device has no report URL",
                          remedy="run `ota device init ... --report-url URL`")
    return flush_events(dev, fetch_config,
                        lock=lambda: dev.locked(timeout=_REPORT_LOCK_WAIT_S))


@dataclass(frozen=True)
class _Ctx:
    fcfg: FetchConfig
    stats: FetchStats
    limits: Limits
    verifier: Verifier
    smoke: SmokeRunner
    progress: Progress | None = None


def _cycle(dev: Device, names: tuple[str, ...], ctx: _Ctx) -> list[ModelOutcome]:
    fcfg, stats, limits = ctx.fcfg, ctx.stats, ctx.limits
    try:
        dev.recover()
        trial = dev.check_trial()
    except OtaError as e:
        return [_failure(dev, "*", None, e)]
    if trial is not None:
        status, txn = trial
        st = {"pending": "pending_confirmation"}.get(status, status)
        return [ModelOutcome(txn.name, st, txn.version)]
    pool = make_pool(fcfg)
    try:
        session = TufSession(dev.sd.metadata_dir, dev.sd.cache_dir, dev.cfg.repo_url,
                             dev.sd.bootstrap_root(), pool=pool, fetch_cfg=fcfg, stats=stats,
                             limits=limits)
        session.refresh()
        _refuse_medium_metadata(dev)
    except OtaError as e:
        pool.clear()
        return [_failure(dev, "*", None, e)]
    outcomes = []
    for name in names:
        outcomes.append(_one(dev, session, name, pool, ctx))
        if outcomes[-1].status == "pending_confirmation":
            break  # one release on trial at a time
    pool.clear()
    return outcomes


_MEDIUM_FIELD = "x-ota-medium"  # ota.client._medium.MEDIUM_FIELD (ADR 0013)


def _refuse_medium_metadata(dev: Device) -> None:
    """After a network refresh: the timestamp python-tuf now trusts must not be an offline
    medium's. The repository never serves one (an export reserves the medium's versions and
    commits past them, ADR 0013), so one from the network is a medium's long-lived metadata
    replayed (or a medium folder served as a mirror, bypassing its tier and release list).

    Raises:
        SecurityError: it is a medium's (or unreadable right after python-tuf wrote it)."""
    try:
        doc = json.loads((dev.sd.metadata_dir / "timestamp.json").read_bytes())
        medium = _MEDIUM_FIELD in doc["signed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SecurityError(f"the trusted timestamp cannot be read back: {e}") from e
    if medium:
        raise SecurityError(
            "the network served an offline medium's metadata (a replay: the repository "
            "never serves it)",
            remedy="check the repository URL; update from a medium with `--from` only",
        )


def _one(dev: Device, session: TufSession, name: str, pool: Any, ctx: _Ctx) -> ModelOutcome:
    version = None
    try:
        proof = FloorProof(pool, dev.cfg.repo_url, ctx.fcfg, ctx.verifier, ctx.stats)
        chosen = choose(dev, session, name, proof)
        if not isinstance(chosen, Choice):
            if any(s.get("yank_reverted") for s in chosen):
                return ModelOutcome(name, "yank_reverted", chosen[0]["version"],
                                    chosen[0]["reason"])
            sec = [s for s in chosen if s.get("security")]
            if sec:
                return ModelOutcome(name, "security", sec[0]["version"], sec[0]["reason"],
                                    skipped=chosen)
            return _idle(dev, session, name, chosen)
        version = chosen.facts.release.version
        figures = install(dev, session, name, chosen, blob_base=dev.cfg.repo_url, pool=pool,
                          fetch_cfg=ctx.fcfg, limits=ctx.limits, verifier=ctx.verifier,
                          smoke=ctx.smoke, stats=ctx.stats, progress=ctx.progress)
        trial = dev.check_trial()
        status = "pending_confirmation"
        if trial is not None and trial[0] == "confirmed":
            status = "updated"
        elif trial is not None and trial[0] == "reverted":
            status = "reverted"
        return ModelOutcome(name, status, version, skipped=chosen.skipped, figures=figures)
    except OtaError as e:
        return _failure(dev, name, version, e)


def _idle(dev: Device, session: TufSession, name: str,
          skipped: tuple[dict[str, Any], ...]) -> ModelOutcome:
    """The outcome of a cycle that installs nothing for ``name``: the first that applies of
    no_such_model, kept_yanked, reverted_locally, not_in_rollout, else up_to_date."""
    if any(s.get("no_such_model") for s in skipped):
        return ModelOutcome(name, "no_such_model", None, skipped[0]["reason"],
                            "check the model name this device follows (`ota device init "
                            "--model`) against `ota releases`", skipped)
    kept = [s for s in skipped if s.get("kept_yanked")]
    if kept:
        return ModelOutcome(name, "kept_yanked", kept[0]["version"], kept[0]["reason"],
                            "publish a fixed release (or un-yank); the device keeps running "
                            "the yanked one until then", skipped)
    state = dev.sd.load_state()
    mdir = dev.mdir(name)
    cur = _slots.current_slot(mdir)
    cur_rel = _slots.read_release(mdir, cur) if cur else None
    cm = state.models.get(name)
    index = session.index(name)
    entry = index.get(cm.version) if index is not None and cm is not None else None
    if cm is not None and cur_rel is not None and cur_rel.version != cm.version and not (
        entry is not None and entry.yanked
    ):  # a yank revert follows the repository; an operator revert is this device's own
        return ModelOutcome(
            name, "reverted_locally", cur_rel.version,
            f"running {cur_rel.version}; the committed release {cm.version} was reverted here",
            f"`ota device forget-failure {name} {cm.version}` lets the next cycle reinstall "
            "it; a newer release is taken as usual", skipped)
    skips = [Skip(str(s.get("version")), str(s["reason"]), bool(s.get("security")),
                  str(s.get("kind", "")), int(s.get("counter", 0))) for s in skipped]
    status = nothing_status(skips, cm.counter if cm else 0)
    if status == "not_in_rollout":
        waiting = [s for s in skips if s.kind in ROLLOUT_KINDS]
        return ModelOutcome(name, status, waiting[0].version, waiting[0].reason, skipped=skipped)
    return ModelOutcome(name, "up_to_date", skipped=skipped)


def _failure(dev: Device, name: str, version: str | None, e: OtaError) -> ModelOutcome:
    if isinstance(e, SecurityError | SlowRetrievalError):
        dev.events.append("security", "" if name == "*" else name, version or "",
                          reason=str(e), error=type(e).__name__)
    if isinstance(e, SecurityError):
        status = "security"
    elif isinstance(e, SmokeError):
        status = "smoke_failed"
    elif isinstance(e, TransientError):
        status = "transient"
    elif isinstance(e, ConflictError):
        status = "conflict"
    else:
        status = "local_error"
    return ModelOutcome(name, status, version, str(e), e.remedy)


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    repo_url: str
    ring: str
    tier: str
    arch: str
    phase: str
    trial: dict[str, Any] | None
    models: dict[str, dict[str, Any]]
    failed: tuple[tuple[str, str], ...]
    pending_events: int
    dropped_events: int

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "repo_url": self.repo_url, "ring": self.ring,
                "tier": self.tier, "arch": self.arch, "phase": self.phase, "trial": self.trial,
                "models": self.models, "failed": [list(f) for f in self.failed],
                "pending_events": self.pending_events, "dropped_events": self.dropped_events}


def status(state_dir: Path | str) -> DeviceStatus:
    """Read-only snapshot of the device (no lock, no network).

    Raises:
        ConfigError: not an initialised state dir.
    """
    dev = Device(state_dir)
    st = dev.journal.load()
    committed = dev.sd.load_state()
    models: dict[str, dict[str, Any]] = {}
    for name in dev.cfg.models:
        mdir = dev.mdir(name)
        slot = _slots.current_slot(mdir)
        rel = _slots.read_release(mdir, slot) if slot else None
        cm = committed.models.get(name)
        path = None
        if rel is not None and slot is not None:
            path = str(_slots.slot_path(mdir, slot) / rel.model_path)
        models[name] = {"current_version": rel.version if rel else None,
                        "current_slot": slot, "model_path": path,
                        "committed_version": cm.version if cm else None,
                        "committed_counter": cm.counter if cm else 0,
                        "security_floor": committed.floor(name)}  # highest verified
    trial = None
    if st.txn is not None:
        trial = {"model": st.txn.name, "version": st.txn.version, "slot": st.txn.slot,
                 "deadline": st.txn.deadline}
    return DeviceStatus(dev.cfg.device_id, dev.cfg.repo_url, dev.cfg.ring, dev.cfg.tier,
                        dev.cfg.arch, st.phase.value, trial, models, committed.failed,
                        len(dev.events.pending()), dev.events.dropped)


def confirm(state_dir: Path | str, *, timeout: float = 30.0) -> ModelOutcome:
    """Confirm the release in its health window (the app says it works).

    Raises:
        InputError: no release is waiting for confirmation.
        ConflictError: the lock was not free within ``timeout`` seconds.
    """
    dev = Device(state_dir)
    with dev.locked(timeout):
        dev.recover()
        st = dev.journal.load()
        if st.phase is not Phase.TRIAL or st.txn is None:
            raise InputError("no release is waiting for confirmation")
        txn = st.txn
        dev.confirm_txn(txn, "app")
        return ModelOutcome(txn.name, "confirmed", txn.version)


def revert(state_dir: Path | str, *, model: str | None = None,
           timeout: float = 30.0) -> ModelOutcome:
    """Revert to the previous slot: the release on trial, or (operator action) the current one
    of ``model``. The abandoned release is remembered as failed and never retried.

    Raises:
        InputError: nothing to revert to (no good previous slot).
        ConflictError: the lock was not free within ``timeout`` seconds.
    """
    dev = Device(state_dir)
    with dev.locked(timeout):
        dev.recover()
        st = dev.journal.load()
        if st.phase is Phase.TRIAL and st.txn is not None:
            dev.revert_txn(st.txn, "operator revert during health window")
            return ModelOutcome(st.txn.name, "reverted", st.txn.version)
        name = model or (dev.cfg.models[0] if len(dev.cfg.models) == 1 else None)
        if name is None:
            raise InputError("name the model to revert")
        target = dev.revert_target(name)
        if target is None:
            raise InputError(f"{name} has no previous release to revert to")
        cur, rel, prev = target
        txn = Txn(name, rel.version, rel.counter, cur, prev, started=dev.clock())
        dev.revert_txn(txn, "operator revert")
        return ModelOutcome(name, "reverted", rel.version)


def forget_failure(state_dir: Path | str, name: str, version: str, *,
                   timeout: float = 30.0) -> ModelOutcome:
    """Operator action: let a release that failed or was abandoned here be retried. It clears
    the release from the failed list, its recovery attempts and its one-time notices; the
    next cycle may install it again if the policy allows (counter, floor, rollout). A release
    this device committed and then reverted is re-installed under its own counter.

    Raises:
        InputError: the release is not failed or abandoned on this device.
        ConflictError: the lock was not free within ``timeout`` seconds.
    """
    dev = Device(state_dir)
    with dev.locked(timeout):
        dev.recover()
        state = dev.sd.load_state()
        if (name, version) not in state.failed and f"{name}@{version}" not in state.attempts:
            raise InputError(f"{name} {version} has not failed on this device",
                             remedy="see `ota device status` for the failed releases")
        dev.sd.save_state(state.without_failure(name, version))
        dev.events.append("failure_forgotten", name, version, by="operator")
        return ModelOutcome(name, "failure_forgotten", version)
