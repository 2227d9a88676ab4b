"""`fabric plan`: the DTE decision of every step, in order, with no data moving.

Applies fabric.dte to a scenario, assuming each earlier step ends as decided (a backup
decided `encrypt` makes an image whose DTE mode is On; a failed one makes no image).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fabric import dte
from fabric.dte import Decision, DomainSettings, Host, Outcome
from fabric.model import (
    BackupStep,
    DuplicateStep,
    ImageDteModeStep,
    ImportStep,
    PolicyOpKind,
    PolicyStep,
    PolicyType,
    ReplicateStep,
    RestoreStep,
    Scenario,
    SetStep,
    Step,
    SyntheticStep,
    VerifyStep,
    step_domain,
)
from fabric.jobs import outcome_status
from fabric.status import Status


@dataclass(frozen=True)
class StepPlan:
    step: int
    op: str
    decision: Decision | None
    status: int
    reason: str
    subject: str = ""
    children: tuple["StepPlan", ...] = ()  # a policy run: its backup and lifecycle operations

    def as_json(self) -> dict:
        out = {
            "step": self.step,
            "op": self.op,
            "decision": self.decision.value if self.decision else None,
            "status": self.status,
            "reason": self.reason,
        }
        if self.children:
            out["children"] = [{k: v for k, v in c.as_json().items() if k != "step"} | {"on": c.subject} for c in self.children]
        return out


@dataclass(frozen=True)
class Plan:
    scenario: str
    steps: tuple[StepPlan, ...]

    def as_json(self) -> dict:
        return {"scenario": self.scenario, "steps": [s.as_json() for s in self.steps]}


@dataclass
class _PlannedImage:
    """One image in one domain's catalog."""

    image_on: bool
    media: list[str] = field(default_factory=list)  # media servers holding a copy, copy 1 first
    replicas: set[str] = field(default_factory=set)  # other domains' media holding a replica


