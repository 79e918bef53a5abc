"""The device's transactions: recovery, switch, confirm, revert. All under the state-dir lock.

This is the thin, IO-doing shell around the journal's state machine (``_journal``): every
method advances the journal durably *before* the side effect it announces, and each side
effect is idempotent, so a crash at any instant is finished or undone by :meth:`recover`.

Invariant kept by every method: if a model had a committed slot before, ``current`` points at
a good slot afterwards (the new one on success or during its health window, the previous one
after a revert).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import filelock

from ota.bundle import Release
from ota.errors import ConflictError, LocalError

from . import _slots
from ._events import EventQueue
from ._journal import Journal, JournalState, Phase, Txn
from ._policy import content_counter
from ._state import DeviceConfig, StateDir


class Device:
    """One state directory, opened. Use :meth:`locked` around anything that writes."""

    def __init__(self, state_dir: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.sd = StateDir(state_dir)
        self.cfg: DeviceConfig = self.sd.load_config()
        self.journal = Journal(self.sd.journal_path)
        self.events = EventQueue(self.sd.events_path, clock=clock)
        self.clock = clock

    def mdir(self, name: str) -> Path:
        return _slots.model_dir(self.sd.root, name)

    @contextmanager
    def locked(self, timeout: float = 0.0) -> Iterator[None]:
        """Hold the state directory's lock (one updater per state dir, as python-tuf needs).

        Raises:
            ConflictError: another process holds the lock past ``timeout`` seconds.
        """
        lock = filelock.FileLock(str(self.sd.lock_path), timeout=timeout)
        try:
            lock.acquire()
        except filelock.Timeout as e:
            raise ConflictError(f"another updater holds {self.sd.lock_path}",
                                remedy="wait for it to finish") from e
        try:
            yield
        finally:
            lock.release()

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> JournalState:
        """Finish or undo whatever a killed process left in the journal. Idempotent.

        staging/staged: the attempt is abandoned (its chunks stay for reuse) and counted;
        a release that needed more than ``max_attempts`` recoveries is marked failed.
        switching: the slot was verified and smoke-tested, so the switch is completed and
        the health window starts again. reverting: the revert is completed. trial: if the
        confirmation was already persisted, the journal is closed. Every recovery of an
        interrupted transaction is recorded as a ``resumed`` event naming the phase.
        """
        st = self.journal.load()
        txn = st.txn
        if st.phase is Phase.IDLE or txn is None:
            return st
        if st.phase in (Phase.STAGING, Phase.STAGED):
            self._count_attempt(txn)
            self.events.append("resumed", txn.name, txn.version, phase=st.phase.value)
            st = self.journal.advance(Phase.IDLE)
        elif st.phase is Phase.SWITCHING:
            self.events.append("resumed", txn.name, txn.version, phase=st.phase.value)
            if _slots.read_manifest(self.mdir(txn.name), txn.slot) is None:
                st = self.revert_txn(txn, "slot not good at switch")
            else:
                st = self.finish_switch(txn)
        elif st.phase is Phase.REVERTING:
            self.events.append("resumed", txn.name, txn.version, phase=st.phase.value)
            st = self.revert_txn(txn, txn.reason or "interrupted revert")
        elif self._already_confirmed(txn):
            # confirmed, journal not yet closed: the kill may have lost the event
            self.events.append("resumed", txn.name, txn.version, phase=st.phase.value)
            self.events.append("confirmed", txn.name, txn.version, by="recovery")
            st = self.journal.advance(Phase.IDLE)
        return st

    def _already_confirmed(self, txn: Txn) -> bool:
        m = self.sd.load_state().models.get(txn.name)
        return m is not None and m.counter >= txn.counter and m.version == txn.version

    def _count_attempt(self, txn: Txn) -> None:
        state = self.sd.load_state()
        key = f"{txn.name}@{txn.version}"
        n = state.attempts.get(key, 0) + 1
        if n >= self.cfg.max_attempts:
            # the event first: a kill between the two would otherwise lose it for good (the
            # next recovery finds the release failed and its count reset)
            self.events.append("failed", txn.name, txn.version,
                               reason=f"interrupted {n} times; not retried")
            self.sd.save_state(state.with_failed(txn.name, txn.version))
        else:
            self.sd.save_state(replace(state, attempts={**state.attempts, key: n}))

    # -- switch, trial, confirm, revert ------------------------------------------------

    def begin_switch(self, txn: Txn) -> JournalState:
        self.journal.advance(Phase.SWITCHING, txn)
        return self.finish_switch(txn)

    def finish_switch(self, txn: Txn) -> JournalState:
        mdir = self.mdir(txn.name)
        if _slots.current_slot(mdir) != txn.slot:
            _slots.switch(mdir, txn.slot)
        deadline = self.clock() + self.cfg.health_timeout_s
        # Event and app hook before the journal leaves ``switching``: a kill in between makes
        # recovery repeat them (at least once) instead of losing them (the app not reloaded).
        self.events.append("committed", txn.name, txn.version, slot=txn.slot,
                           previous_slot=txn.previous, health_deadline=deadline)
        self.run_hook("committed", txn.name)
        return self.journal.advance(Phase.TRIAL, replace(txn, deadline=deadline))

    def confirm_txn(self, txn: Txn, how: str) -> JournalState:
        """Persist the release as committed (counter, floor), then close the journal."""
        release = _slots.read_release(self.mdir(txn.name), txn.slot)
        floor = release.security_floor if release else 0
        state = self.sd.load_state()
        self.sd.save_state(state.with_confirmed(txn.name, txn.version, txn.counter, floor))
        self.events.append("confirmed", txn.name, txn.version, by=how)  # before the journal
        return self.journal.advance(Phase.IDLE)  # closes: a kill before it is recovered

    def revert_txn(self, txn: Txn, reason: str) -> JournalState:
        """Go back to ``txn.previous`` (or to nothing on a first install) and remember
        ``txn``'s release as failed. Idempotent."""
        st = self.journal.load()
        if st.phase is not Phase.REVERTING:
            self.journal.advance(Phase.REVERTING, replace(txn, reason=reason))
        self.sd.save_state(self.sd.load_state().with_failed(txn.name, txn.version))
        mdir = self.mdir(txn.name)
        prev = txn.previous
        if prev is not None and _slots.read_manifest(mdir, prev) is not None:
            if _slots.current_slot(mdir) != prev:
                _slots.switch(mdir, prev)
        elif _slots.current_slot(mdir) == txn.slot:
            _slots.clear_current(mdir)
        # Event and app hook while the journal still says ``reverting``: a kill before the
        # journal is closed repeats them on recovery rather than losing them.
        self.events.append("reverted", txn.name, txn.version, reason=reason, to_slot=prev)
        self.run_hook("reverted", txn.name)
        return self.journal.advance(Phase.IDLE)

    def revert_target(self, name: str, *, yanked: Callable[[str], bool] | None = None,
                      floor: int = 0) -> tuple[str, Release, str] | None:
        """``(current slot, its release, inactive slot)`` when the inactive slot holds the
        release committed before the current one, i.e. going there is a revert. None when
        nothing is current, or the inactive slot holds no release, one that failed here
        (reverted, smoke failed), one newer than the current release (staged after it and
        abandoned, so never committed: switching would install it untested), one below the
        security floor (``floor``, e.g. the signed index's, or the one this device has
        committed: a revert is never a downgrade past it), or one ``yanked`` says is yanked."""
        mdir = self.mdir(name)
        cur = _slots.current_slot(mdir)
        cur_rel = _slots.read_release(mdir, cur) if cur else None
        prev = _slots.other(cur)
        prev_rel = _slots.read_release(mdir, prev)
        if cur is None or cur_rel is None or prev_rel is None:
            return None
        if prev_rel.counter >= cur_rel.counter:
            return None
        state = self.sd.load_state()
        if (name, prev_rel.version) in state.failed:
            return None
        floor = max(floor, state.floor(name), cur_rel.security_floor)
        if content_counter(prev_rel) < floor:  # a rollback is judged by what it carries
            return None
        if yanked is not None and yanked(prev_rel.version):
            return None
        return cur, cur_rel, prev

    def check_trial(self) -> tuple[str, Txn] | None:
        """Decide an open health window: run the health command, or revert on timeout.

        Returns ``("confirmed"|"reverted"|"pending", txn)`` or None when no trial is open.
        """
        st = self.journal.load()
        if st.phase is not Phase.TRIAL or st.txn is None:
            return None
        txn = st.txn
        if self.cfg.health_cmd:
            ok, detail = self.run_health(txn.name)
            if ok:
                self.confirm_txn(txn, "health-cmd")
                return "confirmed", txn
            self.revert_txn(txn, f"health check failed: {detail}")
            return "reverted", txn
        if self.cfg.health_timeout_s == 0:
            self.confirm_txn(txn, "auto")
            return "confirmed", txn
        if txn.deadline is not None and self.clock() >= txn.deadline:
            self.revert_txn(txn, "health window expired without confirmation")
            return "reverted", txn
        return "pending", txn

    # -- app hooks ---------------------------------------------------------------------

    def _env(self, name: str, event: str) -> dict[str, str]:
        env = dict(os.environ)
        env["OTA_STATE_DIR"] = str(self.sd.root)
        env["OTA_MODEL_NAME"] = name
        env["OTA_EVENT"] = event
        try:
            env["OTA_MODEL_PATH"] = str(_slots.current_model(self.sd.root, name))
        except LocalError:
            env["OTA_MODEL_PATH"] = ""
        return env

    def run_health(self, name: str) -> tuple[bool, str]:
        """Run ``health_cmd`` with a timeout of the health window. (ok, detail)."""
        timeout = self.cfg.health_timeout_s or 60.0
        try:
            proc = subprocess.run(list(self.cfg.health_cmd), env=self._env(name, "health"),
                                  capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        return proc.returncode == 0, f"exit {proc.returncode}"

    def run_hook(self, event: str, name: str) -> None:
        """Run ``hook_cmd`` after a switch or revert; its failure is recorded, not fatal."""
        if not self.cfg.hook_cmd:
            return
        try:
            subprocess.run(list(self.cfg.hook_cmd), env=self._env(name, event),
                           capture_output=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            self.events.append("failed", name, "", reason=f"hook failed: {e}")
