"""Persistent device configuration and committed state, each one atomically written file.

* ``device.json`` - what the device is and where it updates from (:class:`DeviceConfig`),
  written by :func:`ota.client.init_device`; read-only afterwards.
* ``trust/root.json`` - the bootstrap TUF root given at init (the trust anchor).
* ``state.json`` - :class:`CommittedState`: per model the confirmed version and its counter;
  per model the highest security floor this device has ever verified (``floors``: from the
  release facts it verified, signed by the release key, and from TUF-verified indexes, bounded
  by :func:`ota.client._policy.floor_to_keep`), which only ever grows; releases that failed
  here; recovery attempts per release. Every change is one atomic write (``ota._atomic``).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ota._atomic import write_bytes
from ota.bundle import RINGS, validate_device_id, validate_name_fmt
from ota.errors import ConfigError, InputError, LocalError

from ._policy import Committed, DeviceFacts, normalize_arch

CONFIG_FORMAT = "edge-ota.device/1"
STATE_FORMAT = "edge-ota.device-state/1"
MAX_FAILED = 256


@dataclass(frozen=True)
class DeviceConfig:
    """Configuration of one device (one state directory)."""

    device_id: str
    repo_url: str
    models: tuple[str, ...]
    ring: str = "ga"
    tier: str = "default"
    arch: str = field(default_factory=lambda: normalize_arch(platform.machine()))
    runtime_version: str = ""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    health_timeout_s: float = 600.0  # 0: confirm right after the switch
    health_cmd: tuple[str, ...] = ()  # run after a switch; exit 0 confirms, else revert
    hook_cmd: tuple[str, ...] = ()  # run after every switch or revert (app reload)
    max_attempts: int = 3  # recoveries of one release before it is marked failed
    report_url: str = ""  # fleet service base URL; "" keeps events queued on the device
    report_token_file: str = ""  # bearer token for the fleet service (one word in a file)

    def validate(self) -> DeviceConfig:
        """Raises ConfigError on a bad field; returns self."""
        try:  # issue 12: an id is a safe path part (anchored regex), never "../../admin"
            validate_device_id(self.device_id)
        except InputError as e:
            raise ConfigError(str(e), remedy=e.remedy) from e
        if not self.repo_url.startswith(("http://", "https://")):
            raise ConfigError(f"repository URL must be http(s): {self.repo_url!r}")
        if self.ring not in RINGS:
            raise ConfigError(f"ring must be one of {RINGS}")
        if not self.models:
            raise ConfigError("follow at least one model")
        for m in self.models:
            try:
                validate_name_fmt(m)
            except Exception as e:
                raise ConfigError(f"bad model name {m!r}") from e
        if self.report_url and not self.report_url.startswith(("http://", "https://")):
            raise ConfigError(f"report URL must be http(s): {self.report_url!r}")
        if self.health_timeout_s < 0 or self.max_attempts < 1:
            raise ConfigError("health timeout must be >= 0 and max attempts >= 1")
        return self

    def facts(self) -> DeviceFacts:
        return DeviceFacts(
            device_id=self.device_id, arch=self.arch, tier=self.tier, ring=self.ring,
            runtime_version=self.runtime_version or detect_runtime_version(),
            client_version=client_version(), providers=self.providers,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = CONFIG_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceConfig:
        d = dict(d)
        if d.pop("format", None) != CONFIG_FORMAT:
            raise ConfigError("unknown device config format")
        for k in ("models", "providers", "health_cmd", "hook_cmd"):
            d[k] = tuple(d.get(k, ()))
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise ConfigError(f"bad device config: {e}") from e


@dataclass(frozen=True)
class ModelState:
    version: str
    counter: int
    floor: int = 0


@dataclass(frozen=True)
class CommittedState:
    models: dict[str, ModelState] = field(default_factory=dict)
    failed: tuple[tuple[str, str], ...] = ()
    attempts: dict[str, int] = field(default_factory=dict)  # "name@version" -> recoveries
    notices: tuple[str, ...] = ()  # "name@version:what" conditions already reported once
    floors: dict[str, int] = field(default_factory=dict)  # highest verified floor per model

    def floor(self, name: str) -> int:
        m = self.models.get(name)
        return max(m.floor if m else 0, self.floors.get(name, 0))

    def committed(self) -> Committed:
        names = set(self.models) | set(self.floors)
        return Committed(
            counters={n: m.counter for n, m in self.models.items()},
            floors={n: self.floor(n) for n in names},
            failed=frozenset(self.failed),
            versions={n: m.version for n, m in self.models.items()},
        )

    def with_floor(self, name: str, floor: int) -> CommittedState:
        """The state with ``floor`` kept for ``name`` if higher: floors never go down."""
        if floor <= self.floor(name):
            return self
        return replace(self, floors={**self.floors, name: floor})

    def without_failure(self, name: str, version: str) -> CommittedState:
        """The state with ``(name, version)`` no longer failed nor abandoned: it may be
        retried (operator action, ``ota device forget-failure``)."""
        key = f"{name}@{version}"
        return replace(
            self,
            failed=tuple(p for p in self.failed if p != (name, version)),
            attempts={k: v for k, v in self.attempts.items() if k != key},
            notices=tuple(n for n in self.notices if not n.startswith(key + ":")),
        )

    def with_failed(self, name: str, version: str) -> CommittedState:
        if (name, version) in self.failed:
            return self
        failed = (*self.failed, (name, version))[-MAX_FAILED:]
        attempts = {k: v for k, v in self.attempts.items() if k != f"{name}@{version}"}
        return replace(self, failed=failed, attempts=attempts)

    def noticed(self, name: str, version: str, what: str) -> bool:
        return f"{name}@{version}:{what}" in self.notices

    def with_notice(self, name: str, version: str, what: str) -> CommittedState:
        return replace(self, notices=(*self.notices, f"{name}@{version}:{what}")[-MAX_FAILED:])

    def with_confirmed(self, name: str, version: str, counter: int, floor: int) -> CommittedState:
        old = self.models.get(name)
        models = dict(self.models)
        models[name] = ModelState(version, max(counter, old.counter if old else 0),
                                  max(floor, old.floor if old else 0))
        attempts = {k: v for k, v in self.attempts.items() if not k.startswith(f"{name}@")}
        return replace(self, models=models, attempts=attempts)

    def to_bytes(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "models": {n: asdict(m) for n, m in sorted(self.models.items())},
            "failed": [list(p) for p in self.failed],
            "attempts": dict(sorted(self.attempts.items())),
            "notices": list(self.notices),
            "floors": dict(sorted(self.floors.items())),
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CommittedState:
        try:
            doc = json.loads(data)
            if doc["format"] != STATE_FORMAT:
                raise LocalError("unknown device state format")
            return cls(
                models={n: ModelState(**m) for n, m in doc["models"].items()},
                failed=tuple((str(a), str(b)) for a, b in doc["failed"]),
                attempts={str(k): int(v) for k, v in doc["attempts"].items()},
                notices=tuple(str(n) for n in doc.get("notices", [])),  # absent before 2026-11
                floors={str(k): _floor(v) for k, v in doc.get("floors", {}).items()},  # 2026-12
            )
        except LocalError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise LocalError(f"device state is corrupt: {e}") from e


def _floor(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise LocalError(f"device state is corrupt: bad floor {value!r:.40}")
    return value


class StateDir:
    """Paths and persisted documents of one device state directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.config_path = self.root / "device.json"
        self.state_path = self.root / "state.json"
        self.root_path = self.root / "trust" / "root.json"
        self.journal_path = self.root / "journal.json"
        self.events_path = self.root / "events.json"
        self.lock_path = self.root / ".lock"
        self.metadata_dir = self.root / "tuf"
        self.cache_dir = self.root / "cache"

    def load_config(self) -> DeviceConfig:
        """Raises ConfigError if the device was never initialised or its config is bad."""
        try:
            doc = json.loads(self.config_path.read_bytes())
        except FileNotFoundError as e:
            raise ConfigError(f"{self.root} is not an initialised device",
                              remedy="run `ota device init` first") from e
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(f"cannot read {self.config_path}: {e}") from e
        return DeviceConfig.from_dict(doc)

    def save_config(self, cfg: DeviceConfig) -> None:
        write_bytes(self.config_path, json.dumps(cfg.to_dict(), indent=1).encode())

    def bootstrap_root(self) -> bytes:
        try:
            return self.root_path.read_bytes()
        except OSError as e:
            raise ConfigError(f"trusted root missing: {e}") from e

    def load_state(self) -> CommittedState:
        try:
            return CommittedState.from_bytes(self.state_path.read_bytes())
        except FileNotFoundError:
            return CommittedState()
        except OSError as e:
            raise LocalError(f"cannot read {self.state_path}: {e}") from e

    def save_state(self, state: CommittedState) -> None:
        write_bytes(self.state_path, state.to_bytes())


def client_version() -> str:
    try:
        return importlib_metadata.version("edge-ota")
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


def detect_runtime_version() -> str:
    """onnxruntime's version from its distribution metadata (without importing it)."""
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return ""
