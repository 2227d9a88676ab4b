"""What a job request and a job result say, as they cross the control plane.

Pure dataclasses with their JSON form: the runner (and the admin surface) asks the
primary for a job with a JobRequest and gets a JobResult back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from fabric.dte import Outcome
from fabric.status import for_dte_failure


def outcome_status(outcome: Outcome) -> int:
    """The job status a DTE decision ends with: 0, or the 83xx code of its cause."""
    return int(for_dte_failure(outcome.cause.name)) if outcome.cause else 0


@dataclass(frozen=True)
class PolicyOperation:
    """A lifecycle operation as the primary runs it: where to, and (replication) which
    domain and primary import it there."""

    kind: str  # duplicate | replicate
    target: str
    target_domain: str | None = None
    target_primary: str | None = None


@dataclass(frozen=True)
class JobRequest:
    op: str  # backup | restore | duplicate | verify | replicate | import | synthetic
    step: int | None = None
    client: str | None = None  # backup: the client; restore: where to restore to
    media: str | None = None  # backup: the storage; others: the media server holding the source copy
    target: str | None = None  # duplicate / replicate: the destination media server
    target_domain: str | None = None  # replicate: the destination's domain
    backup_id: str | None = None
    images: tuple[str, ...] = ()  # synthetic: a full and its incrementals, oldest first
    incremental: bool = False
    policy_type: str = "standard"
    policy: str | None = None  # a policy run: the policy's name
    operations: tuple[PolicyOperation, ...] = ()  # a policy run: its lifecycle, in order
    parent_job_id: int | None = None

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> "JobRequest":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in body.items() if k in known}
        values["images"] = tuple(values.get("images") or ())
        values["operations"] = tuple(PolicyOperation(**o) for o in values.get("operations") or ())
        return cls(**values)


@dataclass(frozen=True)
class CopyInfo:
    copy: int
    media_server: str
    copy_dte_mode: str
    hierarchical_dte_mode: str


@dataclass(frozen=True)
class JobResult:
    job_id: int | None
    op: str
    status: int
    reason: str = ""
    decision: str | None = None  # encrypt | plaintext | fail, as the primary decided
    dte_mode: str | None = None  # on | off: what the job really did
    backup_id: str | None = None
    copy: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    tls: dict | None = None  # {"version": ..., "cipher": ...}
    verified: bool | None = None
    attempts: int = 1
    image_dte_mode: str | None = None
    media_server: str | None = None  # where the job wrote (backup, copy, replica) or read from
    copies: tuple[CopyInfo, ...] = field(default_factory=tuple)
    children: tuple["JobResult", ...] = field(default_factory=tuple)  # a parent job's child jobs

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> "JobResult":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in body.items() if k in known}
        values["copies"] = tuple(CopyInfo(**c) for c in values.get("copies") or ())
        values["children"] = tuple(JobResult.from_json(c) for c in values.get("children") or ())
        return cls(**values)
