"""The scenario as typed data: domains, hosts, steps and their expectations.

Pure dataclasses, built by fabric.scenario.loader from YAML and read by the planner and
the runner. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fabric.dte import (
    ClientMode,
    DomainSettings,
    DteMode,
    GlobalMode,
    Host,
    IgnoreImageMode,
    MediaMode,
    Role,
    Version,
)

DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Location:
    """Where a thing was written: file, 1-based line and column."""

    file: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file


@dataclass(frozen=True)
class DataSpec:
    """What a client backs up: generated files (from the seed) or a real folder."""

    files: int = 8
    size: int = 1 << 20  # total bytes, spread over `files`
    path: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How a domain retries a job that failed for an ordinary (non-DTE) reason."""

    attempts: int = 1
    delay: float = 0.0


@dataclass(frozen=True)
class HostSpec:
    name: str
    role: Role
    version: Version
    domain: str = DEFAULT_DOMAIN
    dte_mode: ClientMode | MediaMode | None = None
    data: DataSpec = field(default_factory=DataSpec)
    location: Location | None = None

    def as_dte_host(self) -> Host:
        return Host(self.name, self.role, self.version, self.dte_mode)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    settings: DomainSettings = field(default_factory=DomainSettings)
    trusts: tuple[str, ...] = ()  # domains this one accepts replicas from
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class Expect:
    """What a step should end as; any field left None is not checked."""

    status: int | None = None
    fails: bool | None = None
    dte: DteMode | None = None
    verified: bool | None = None


class BackupKind(enum.Enum):
    FULL = "full"
    INCREMENTAL = "incremental"


class PolicyType(enum.Enum):
    STANDARD = "standard"
    UNIVERSAL_SHARE = "universal_share"


class FaultKind(enum.Enum):
    CRASH = "crash"  # a daemon stops (host)
    CUT = "cut"  # a link refuses connections, or breaks after `after_bytes` (link)
    DISK_FULL = "disk_full"  # a media server's storage refuses writes (host)
    VOLUME_DOWN = "volume_down"  # a media server's disk volume is offline: no reads, no writes (host)
    BROKER_DOWN = "broker_down"  # the control plane stops (no host)


class PolicyOpKind(enum.Enum):
    DUPLICATE = "duplicate"
    REPLICATE = "replicate"  # followed by an import in the target domain (AIR)


@dataclass(frozen=True)
class PolicyOp:
    """One secondary operation of a storage lifecycle policy (reference §11.3)."""

    kind: PolicyOpKind
    to: str  # destination media server


@dataclass(frozen=True)
class PolicySpec:
    """A backup policy with its storage lifecycle: the backup, then each operation in order,
    run by the primary as child jobs of one parent job."""

    name: str
    client: str
    media: str
    operations: tuple[PolicyOp, ...] = ()
    policy_type: PolicyType = PolicyType.STANDARD


@dataclass(frozen=True)
class Step:
    """Fields every step has. `index` counts from 1 over all steps."""

    index: int
    location: Location
    expect: Expect | None

    op = "step"


@dataclass(frozen=True)
class BackupStep(Step):
    client: str
    media: str
    alias: str | None = None
    kind: BackupKind = BackupKind.FULL
    policy_type: PolicyType = PolicyType.STANDARD
    op = "backup"


@dataclass(frozen=True)
class PolicyStep(Step):
    """Run a policy now: its backup, then its lifecycle operations."""

    policy: str
    alias: str | None = None
    kind: BackupKind = BackupKind.FULL
    op = "policy"


@dataclass(frozen=True)
class RestoreStep(Step):
    image: str
    to: str
    media: str | None = None  # which copy's media server to read from (default: the first copy)
    op = "restore"


@dataclass(frozen=True)
class DuplicateStep(Step):
    image: str
    to: str
    media: str | None = None  # source copy's media server (default: the first copy)
    op = "duplicate"


@dataclass(frozen=True)
class VerifyStep(Step):
    image: str
    media: str | None = None
    op = "verify"


@dataclass(frozen=True)
class ReplicateStep(Step):
    image: str
    to: str  # a media server in another domain
    media: str | None = None
    op = "replicate"


@dataclass(frozen=True)
class ImportStep(Step):
    image: str
    media: str  # the media server, in the importing domain, that holds the replica
    op = "import"


@dataclass(frozen=True)
class SyntheticStep(Step):
    images: tuple[str, ...]  # a full and its incrementals
    media: str  # where the synthesized image is written
    alias: str | None = None
    op = "synthetic"


@dataclass(frozen=True)
class SetStep(Step):
    domain: str | None = None
    host: str | None = None
    global_mode: GlobalMode | None = None
    ignore_image_mode: IgnoreImageMode | None = None
    dte_mode: ClientMode | MediaMode | None = None
    version: Version | None = None
    op = "set"


@dataclass(frozen=True)
class ImageDteModeStep(Step):
    image: str
    mode: DteMode
    op = "image_dte_mode"


@dataclass(frozen=True)
class MutateStep(Step):
    client: str
    files: int
    op = "mutate"


@dataclass(frozen=True)
class FaultStep(Step):
    kind: FaultKind
    host: str | None = None
    link: tuple[str, str] | None = None
    after_bytes: int | None = None  # arm the fault to strike mid-transfer
    op = "fault"


@dataclass(frozen=True)
class HealStep(Step):
    host: str | None = None
    link: tuple[str, str] | None = None
    broker: bool = False
    op = "heal"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    domains: dict[str, DomainSpec]
    hosts: dict[str, HostSpec]
    steps: tuple[Step, ...]
    description: str = ""
    seed: int = 0
    policies: dict[str, PolicySpec] = field(default_factory=dict)

    def domain_of(self, host: str) -> DomainSpec:
        return self.domains[self.hosts[host].domain]

    def hosts_with_role(self, role: Role) -> list[HostSpec]:
        return [h for h in self.hosts.values() if h.role is role]


def step_domain(scenario: Scenario, step: Step, image_domains: list[str]) -> str:
    """The domain whose primary runs a step. An image can live in several domains after a
    replication and import; `image_domains` lists them, the one it was made in first."""
    hosts = scenario.hosts
    if isinstance(step, (RestoreStep, DuplicateStep)):
        return hosts[step.to].domain
    if isinstance(step, (BackupStep, ImportStep, SyntheticStep)):
        return hosts[step.media].domain
    if isinstance(step, PolicyStep):
        return hosts[scenario.policies[step.policy].media].domain
    if isinstance(step, (VerifyStep, ReplicateStep)) and step.media:
        return hosts[step.media].domain
    return image_domains[0] if image_domains else next(iter(scenario.domains))