class _PlanState:
    """Domain settings, hosts and images as the steps so far have left them."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.settings: dict[str, DomainSettings] = {name: d.settings for name, d in scenario.domains.items()}
        self.hosts: dict[str, Host] = {name: h.as_dte_host() for name, h in scenario.hosts.items()}
        self.domain_of = {name: h.domain for name, h in scenario.hosts.items()}
        # alias -> domain -> image; None: the step that should have made it failed
        self.images: dict[str, dict[str, _PlannedImage] | None] = {}

    def domain_settings(self, host: str) -> DomainSettings:
        return self.settings[self.domain_of[host]]

    def image(self, alias: str, step: Step) -> _PlannedImage | None:
        held = self.images.get(alias)
        if not held:
            return None
        return held.get(step_domain(self.scenario, step, list(held)))

    def made(self, alias: str | None, domain: str, image: _PlannedImage | None) -> None:
        if alias:
            self.images[alias] = {domain: image} if image else None


def plan_scenario(scenario: Scenario) -> Plan:
    state = _PlanState(scenario)
    return Plan(scenario.name, tuple(_plan_step(state, step) for step in scenario.steps))


def _plan_step(state: _PlanState, step: Step) -> StepPlan:
    if isinstance(step, SetStep):
        return _apply_set(state, step)
    if isinstance(step, ImageDteModeStep):
        image = state.image(step.image, step)
        if image is None:  # not a job: no decision, but the change finds nothing to change
            return replace(_missing(step, step.image), decision=None)
        image.image_on = step.mode.is_on
        return StepPlan(step.index, step.op, None, 0, f"image {step.image} DTE mode set {step.mode.value.capitalize()}", step.image)
    if isinstance(step, BackupStep):
        return _plan_backup(state, step)
    if isinstance(step, PolicyStep):
        return _plan_policy(state, step)
    if isinstance(step, ImportStep):
        return _plan_import(state, step)
    image_name = getattr(step, "image", None)
    image = state.image(image_name, step) if image_name else None
    if image_name is not None and image is None:
        return _missing(step, image_name)
    reads_copy = isinstance(step, (RestoreStep, DuplicateStep, VerifyStep, ReplicateStep))
    if reads_copy and step.media is not None and step.media not in image.media:
        return StepPlan(step.index, step.op, Decision.FAIL, int(Status.NO_ENTITY_FOUND),
                        f"image {image_name} has no copy on {step.media}", step.media)
    # The copy a step reads: the one it names, else the first copy (the primary copy).
    source = (step.media or image.media[0]) if reads_copy else None
    if isinstance(step, RestoreStep):
        outcome = dte.decide_restore(state.domain_settings(source), image.image_on, state.hosts[step.to], [state.hosts[source]])
        return _decided(step, outcome, f"{source} -> {step.to}")
    if isinstance(step, DuplicateStep):
        outcome = dte.decide_duplication(state.domain_settings(source), image.image_on, state.hosts[source], state.hosts[step.to])
        if not outcome.fails:
            image.media.append(step.to)
        return _decided(step, outcome, f"{source} -> {step.to}")
    if isinstance(step, VerifyStep):
        return _decided(step, dte.decide_verify(state.domain_settings(source), image.image_on, state.hosts[source]), source)
    if isinstance(step, ReplicateStep):
        # D-REPL: "The job DTE mode depends on the image DTE mode or the global DTE
        # setting of the source domain."
        outcome = dte.decide_replication(state.domain_settings(source), image.image_on, state.hosts[source], state.hosts[step.to])
        if not outcome.fails:
            image.replicas.add(step.to)
        return _decided(step, outcome, f"{source} -> {step.to}")
    if isinstance(step, SyntheticStep):
        return _plan_synthetic(state, step)
    return StepPlan(step.index, step.op, None, 0, "", "")


def _plan_import(state: _PlanState, step: ImportStep) -> StepPlan:
    """The importing domain decides, with the image mode carried over by the replica."""
    held = state.images.get(step.image) or {}
    image = next((i for i in held.values() if step.media in i.replicas), None)
    if image is None:
        return StepPlan(step.index, step.op, Decision.FAIL, int(Status.NO_IMAGES_PROCESSED),
                        f"no replica of {step.image} reached {step.media} (the replication failed)", step.media)
    outcome = dte.decide_import(state.domain_settings(step.media), image.image_on, state.hosts[step.media])
    if not outcome.fails:
        held[state.domain_of[step.media]] = _PlannedImage(image.image_on, [step.media])
    return _decided(step, outcome, step.media)


def _plan_backup(state: _PlanState, step: BackupStep) -> StepPlan:
    outcome, made = _backup_outcome(state, step.client, step.media, step.policy_type)
    state.made(step.alias, state.domain_of[step.media], made)
    return _decided(step, outcome, f"{step.client} -> {step.media}")


def _backup_outcome(state: _PlanState, client: str, media_name: str, policy_type: PolicyType) -> tuple[Outcome, _PlannedImage | None]:
    settings = state.domain_settings(media_name)
    media = state.hosts[media_name]
    if policy_type is PolicyType.UNIVERSAL_SHARE:
        outcome = dte.decide_universal_share_backup(settings, media)
    else:
        outcome = dte.decide_backup(settings, state.hosts[client], media)
    made = None if outcome.fails else _PlannedImage(dte.image_dte_mode(outcome.encrypts, media).is_on, [media_name])
    return outcome, made


def _plan_policy(state: _PlanState, step: PolicyStep) -> StepPlan:
    """The backup, then each lifecycle operation with the settings of that moment."""
    policy = state.scenario.policies[step.policy]
    outcome, image = _backup_outcome(state, policy.client, policy.media, policy.policy_type)
    children = [_decided(step, outcome, f"{policy.client} -> {policy.media}", op="backup")]
    home = state.domain_of[policy.media]
    held = {home: image} if image else None
    for op in policy.operations if image else ():
        source = state.hosts[image.media[0]]
        target = state.hosts[op.to]
        if op.kind is PolicyOpKind.DUPLICATE:
            decided = dte.decide_duplication(state.settings[home], image.image_on, source, target)
            children.append(_decided(step, decided, f"{source.name} -> {op.to}", op="duplicate"))
            if not decided.fails:
                image.media.append(op.to)
            continue
        decided = dte.decide_replication(state.settings[home], image.image_on, source, target)
        children.append(_decided(step, decided, f"{source.name} -> {op.to}", op="replicate"))
        if decided.fails:
            continue
        imported = dte.decide_import(state.domain_settings(op.to), image.image_on, target)
        children.append(_decided(step, imported, op.to, op="import"))
        if not imported.fails:
            held[state.domain_of[op.to]] = _PlannedImage(image.image_on, [op.to])
    if step.alias:
        state.images[step.alias] = held
    # The parent job ends with its first failing child (and then, per the plan contract,
    # its decision is `fail`); otherwise it shows its backup's decision.
    failed = next((c for c in children if c.status), None)
    if failed:
        return StepPlan(step.index, step.op, Decision.FAIL, failed.status, f"{failed.op} fails: {failed.reason}",
                        f"policy {policy.name}", tuple(children))
    return StepPlan(step.index, step.op, outcome.decision, 0, children[0].reason, f"policy {policy.name}", tuple(children))


def _plan_synthetic(state: _PlanState, step: SyntheticStep) -> StepPlan:
    components = [state.image(alias, step) for alias in step.images]
    for alias, component in zip(step.images, components):
        if component is None:
            return _missing(step, alias)
    media_names = list(dict.fromkeys([*(c.media[0] for c in components), step.media]))
    outcome = dte.decide_synthetic(
        state.domain_settings(step.media), [c.image_on for c in components], [state.hosts[m] for m in media_names]
    )
    made = None if outcome.fails else _PlannedImage(dte.image_dte_mode(outcome.encrypts, state.hosts[step.media]).is_on, [step.media])
    state.made(step.alias, state.domain_of[step.media], made)
    sources = list(dict.fromkeys(c.media[0] for c in components))
    return _decided(step, outcome, f"{', '.join(sources)} -> {step.media}")


def _apply_set(state: _PlanState, step: SetStep) -> StepPlan:
    if step.host:
        host = state.hosts[step.host]
        changes = []
        if step.version is not None:
            host = replace(host, version=step.version)
            changes.append(f"version {step.version}")
        if step.dte_mode is not None:
            host = replace(host, dte_mode=step.dte_mode)
            changes.append(f"DTE mode {step.dte_mode.value}")
        state.hosts[step.host] = host
        return StepPlan(step.index, step.op, None, 0, f"{step.host}: {', '.join(changes)}", step.host)
    domain = step.domain or next(iter(state.settings))
    settings = state.settings[domain]
    changes = []
    if step.global_mode is not None:
        settings = replace(settings, global_mode=step.global_mode)
        changes.append(f"global DTE mode {step.global_mode.label}")
    if step.ignore_image_mode is not None:
        settings = replace(settings, ignore_image_mode=step.ignore_image_mode)
        changes.append(f"DTE_IGNORE_IMAGE_MODE = {step.ignore_image_mode.name}")
    state.settings[domain] = settings
    return StepPlan(step.index, step.op, None, 0, f"domain {domain}: {', '.join(changes)}", domain)


def _decided(step: Step, outcome: Outcome, subject: str, op: str | None = None) -> StepPlan:
    return StepPlan(step.index, op or step.op, outcome.decision, outcome_status(outcome), outcome.reason, subject)


def _missing(step: Step, image: str) -> StepPlan:
    return StepPlan(step.index, step.op, Decision.FAIL, int(Status.NO_ENTITY_FOUND),
                    f"image {image} does not exist: the step that should have made it failed", image)

