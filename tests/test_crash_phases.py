"""SIGKILL at exact instants of the ``switching``, ``trial`` and ``reverting`` journal phases.

A child process runs one device operation (``update_once``, ``confirm`` or ``revert``) on a real
state directory against a real repository served over HTTP, with one seam wrapped in that child
only: ``Journal.advance`` or ``_slots.switch`` (the ``rename`` of ``current``) is replaced by a
wrapper that calls the real function and SIGKILLs its own process right before or right after
it, when the journal is in the named phase. The child must die of that SIGKILL (else the seam
was never reached and the test fails). The parent then checks the device as an app and the next
updater start see it: the model ``current_model()`` names re-hashes to its slot manifest and
runs in onnxruntime, the journal is consistent, the right version is current, the recovery is
in the events, the app hook was told, and a reverted release is remembered as failed.

Which version is right after a kill, and why:

* ``switching``: the release was verified (hashes, signature) and smoke-tested before the
  journal said ``switching``; a kill is a power cut, not a verdict on the release. So until the
  ``current`` rename the old model is served, from the rename on the new one, and the next start
  finishes the switch either way: the new release on trial in a fresh health window.
* ``trial``: the new release is served; the next start keeps waiting for confirmation until the
  deadline, and reverts to the old one if the deadline passed while the updater was dead.
* ``reverting``: the old release is the target: the next start finishes the revert, the
  reverted release is failed on this device and never installed or reverted to again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ota.bundle import Release
from ota.client import confirm, current_model, init_device, revert, status, update_once
from ota.client._journal import Journal, JournalState, Phase
from ota.errors import InputError
from tests.repo_helpers import serve_dir
from tests.test_updater import base  # noqa: F401 - the shared published world (1.0.0, 1.1.0)
from tests.updater_world import FAST, Base, current_version

WINDOW = 3600.0  # health window of the devices here: never expires by itself during a test
HOOK = ("sh", "-c", 'echo "$OTA_EVENT" >> "$OTA_STATE_DIR/hooks.log"')

# The child: wrap one seam, run one operation, die at the seam (exit 3 if it was never hit).
_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from ota.client import _slots, confirm, revert, update_once
from ota.client._fetch import FetchConfig
from ota.client._journal import Journal
from ota.client._state import StateDir

device, op, kind, phase, offset = sys.argv[1:6]
journal = Journal(Path(device) / "journal.json")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_advance = Journal.advance
def advance(self, to, txn=None):
    here = self.load().phase.value
    if kind == "before-close" and here == phase and to.value == "idle":
        die()
    if kind == "before-advance" and to.value == phase:
        die()
    state = real_advance(self, to, txn)
    if kind == "after-advance" and to.value == phase:
        die()
    if kind == "after-close" and here == phase and to.value == "idle":
        die()
    return state
Journal.advance = advance

real_save = StateDir.save_state
def save_state(self, state):
    real_save(self, state)
    if kind == "after-give-up" and state.failed:
        die()
StateDir.save_state = save_state

real_switch = _slots.switch
def switch(mdir, slot):
    here = journal.load().phase.value
    if kind == "before-rename" and here == phase:
        die()
    real_switch(mdir, slot)
    if kind == "after-rename" and here == phase:
        die()
_slots.switch = switch

clock = lambda: time.time() + float(offset)
if op == "update":
    update_once(device, fetch_config=FetchConfig(retries=1, backoff=0.01), clock=clock)
elif op == "confirm":
    confirm(device)
else:
    revert(device)
sys.exit(3)
"""


@dataclass(frozen=True)
class Devices:
    """Pristine state directories (copied per test), following the served repository, which
    holds ``det`` 1.0.0 and 1.1.0."""

    committed: Path  # 1.0.0 committed in slot a, journal idle; 1.1.0 not yet fetched
    trial: Path  # 1.1.0 in slot b on trial (window of WINDOW s); 1.0.0 in slot a


@pytest.fixture(scope="module")
def devices(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:  # noqa: F811
    root = tmp_path_factory.mktemp("crash")
    served = root / "repo"
    shutil.copytree(base.root / "repo_v1", served)
    with serve_dir(served) as url:
        committed = root / "committed"
        opts: dict[str, Any] = {"ring": "canary", "health_timeout_s": 0}
        init_device(committed, url, base.trusted_root, "dev-1", ["det"], **opts)
        assert update_once(committed, fetch_config=FAST).status == "updated"
        opts.update(health_timeout_s=WINDOW, hook_cmd=HOOK)
        init_device(committed, url, base.trusted_root, "dev-1", ["det"], **opts)
        shutil.rmtree(served)
        shutil.copytree(base.root / "repo_v2", served)
        trial = root / "trial"
        shutil.copytree(committed, trial, symlinks=True)
        assert update_once(trial, fetch_config=FAST).status == "pending_confirmation"
        (trial / "hooks.log").unlink()
        yield Devices(committed, trial)


def _copy(src: Path, tmp: Path) -> Path:
    dev = tmp / "dev"
    shutil.copytree(src, dev, symlinks=True)
    return dev


def _kill(dev: Path, op: str, kind: str, phase: str, offset: float = 0.0) -> None:
    """Run ``op`` in a child that SIGKILLs itself at the seam; fail unless it did."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(dev), op, kind, phase, str(offset)],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode()[-2000:])


def _journal(dev: Path) -> JournalState:
    return Journal(dev / "journal.json").load()


def _serving(dev: Path) -> str:
    """The version apps get from ``current_model``: every file re-hashed against the slot
    manifest, the model loaded in onnxruntime and run on its smoke inputs."""
    import numpy as np
    import onnxruntime as ort

    version = current_version(dev)
    assert version is not None, "no committed model"
    model = current_model(dev, "det")
    slot = model.parent.parent
    release = Release.from_bytes((slot / "release.json").read_bytes())
    assert release.smoke is not None
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(slot / release.smoke.inputs) as inputs:
        outputs = session.run(None, {k: inputs[k] for k in inputs.files})
    assert outputs and all(np.isfinite(o).all() for o in outputs)
    return version


def _events(dev: Path, kind: str, version: str = "1.1.0") -> list[dict[str, Any]]:
    doc = json.loads((dev / "events.json").read_bytes())
    return [e for e in doc["events"] if e["kind"] == kind and e["version"] == version]


def _hooks(dev: Path) -> list[str]:
    log = dev / "hooks.log"
    return log.read_text().split() if log.exists() else []


def _assert_reverted_for_good(dev: Path) -> None:
    """1.0.0 is served, 1.1.0 failed here: not installed again, never a revert target."""
    assert _journal(dev).phase is Phase.IDLE
    assert _serving(dev) == "1.0.0"
    assert ("det", "1.1.0") in status(dev).failed
    assert _events(dev, "reverted")
    assert "reverted" in _hooks(dev)  # the app was told to reload the old model
    res = update_once(dev, fetch_config=FAST)
    assert res.status == "up_to_date", res.to_dict()
    skipped = {s["version"]: s["reason"] for s in res.outcomes[0].skipped}
    assert skipped["1.1.0"] == "failed on this device before"
    with pytest.raises(InputError, match="no previous release"):
        revert(dev)  # slot b holds the failed 1.1.0: going there would re-install it
    assert _serving(dev) == "1.0.0"


# -- switching ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "served_after_kill"),
                         [("before-rename", "1.0.0"), ("after-rename", "1.1.0")])
def test_kill_in_switching_finishes_the_switch_on_next_start(
    devices: Devices, tmp_path: Path, kind: str, served_after_kill: str
) -> None:
    """Killed around the ``current`` rename while the journal says ``switching``: the rename
    is the instant apps move; the next start completes the switch and opens the window."""
    dev = _copy(devices.committed, tmp_path)
    _kill(dev, "update", kind, "switching")
    assert _journal(dev).phase is Phase.SWITCHING
    assert _serving(dev) == served_after_kill
    assert not _events(dev, "committed")

    before = time.time()
    res = update_once(dev, fetch_config=FAST)
    assert (res.status, res.outcomes[0].version) == ("pending_confirmation", "1.1.0")
    st = _journal(dev)
    assert st.phase is Phase.TRIAL and st.txn is not None and st.txn.deadline is not None
    assert st.txn.deadline >= before + WINDOW  # a fresh health window
    assert _serving(dev) == "1.1.0"
    assert [e["data"]["phase"] for e in _events(dev, "resumed")] == ["switching"]
    assert len(_events(dev, "committed")) == 1
    assert _hooks(dev) == ["committed"]

    assert confirm(dev).status == "confirmed"
    assert _journal(dev).phase is Phase.IDLE
    assert status(dev).models["det"]["committed_counter"] == 2
    assert _serving(dev) == "1.1.0"


def test_kill_in_switching_with_the_slot_gone_bad_reverts(devices: Devices,
                                                          tmp_path: Path) -> None:
    """The other branch of switching recovery: when the device comes back, the slot to switch
    to is no longer good (its manifest is gone, as ``mark_bad`` leaves it), so the switch is not
    finished: the next start reverts to 1.0.0 and 1.1.0 is failed."""
    dev = _copy(devices.committed, tmp_path)
    _kill(dev, "update", "before-rename", "switching")
    st = _journal(dev)
    assert st.phase is Phase.SWITCHING and st.txn is not None
    (dev / "models/det/slots" / f"{st.txn.slot}.manifest.json").unlink()
    assert _serving(dev) == "1.0.0"
    update_once(dev, fetch_config=FAST)
    [event] = _events(dev, "reverted")
    assert event["data"]["reason"] == "slot not good at switch"
    assert [e["data"]["phase"] for e in _events(dev, "resumed")] == ["switching"]
    _assert_reverted_for_good(dev)


# -- trial ----------------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["open", "expired"])
def test_kill_right_after_trial_began(devices: Devices, tmp_path: Path, window: str) -> None:
    """Killed the instant the journal said ``trial``: the switch was complete and announced
    (event, app hook) before that. While the window is open the next start keeps waiting and
    the app's confirmation commits 1.1.0; if the window ran out while the updater was dead, the
    next start reverts to 1.0.0 and 1.1.0 is failed."""
    dev = _copy(devices.committed, tmp_path)
    _kill(dev, "update", "after-advance", "trial")
    st = _journal(dev)
    assert st.phase is Phase.TRIAL and st.txn is not None and st.txn.deadline is not None
    assert _serving(dev) == "1.1.0"
    assert len(_events(dev, "committed")) == 1  # recorded before the journal moved on
    assert _hooks(dev) == ["committed"]
    assert status(dev).trial == {"model": "det", "version": "1.1.0", "slot": st.txn.slot,
                                 "deadline": st.txn.deadline}
    if window == "open":
        assert update_once(dev, fetch_config=FAST).status == "pending_confirmation"
        assert _serving(dev) == "1.1.0"
        assert confirm(dev).status == "confirmed"
        assert _journal(dev).phase is Phase.IDLE
        assert status(dev).models["det"]["committed_version"] == "1.1.0"
        assert update_once(dev, fetch_config=FAST).status == "up_to_date"
        return
    late = st.txn.deadline + 1.0
    res = update_once(dev, fetch_config=FAST, clock=lambda: late)
    assert (res.status, res.outcomes[0].version) == ("reverted", "1.1.0")
    [event] = _events(dev, "reverted")
    assert event["data"]["reason"] == "health window expired without confirmation"
    _assert_reverted_for_good(dev)


@pytest.mark.parametrize("kind", ["before-close", "after-close"])
def test_kill_while_confirming(devices: Devices, tmp_path: Path, kind: str) -> None:
    """``confirm`` persists the committed counter, records the event, then closes the journal.
    Killed before the close: the next start sees the confirmation persisted and closes the
    journal (recording it again: at least once). Killed after: nothing is left to do, and the
    confirmation was recorded."""
    dev = _copy(devices.trial, tmp_path)
    _kill(dev, "confirm", kind, "trial")
    assert _journal(dev).phase is (Phase.TRIAL if kind == "before-close" else Phase.IDLE)
    assert status(dev).models["det"]["committed_counter"] == 2
    assert _serving(dev) == "1.1.0"
    assert update_once(dev, fetch_config=FAST).status == "up_to_date"
    assert _journal(dev).phase is Phase.IDLE
    assert _events(dev, "confirmed")
    resumed = [e["data"]["phase"] for e in _events(dev, "resumed")]
    assert resumed == (["trial"] if kind == "before-close" else [])
    assert _serving(dev) == "1.1.0"
    assert status(dev).failed == ()


# -- reverting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "kind", "served_after_kill"), [
    ("revert", "after-advance", "1.1.0"),  # journal says reverting, nothing else done
    ("revert", "after-rename", "1.0.0"),  # current renamed back, journal not closed
    ("revert", "before-close", "1.0.0"),  # event and hook done, journal not closed
    ("revert", "after-close", "1.0.0"),  # journal closed: everything must be recorded
    ("update", "after-advance", "1.1.0"),  # the revert of an expired health window
])  # fmt: skip
def test_kill_while_reverting(devices: Devices, tmp_path: Path, op: str, kind: str,
                              served_after_kill: str) -> None:
    """Killed inside the revert of 1.1.0 (on trial) to 1.0.0, by the operator or because the
    health window expired: 1.0.0 is the right answer whatever instant the kill hit."""
    dev = _copy(devices.trial, tmp_path)
    _kill(dev, op, kind, "reverting", offset=WINDOW + 1.0)
    closed = kind == "after-close"
    assert _journal(dev).phase is (Phase.IDLE if closed else Phase.REVERTING)
    assert _serving(dev) == served_after_kill
    res = update_once(dev, fetch_config=FAST)  # the next start finishes the revert
    assert res.status == "up_to_date", res.to_dict()
    _assert_reverted_for_good(dev)
    resumed = [e["data"]["phase"] for e in _events(dev, "resumed")]
    assert resumed == ([] if closed else ["reverting"])
    reasons = {e["data"]["reason"] for e in _events(dev, "reverted")}
    assert reasons == {"operator revert during health window" if op == "revert"
                       else "health window expired without confirmation"}


def test_abandoned_release_is_never_a_revert_target(devices: Devices, tmp_path: Path) -> None:
    """Killed after the smoke test passed, just before ``switching``: slot b holds a verified
    1.1.0 that was never committed. Recovery abandons the attempt; an operator revert must not
    switch to that slot (regression: it did, and marked the committed 1.0.0 failed), while the
    next cycle installs 1.1.0 again (abandoned is not failed)."""
    dev = _copy(devices.committed, tmp_path)
    _kill(dev, "update", "before-advance", "switching")
    assert _journal(dev).phase is Phase.STAGED
    assert (dev / "models/det/slots/b.manifest.json").exists()
    with pytest.raises(InputError, match="no previous release"):
        revert(dev)  # recovers first: journal idle, attempt counted
    assert [e["data"]["phase"] for e in _events(dev, "resumed")] == ["staged"]
    assert _journal(dev).phase is Phase.IDLE
    assert _serving(dev) == "1.0.0"
    assert status(dev).failed == ()
    res = update_once(dev, fetch_config=FAST)
    assert (res.status, res.outcomes[0].version) == ("pending_confirmation", "1.1.0")
    assert _serving(dev) == "1.1.0"


def test_release_that_keeps_killing_the_updater_is_given_up(devices: Devices,
                                                            tmp_path: Path) -> None:
    """Three starts in a row die while staging 1.1.0: the recovery that counts the third gives
    the release up (``max_attempts``), and the ``failed`` event survives a kill right after the
    verdict was persisted (it is recorded first)."""
    dev = _copy(devices.committed, tmp_path)
    for _ in range(3):
        _kill(dev, "update", "after-advance", "staging")
        assert _journal(dev).phase is Phase.STAGING
        assert _serving(dev) == "1.0.0"
    _kill(dev, "update", "after-give-up", "")
    assert ("det", "1.1.0") in status(dev).failed
    [event] = _events(dev, "failed")
    assert event["data"]["reason"] == "interrupted 3 times; not retried"
    res = update_once(dev, fetch_config=FAST)
    assert res.status == "up_to_date", res.to_dict()
    assert _journal(dev).phase is Phase.IDLE
    assert _serving(dev) == "1.0.0"
    # recoveries 1 and 2 (children 2, 3), the next start; the killed third recorded "failed"
    assert [e["data"]["phase"] for e in _events(dev, "resumed")] == ["staging"] * 3
    assert len(_events(dev, "failed")) == 1
