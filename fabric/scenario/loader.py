"""Reads a topology scenario (YAML) into a typed fabric.model.Scenario, or says exactly why not.

Works on PyYAML's node tree, not on plain Python values, so that every error can name the
file, line and key at fault, and so that YAML 1.1's bare `on`/`off` stay the words they are.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Callable, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fabric.dte import ClientMode, DomainSettings, DteMode, GlobalMode, IgnoreImageMode, MediaMode, Role, Version, MEDIA_MODE_MIN_VERSION
from fabric.model import (
    DEFAULT_DOMAIN,
    BackupKind,
    BackupStep,
    DataSpec,
    DomainSpec,
    DuplicateStep,
    Expect,
    FaultKind,
    FaultStep,
    HealStep,
    HostSpec,
    ImageDteModeStep,
    ImportStep,
    Location,
    MutateStep,
    PolicyOp,
    PolicyOpKind,
    PolicySpec,
    PolicyStep,
    PolicyType,
    ReplicateStep,
    RestoreStep,
    RetryPolicy,
    Scenario,
    SetStep,
    Step,
    SyntheticStep,
    VerifyStep,
)

E = TypeVar("E", bound=Enum)

MAX_SCENARIO_BYTES = 4 << 20
DEFAULT_VERSION = "10.5"


class ScenarioError(Exception):
    """A scenario that cannot run, with where and why. Never shown as a traceback."""

    def __init__(self, location: Location, key: str, message: str):
        self.location = location
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" {self.key}:" if self.key else ""
        return f"{self.location}:{where} {self.message}"


# --------------------------------------------------------------------------------------
# Reading nodes with locations
# --------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gib": 1 << 30, "gb": 1 << 30}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class _Reader:
    """Typed accessors over YAML nodes; every failure becomes a ScenarioError."""

    def __init__(self, path: str):
        self.path = path

    def loc(self, node: Node) -> Location:
        # Marks carry the name of the stream they came from, so a node read from a host
        # profile is reported in the profile's file, not the scenario's.
        return Location(node.start_mark.name or self.path, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, node: Node, key: str, message: str) -> ScenarioError:
        return ScenarioError(self.loc(node), key, message)

    def mapping(self, node: Node, key: str, allowed: tuple[str, ...]) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.error(node, key, f"expected a mapping with keys from: {', '.join(allowed)}")
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self.error(key_node, key, "keys must be plain words")
            name = key_node.value
            path = f"{key}.{name}" if key else name
            if name not in allowed:
                raise self.error(key_node, path, f"unknown key{_suggest(name, allowed)}; valid keys here: {', '.join(allowed)}")
            if name in out:
                raise self.error(key_node, path, "this key is given twice")
            out[name] = (key_node, value_node)
        return out

    def entries(self, node: Node, key: str) -> list[tuple[str, Node, Node]]:
        """A mapping whose keys are names chosen by the user (hosts, domains)."""
        if not isinstance(node, MappingNode):
            raise self.error(node, key, "expected a mapping of names to settings")
        seen: set[str] = set()
        out = []
        for key_node, value_node in node.value:
            name = self.name(key_node, key)
            if name in seen:
                raise self.error(key_node, f"{key}.{name}", "this name is given twice")
            seen.add(name)
            out.append((name, key_node, value_node))
        return out

    def sequence(self, node: Node, key: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, key, "expected a list")
        return list(node.value)

    def scalar(self, node: Node, key: str) -> str:
        if not isinstance(node, ScalarNode):
            raise self.error(node, key, "expected a single value, not a list or mapping")
        return node.value

    def text(self, node: Node, key: str) -> str:
        return self.scalar(node, key)

    def name(self, node: Node, key: str) -> str:
        value = self.scalar(node, key)
        if not _NAME_RE.fullmatch(value):
            raise self.error(node, key, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 63)")
        return value

    def integer(self, node: Node, key: str, minimum: int = 0, maximum: int = 2**62) -> int:
        value = self.scalar(node, key)
        try:
            number = int(value, 0) if not value.lstrip("-").isdigit() else int(value)
        except ValueError:
            raise self.error(node, key, f"{value!r} is not a whole number") from None
        if not minimum <= number <= maximum:
            raise self.error(node, key, f"{number} is out of range ({minimum} to {maximum})")
        return number

    def number(self, node: Node, key: str, minimum: float = 0.0, maximum: float = 3600.0) -> float:
        value = self.scalar(node, key)
        try:
            number = float(value)
        except ValueError:
            raise self.error(node, key, f"{value!r} is not a number") from None
        if not minimum <= number <= maximum:
            raise self.error(node, key, f"{value} is out of range ({minimum} to {maximum})")
        return number

    def boolean(self, node: Node, key: str) -> bool:
        value = self.scalar(node, key).lower()
        if value in ("true", "yes", "on"):
            return True
        if value in ("false", "no", "off"):
            return False
        raise self.error(node, key, f"{value!r} is not true or false")

    def size(self, node: Node, key: str, maximum: int = 64 << 30) -> int:
        value = self.scalar(node, key)
        match = _SIZE_RE.match(value)
        if not match:
            raise self.error(node, key, f"{value!r} is not a size (e.g. 512KiB, 8MiB, 1GiB, or bytes)")
        amount = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
        if not 0 <= amount <= maximum:
            raise self.error(node, key, f"{value} is out of range (at most {maximum >> 30} GiB)")
        return int(amount)

    def version(self, node: Node, key: str) -> Version:
        value = self.scalar(node, key)
        try:
            return Version.parse(value)
        except ValueError as exc:
            raise self.error(node, key, str(exc)) from None

    def choice(self, node: Node, key: str, enum_type: type[E], allowed: tuple[E, ...] | None = None) -> E:
        # YAML 1.1 reads bare on/off as booleans; the node keeps the word as written.
        value = self.scalar(node, key).strip().lower().replace(" ", "_").replace("-", "_")
        members = allowed or tuple(enum_type)
        for member in members:
            if member.value == value:
                return member
        words = [m.value for m in members]
        raise self.error(node, key, f"{self.scalar(node, key)!r} is not valid{_suggest(value, words)}; use one of: {', '.join(words)}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------

TOP_KEYS = ("name", "description", "seed", "global_dte_mode", "dte_ignore_image_mode", "retry", "domains", "hosts",
            "policies", "steps")
POLICY_KEYS = ("client", "media", "operations", "policy_type")
POLICY_OP_KEYS = ("to",)
DOMAIN_KEYS = ("global_dte_mode", "dte_ignore_image_mode", "trusts", "retry")
HOST_KEYS = ("role", "version", "dte_mode", "domain", "data", "profile")
DATA_KEYS = ("files", "size", "path")
RETRY_KEYS = ("attempts", "delay")
EXPECT_KEYS = ("status", "fails", "dte", "verified")
STEP_KEYS: dict[str, tuple[str, ...]] = {
    "backup": ("client", "media", "as", "kind", "policy_type"),
    "policy": ("name", "as", "kind"),
    "restore": ("image", "to", "from"),
    "duplicate": ("image", "to", "from"),
    "verify": ("image", "media"),
    "replicate": ("image", "to", "from"),
    "import": ("image", "media"),
    "synthetic": ("images", "media", "as"),
    "set": ("domain", "host", "global_dte_mode", "dte_ignore_image_mode", "dte_mode", "version"),
    "image_dte_mode": ("image", "mode"),
    "mutate": ("client", "files"),
    "fault": ("kind", "host", "link", "after"),
    "heal": ("host", "link", "broker"),
}
NO_EXPECT = ("set", "image_dte_mode", "mutate", "fault", "heal")


def load_scenario(path: str | os.PathLike, profile_dirs: tuple[Path, ...] | None = None) -> Scenario:
    """Load and check a scenario file. Raises ScenarioError, never anything else."""
    path = Path(path)
    shown = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(Location(shown, 0, 0), "", f"cannot read the scenario: {exc.strerror or exc}") from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ScenarioError(Location(shown, 1), "", f"the file is larger than {MAX_SCENARIO_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ScenarioError(Location(shown, line, column), "", f"not UTF-8 text (byte {exc.start})") from None
    dirs = profile_dirs if profile_dirs is not None else default_profile_dirs(path)
    return parse_scenario(text, shown, dirs)


def default_profile_dirs(scenario_path: Path) -> tuple[Path, ...]:
    """Where `profile:` names are looked up: FABRIC_HOSTS_PATH, then hosts/ beside or above the file."""
    dirs = [Path(p) for p in os.environ.get("FABRIC_HOSTS_PATH", "").split(os.pathsep) if p]
    here = scenario_path.resolve().parent
    dirs += [here / "hosts", here.parent / "hosts"]
    return tuple(dirs)


def _compose(text: str, name: str) -> Node | None:
    stream = io.StringIO(text)
    stream.name = name  # PyYAML puts a file-like stream's name into every mark
    return yaml.compose(stream, Loader=yaml.SafeLoader)


def parse_scenario(text: str, path: str = "<scenario>", profile_dirs: tuple[Path, ...] = ()) -> Scenario:
    try:
        root = _compose(text, path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ScenarioError(Location(path, line, col), "", f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(Location(path, 1), "", f"not valid YAML: {exc}") from None
    except RecursionError:
        raise ScenarioError(Location(path, 1), "", "the YAML is nested too deeply") from None
    if root is None:
        raise ScenarioError(Location(path, 1), "", "the scenario is empty; it needs at least name, hosts and steps")
    try:
        return _ScenarioBuilder(_Reader(path), profile_dirs).build(root)
    except RecursionError:
        raise ScenarioError(Location(path, 1), "", "the YAML is nested too deeply") from None


@dataclass
class _HostState:
    """What the loader tracks of a host as steps change it, to check later steps."""

    spec: HostSpec


class _ScenarioBuilder:
    def __init__(self, reader: _Reader, profile_dirs: tuple[Path, ...]):
        self.r = reader
        self.profile_dirs = profile_dirs

    def build(self, root: Node) -> Scenario:
        r = self.r
        top = r.mapping(root, "", TOP_KEYS)
        for required in ("name", "hosts", "steps"):
            if required not in top:
                raise r.error(root, required, f"missing; a scenario needs {', '.join(('name', 'hosts', 'steps'))}")
        name = r.text(top["name"][1], "name")
        description = r.text(top["description"][1], "description") if "description" in top else ""
        seed = r.integer(top["seed"][1], "seed") if "seed" in top else 0
        domains = self.domains(top)
        hosts = self.hosts(top["hosts"][1], domains)
        self.check_primaries(top["hosts"][1], hosts, domains)
        policies = self.policies(top["policies"][1], domains, hosts) if "policies" in top else {}
        steps = self.steps(top["steps"][1], domains, hosts, policies)
        return Scenario(name=name, path=r.path, domains=domains, hosts=hosts, steps=tuple(steps), description=description,
                        seed=seed, policies=policies)

    # -- storage lifecycle policies -----------------------------------------------------

    def policies(self, node: Node, domains: dict[str, DomainSpec], hosts: dict[str, HostSpec]) -> dict[str, PolicySpec]:
        r = self.r
        out = {}
        for name, _, value in r.entries(node, "policies"):
            key = f"policies.{name}"
            keys = r.mapping(value, key, POLICY_KEYS)
            ends = {}
            for end, role in (("client", Role.CLIENT), ("media", Role.MEDIA)):
                if end not in keys:
                    raise r.error(value, f"{key}.{end}", "missing")
                ends[end] = self.policy_host(keys[end][1], f"{key}.{end}", hosts, role)
            home = hosts[ends["media"]].domain
            if hosts[ends["client"]].domain != home:
                raise r.error(value, key, f"client {ends['client']} and media {ends['media']} are in different domains")
            operations = []
            if "operations" in keys:
                for n, op_node in enumerate(r.sequence(keys["operations"][1], f"{key}.operations"), start=1):
                    operations.append(self.policy_op(op_node, f"{key}.operations[{n}]", hosts, domains, home))
            policy_type = r.choice(keys["policy_type"][1], f"{key}.policy_type", PolicyType) if "policy_type" in keys else PolicyType.STANDARD
            out[name] = PolicySpec(name, ends["client"], ends["media"], tuple(operations), policy_type)
        return out

    def policy_host(self, node: Node, key: str, hosts: dict[str, HostSpec], role: Role) -> str:
        name = self.r.name(node, key)
        if name not in hosts:
            raise self.r.error(node, key, f"unknown host {name!r}{_suggest(name, hosts)}; hosts: {', '.join(hosts)}")
        if hosts[name].role is not role:
            raise self.r.error(node, key, f"{name} is a {hosts[name].role.value}, not a {role.value}")
        return name

    def policy_op(self, node: Node, key: str, hosts: dict[str, HostSpec], domains: dict[str, DomainSpec], home: str) -> PolicyOp:
        r = self.r
        kinds = tuple(k.value for k in PolicyOpKind)
        keys = r.mapping(node, key, kinds)
        if len(keys) != 1:
            raise r.error(node, key, f"an operation is exactly one of: {', '.join(kinds)}")
        kind_name, (_, args_node) = next(iter(keys.items()))
        kind = PolicyOpKind(kind_name)
        args = r.mapping(args_node, f"{key}.{kind_name}", POLICY_OP_KEYS)
        if "to" not in args:
            raise r.error(args_node, f"{key}.{kind_name}.to", "missing")
        to = self.policy_host(args["to"][1], f"{key}.{kind_name}.to", hosts, Role.MEDIA)
        target = hosts[to].domain
        if kind is PolicyOpKind.DUPLICATE and target != home:
            raise r.error(args["to"][1], f"{key}.{kind_name}.to", f"{to} is in domain {target!r}; a duplication stays in {home!r} (use replicate)")
        if kind is PolicyOpKind.REPLICATE:
            if target == home:
                raise r.error(args["to"][1], f"{key}.{kind_name}.to", f"{to} is in the policy's own domain; replicate goes to another domain")
            if home not in domains[target].trusts:
                raise r.error(args["to"][1], f"{key}.{kind_name}.to", f"domain {target!r} does not trust {home!r}; add `trusts: [{home}]` to domains.{target}")
        return PolicyOp(kind, to)

    # -- domains ------------------------------------------------------------------------

    def domains(self, top: dict[str, tuple[Node, Node]]) -> dict[str, DomainSpec]:
        r = self.r
        if "domains" in top:
            for single in ("global_dte_mode", "dte_ignore_image_mode", "retry"):
                if single in top:
                    raise r.error(top[single][0], single, "with `domains:` give this per domain, not at the top level")
            out: dict[str, DomainSpec] = {}
            entries = r.entries(top["domains"][1], "domains")
            if not entries:
                raise r.error(top["domains"][1], "domains", "name at least one domain")
            names = [name for name, _, _ in entries]
            for name, _, node in entries:
                keys = r.mapping(node, f"domains.{name}", DOMAIN_KEYS) if not _empty(node) else {}
                out[name] = self.domain(name, keys, f"domains.{name}", names)
            return out
        return {DEFAULT_DOMAIN: self.domain(DEFAULT_DOMAIN, top, "")}

    def domain(self, name: str, keys: dict[str, tuple[Node, Node]], prefix: str, names: list[str] = ()) -> DomainSpec:
        r = self.r
        dot = f"{prefix}." if prefix else ""
        settings = DomainSettings()
        if "global_dte_mode" in keys:
            settings = replace(settings, global_mode=r.choice(keys["global_dte_mode"][1], f"{dot}global_dte_mode", GlobalMode))
        if "dte_ignore_image_mode" in keys:
            settings = replace(settings, ignore_image_mode=r.choice(keys["dte_ignore_image_mode"][1], f"{dot}dte_ignore_image_mode", IgnoreImageMode))
        trusts: tuple[str, ...] = ()
        if "trusts" in keys:
            trusted = []
            for node in r.sequence(keys["trusts"][1], f"{dot}trusts"):
                other = r.name(node, f"{dot}trusts")
                if other not in names or other == name:
                    valid = ", ".join(n for n in names if n != name) or "none"
                    raise r.error(node, f"{dot}trusts", f"unknown domain {other!r}{_suggest(other, names)}; a domain trusts one of the others: {valid}")
                trusted.append(other)
            trusts = tuple(trusted)
        retry = RetryPolicy()
        if "retry" in keys:
            rk = r.mapping(keys["retry"][1], f"{dot}retry", RETRY_KEYS)
            retry = RetryPolicy(
                attempts=r.integer(rk["attempts"][1], f"{dot}retry.attempts", 1, 10) if "attempts" in rk else 1,
                delay=r.number(rk["delay"][1], f"{dot}retry.delay", 0, 60) if "delay" in rk else 0.0,
            )
        return DomainSpec(name=name, settings=settings, trusts=trusts, retry=retry)

    # -- hosts --------------------------------------------------------------------------

    def hosts(self, node: Node, domains: dict[str, DomainSpec]) -> dict[str, HostSpec]:
        out = {}
        entries = self.r.entries(node, "hosts")
        if not entries:
            raise self.r.error(node, "hosts", "name at least a primary, a media server and a client")
        for name, key_node, value in entries:
            out[name] = self.host(name, key_node, value, domains)
        return out

    def host(self, name: str, key_node: Node, node: Node, domains: dict[str, DomainSpec]) -> HostSpec:
        r = self.r
        key = f"hosts.{name}"
        keys = r.mapping(node, key, HOST_KEYS)
        if "profile" in keys:
            profile = self.profile(keys["profile"][1], f"{key}.profile")
            if "data" in profile and "data" in keys:
                keys["data"] = (keys["data"][0], _merge_mappings(profile["data"][1], keys["data"][1]))
            keys = {**profile, **keys}
        if "role" not in keys:
            raise r.error(node, f"{key}.role", "missing; use one of: primary, media, client")
        role = r.choice(keys["role"][1], f"{key}.role", Role)
        version = r.version(keys["version"][1], f"{key}.version") if "version" in keys else Version.parse(DEFAULT_VERSION)
        if "domain" in keys:
            domain = r.name(keys["domain"][1], f"{key}.domain")
            if domain not in domains:
                raise r.error(keys["domain"][1], f"{key}.domain", f"unknown domain {domain!r}{_suggest(domain, domains)}; domains: {', '.join(domains)}")
        elif len(domains) == 1:
            domain = next(iter(domains))
        else:
            raise r.error(node, f"{key}.domain", f"missing; with several domains each host names one of: {', '.join(domains)}")
        dte_mode = self.host_dte_mode(keys.get("dte_mode", (None, None))[1], f"{key}.dte_mode", role, version)
        data = DataSpec()
        if "data" in keys:
            if role is not Role.CLIENT:
                raise r.error(keys["data"][0], f"{key}.data", "only a client has data to back up")
            data = self.data(keys["data"][1], f"{key}.data")
        return HostSpec(name=name, role=role, version=version, domain=domain, dte_mode=dte_mode, data=data, location=r.loc(key_node))

    def host_dte_mode(self, node: Node | None, key: str, role: Role, version: Version):
        r = self.r
        if node is None:
            return None
        if role is Role.PRIMARY:
            raise r.error(node, key, "a primary server has no DTE mode; set global_dte_mode for the domain instead")
        if not version.at_least(Version.parse("9.1")):
            raise r.error(node, key, f"a host at version {version} (earlier than 9.1) has no DTE mode: it cannot do DTE at all")
        if role is Role.MEDIA:
            if not version.at_least(MEDIA_MODE_MIN_VERSION):
                raise r.error(node, key, f"the media server DTE mode exists from 10.0; this host is {version}")
            return r.choice(node, key, MediaMode)
        return r.choice(node, key, ClientMode)

    def data(self, node: Node, key: str) -> DataSpec:
        r = self.r
        keys = r.mapping(node, key, DATA_KEYS)
        if "path" in keys:
            if "files" in keys or "size" in keys:
                raise r.error(keys["path"][0], f"{key}.path", "give either path (a real folder) or files and size, not both")
            return DataSpec(path=r.text(keys["path"][1], f"{key}.path"))
        default = DataSpec()
        return DataSpec(
            files=r.integer(keys["files"][1], f"{key}.files", 1, 100_000) if "files" in keys else default.files,
            size=r.size(keys["size"][1], f"{key}.size") if "size" in keys else default.size,
        )

    def profile(self, node: Node, key: str) -> dict[str, tuple[Node, Node]]:
        r = self.r
        name = r.name(node, key)
        for folder in self.profile_dirs:
            candidate = folder / f"{name}.yaml"
            if candidate.is_file():
                break
        else:
            searched = ", ".join(str(d) for d in self.profile_dirs) or "(no folders)"
            raise r.error(node, key, f"no host profile {name!r}; looked for {name}.yaml in {searched}")
        try:
            root = _compose(candidate.read_text(encoding="utf-8"), str(candidate))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            raise r.error(node, key, f"cannot read host profile {candidate}: {exc}") from None
        if root is None:
            raise r.error(node, key, f"host profile {candidate} is empty")
        return r.mapping(root, f"profile {name}", tuple(k for k in HOST_KEYS if k != "profile"))

    def check_primaries(self, node: Node, hosts: dict[str, HostSpec], domains: dict[str, DomainSpec]) -> None:
        for domain in domains:
            primaries = [h.name for h in hosts.values() if h.domain == domain and h.role is Role.PRIMARY]
            members = [h for h in hosts.values() if h.domain == domain]
            where = f"domain {domain!r}" if len(domains) > 1 else "the scenario"
            if members and not primaries:
                raise self.r.error(node, "hosts", f"{where} has no primary server (a host with role: primary)")
            if len(primaries) > 1:
                second = hosts[primaries[1]].location
                raise ScenarioError(second, f"hosts.{primaries[1]}.role", f"{where} has more than one primary server: {', '.join(primaries)}")

    # -- steps --------------------------------------------------------------------------

    def steps(self, node: Node, domains: dict[str, DomainSpec], hosts: dict[str, HostSpec],
              policies: dict[str, PolicySpec]) -> list[Step]:
        r = self.r
        items = r.sequence(node, "steps")
        if not items:
            raise r.error(node, "steps", "list at least one step")
        checker = _StepChecker(r, domains, {name: _HostState(spec) for name, spec in hosts.items()}, policies)
        return [checker.step(index, item) for index, item in enumerate(items, start=1)]


def _merge_mappings(base: Node, override: Node) -> Node:
    """A profile's `data:` with the topology's own keys laid over it (each keeps its file/line)."""
    if not (isinstance(base, MappingNode) and isinstance(override, MappingNode)):
        return override
    overridden = {k.value for k, _ in override.value if isinstance(k, ScalarNode)}
    pairs = [(k, v) for k, v in base.value if not (isinstance(k, ScalarNode) and k.value in overridden)]
    return MappingNode(override.tag, pairs + list(override.value), override.start_mark, override.end_mark)


def _empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.value in ("", "~", "null")


class _StepChecker:
    """Builds each step and checks it against the hosts, images and domains so far."""

    def __init__(self, reader: _Reader, domains: dict[str, DomainSpec], hosts: dict[str, _HostState],
                 policies: dict[str, PolicySpec]):
        self.r = reader
        self.domains = domains
        self.hosts = hosts
        self.policies = policies
        self.images: dict[str, list[str]] = {}  # alias -> domains holding it (made in, then imported into)
        self.replicas: set[tuple[str, str]] = set()  # (alias, media server) written by replicate

    def step(self, index: int, node: Node) -> Step:
        r = self.r
        prefix = f"steps[{index}]"
        if not isinstance(node, MappingNode):
            raise r.error(node, prefix, f"a step is a mapping with one of: {', '.join(STEP_KEYS)}")
        allowed = (*STEP_KEYS, "expect")
        keys = r.mapping(node, prefix, allowed)
        ops = [k for k in keys if k in STEP_KEYS]
        if len(ops) != 1:
            found = f" (found {', '.join(ops)})" if ops else ""
            raise r.error(node, prefix, f"a step names exactly one of: {', '.join(STEP_KEYS)}{found}")
        op = ops[0]
        key = f"{prefix}.{op}"
        op_node = keys[op][1]
        args = r.mapping(op_node, key, STEP_KEYS[op]) if not _empty(op_node) else {}
        expect = None
        if "expect" in keys:
            if op in NO_EXPECT:
                raise r.error(keys["expect"][0], f"{prefix}.expect", f"a {op} step runs no job, so it has nothing to expect")
            expect = self.expect(keys["expect"][1], f"{prefix}.expect")
        base = dict(index=index, location=r.loc(keys[op][0]), expect=expect)
        build: Callable[..., Step] = getattr(self, f"_{op}")
        return build(op_node, key, args, base)

    def expect(self, node: Node, key: str) -> Expect:
        r = self.r
        keys = r.mapping(node, key, EXPECT_KEYS)
        expect = Expect(
            status=r.integer(keys["status"][1], f"{key}.status", 0, 99999) if "status" in keys else None,
            fails=r.boolean(keys["fails"][1], f"{key}.fails") if "fails" in keys else None,
            dte=r.choice(keys["dte"][1], f"{key}.dte", DteMode) if "dte" in keys else None,
            verified=r.boolean(keys["verified"][1], f"{key}.verified") if "verified" in keys else None,
        )
        if expect.fails is False and expect.status not in (None, 0):
            raise r.error(node, key, "fails: false contradicts a non-zero status")
        if expect.fails is True and expect.status == 0:
            raise r.error(node, key, "fails: true contradicts status 0")
        if expect.fails is True and expect.dte is not None:
            raise r.error(node, key, "a job that fails moves no data, so it has no DTE mode to expect")
        return expect

    # -- references ---------------------------------------------------------------------

    def required(self, node: Node, key: str, args: dict, name: str) -> tuple[Node, Node]:
        if name not in args:
            raise self.r.error(node, f"{key}.{name}", "missing")
        return args[name]

    def host(self, node: Node, key: str, args: dict, name: str, role: Role | None, optional: bool = False) -> str | None:
        if optional and name not in args:
            return None
        value_node = self.required(node, key, args, name)[1]
        host = self.r.name(value_node, f"{key}.{name}")
        if host not in self.hosts:
            raise self.r.error(value_node, f"{key}.{name}", f"unknown host {host!r}{_suggest(host, self.hosts)}; hosts: {', '.join(self.hosts)}")
        actual = self.hosts[host].spec.role
        if role is not None and actual is not role:
            raise self.r.error(value_node, f"{key}.{name}", f"{host} is a {actual.value}, not a {role.value}")
        return host

    def image(self, node: Node, key: str, args: dict, name: str = "image") -> str:
        value_node = self.required(node, key, args, name)[1]
        return self.image_name(value_node, f"{key}.{name}")

    def image_name(self, value_node: Node, key: str) -> str:
        alias = self.r.name(value_node, key)
        if alias not in self.images:
            known = ", ".join(self.images) or "none yet"
            raise self.r.error(value_node, key, f"no earlier step made an image called {alias!r}{_suggest(alias, self.images)} (images so far: {known}); name one with `as:` on a backup")
        return alias

    def new_alias(self, args: dict, key: str, domain: str) -> str | None:
        if "as" not in args:
            return None
        alias = self.r.name(args["as"][1], f"{key}.as")
        if alias in self.images:
            raise self.r.error(args["as"][1], f"{key}.as", f"an earlier step already made an image called {alias!r}")
        self.images[alias] = [domain]
        return alias

    def same_domain(self, node: Node, key: str, *hosts: str) -> str:
        domains = {self.hosts[h].spec.domain for h in hosts if h}
        if len(domains) > 1:
            raise self.r.error(node, key, f"{', '.join(h for h in hosts if h)} are in different domains ({', '.join(sorted(domains))}); only replicate crosses domains")
        return domains.pop()

    def in_image_domain(self, node: Node, key: str, alias: str, host: str) -> None:
        domain = self.hosts[host].spec.domain
        if domain not in self.images[alias]:
            held = " and ".join(repr(d) for d in self.images[alias])
            raise self.r.error(node, key, f"image {alias!r} lives in domain {held}, but {host} is in {domain!r}; replicate and import it first")

    # -- step kinds ---------------------------------------------------------------------

    def _backup(self, node, key, args, base) -> Step:
        r = self.r
        client = self.host(node, key, args, "client", Role.CLIENT)
        media = self.host(node, key, args, "media", Role.MEDIA)
        domain = self.same_domain(node, key, client, media)
        kind = r.choice(args["kind"][1], f"{key}.kind", BackupKind) if "kind" in args else BackupKind.FULL
        policy = r.choice(args["policy_type"][1], f"{key}.policy_type", PolicyType) if "policy_type" in args else PolicyType.STANDARD
        alias = self.new_alias(args, key, domain)
        return BackupStep(**base, client=client, media=media, alias=alias, kind=kind, policy_type=policy)

    def _policy(self, node, key, args, base) -> Step:
        r = self.r
        name_node = self.required(node, key, args, "name")[1]
        name = r.name(name_node, f"{key}.name")
        if name not in self.policies:
            known = ", ".join(self.policies) or "none (add a `policies:` section)"
            raise r.error(name_node, f"{key}.name", f"no policy {name!r}{_suggest(name, self.policies)}; policies: {known}")
        policy = self.policies[name]
        kind = r.choice(args["kind"][1], f"{key}.kind", BackupKind) if "kind" in args else BackupKind.FULL
        alias = self.new_alias(args, key, self.hosts[policy.media].spec.domain)
        if alias:
            for op in policy.operations:  # a replication is followed by its import
                if op.kind is PolicyOpKind.REPLICATE:
                    self.images[alias].append(self.hosts[op.to].spec.domain)
        return PolicyStep(**base, policy=name, alias=alias, kind=kind)

    def _restore(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        to = self.host(node, key, args, "to", Role.CLIENT)
        media = self.host(node, key, args, "from", Role.MEDIA, optional=True)
        self.in_image_domain(node, key, alias, to)
        return RestoreStep(**base, image=alias, to=to, media=media)

    def _duplicate(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        to = self.host(node, key, args, "to", Role.MEDIA)
        media = self.host(node, key, args, "from", Role.MEDIA, optional=True)
        self.in_image_domain(node, key, alias, to)
        return DuplicateStep(**base, image=alias, to=to, media=media)

    def _verify(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        media = self.host(node, key, args, "media", Role.MEDIA, optional=True)
        if media:
            self.in_image_domain(node, key, alias, media)
        return VerifyStep(**base, image=alias, media=media)

    def _replicate(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        to = self.host(node, key, args, "to", Role.MEDIA)
        media = self.host(node, key, args, "from", Role.MEDIA, optional=True)
        target_domain = self.hosts[to].spec.domain
        if media:
            self.in_image_domain(node, key, alias, media)
        source_domain = self.hosts[media].spec.domain if media else self.images[alias][0]
        if target_domain == source_domain:
            raise self.r.error(args["to"][1], f"{key}.to", f"{to} is in the image's own domain {source_domain!r}; replicate goes to another domain (use duplicate within one)")
        if source_domain not in self.domains[target_domain].trusts:
            raise self.r.error(args["to"][1], f"{key}.to", f"domain {target_domain!r} does not trust {source_domain!r}; add `trusts: [{source_domain}]` to domains.{target_domain}")
        self.replicas.add((alias, to))
        return ReplicateStep(**base, image=alias, to=to, media=media)

    def _import(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        media = self.host(node, key, args, "media", Role.MEDIA)
        if (alias, media) not in self.replicas:
            raise self.r.error(args["media"][1], f"{key}.media", f"no earlier replicate step sent {alias!r} to {media}")
        domain = self.hosts[media].spec.domain
        if domain not in self.images[alias]:
            self.images[alias].append(domain)
        return ImportStep(**base, image=alias, media=media)

    def _synthetic(self, node, key, args, base) -> Step:
        r = self.r
        images_node = self.required(node, key, args, "images")[1]
        images = tuple(self.image_name(n, f"{key}.images") for n in r.sequence(images_node, f"{key}.images"))
        if not images:
            raise r.error(images_node, f"{key}.images", "name the full image and its incrementals")
        media = self.host(node, key, args, "media", Role.MEDIA)
        for alias in images:
            self.in_image_domain(images_node, f"{key}.images", alias, media)
        alias = self.new_alias(args, key, self.hosts[media].spec.domain)
        return SyntheticStep(**base, images=images, media=media, alias=alias)

    def _set(self, node, key, args, base) -> Step:
        r = self.r
        host = self.host(node, key, args, "host", None, optional=True)
        if host is None:
            for host_only in ("dte_mode", "version"):
                if host_only in args:
                    raise r.error(args[host_only][0], f"{key}.{host_only}", "this is a host setting; say which `host:`")
            domain = None
            if "domain" in args:
                domain = r.name(args["domain"][1], f"{key}.domain")
                if domain not in self.domains:
                    raise r.error(args["domain"][1], f"{key}.domain", f"unknown domain {domain!r}; domains: {', '.join(self.domains)}")
            elif len(self.domains) > 1:
                raise r.error(node, f"{key}.domain", f"with several domains, say which: {', '.join(self.domains)}")
            global_mode = r.choice(args["global_dte_mode"][1], f"{key}.global_dte_mode", GlobalMode) if "global_dte_mode" in args else None
            ignore = r.choice(args["dte_ignore_image_mode"][1], f"{key}.dte_ignore_image_mode", IgnoreImageMode) if "dte_ignore_image_mode" in args else None
            if global_mode is None and ignore is None:
                raise r.error(node, key, "set nothing; give global_dte_mode or dte_ignore_image_mode (or host: with dte_mode / version)")
            return SetStep(**base, domain=domain, global_mode=global_mode, ignore_image_mode=ignore)
        for domain_only in ("domain", "global_dte_mode", "dte_ignore_image_mode"):
            if domain_only in args:
                raise r.error(args[domain_only][0], f"{key}.{domain_only}", "a domain setting; put it in its own set step without host:")
        state = self.hosts[host]
        version = r.version(args["version"][1], f"{key}.version") if "version" in args else None
        if version is not None:
            state.spec = replace(state.spec, version=version)
        dte_mode = None
        if "dte_mode" in args:
            dte_mode = self.builder_host_mode(args["dte_mode"][1], f"{key}.dte_mode", state.spec)
        if version is None and dte_mode is None:
            raise r.error(node, key, f"set nothing for {host}; give dte_mode or version")
        return SetStep(**base, host=host, dte_mode=dte_mode, version=version)

    def builder_host_mode(self, node: Node, key: str, spec: HostSpec):
        return _ScenarioBuilder(self.r, ()).host_dte_mode(node, key, spec.role, spec.version)

    def _image_dte_mode(self, node, key, args, base) -> Step:
        alias = self.image(node, key, args)
        mode_node = self.required(node, key, args, "mode")[1]
        return ImageDteModeStep(**base, image=alias, mode=self.r.choice(mode_node, f"{key}.mode", DteMode))

    def _mutate(self, node, key, args, base) -> Step:
        client = self.host(node, key, args, "client", Role.CLIENT)
        files = self.r.integer(self.required(node, key, args, "files")[1], f"{key}.files", 1, 100_000)
        return MutateStep(**base, client=client, files=files)

    def link(self, node: Node, key: str) -> tuple[str, str]:
        ends = self.r.sequence(node, key)
        if len(ends) != 2:
            raise self.r.error(node, key, "a link is two hosts: [client-or-media, media]")
        names = []
        for end in ends:
            name = self.r.name(end, key)
            if name not in self.hosts:
                raise self.r.error(end, key, f"unknown host {name!r}{_suggest(name, self.hosts)}")
            names.append(name)
        return names[0], names[1]

    def _fault(self, node, key, args, base) -> Step:
        r = self.r
        kind = r.choice(self.required(node, key, args, "kind")[1], f"{key}.kind", FaultKind)
        host = self.host(node, key, args, "host", None, optional=True)
        link = self.link(args["link"][1], f"{key}.link") if "link" in args else None
        after = r.size(args["after"][1], f"{key}.after") if "after" in args else None
        needs_host = kind in (FaultKind.CRASH, FaultKind.DISK_FULL, FaultKind.VOLUME_DOWN)
        if needs_host and (host is None or link is not None):
            raise r.error(node, key, f"a {kind.value} fault names one `host:`")
        if needs_host and kind is not FaultKind.CRASH and self.hosts[host].spec.role is not Role.MEDIA:
            raise r.error(args["host"][1], f"{key}.host", f"{kind.value} applies to a media server's storage")
        if kind is FaultKind.CUT and (link is None or host is not None):
            raise r.error(node, key, "a cut fault names one `link: [a, b]`")
        if kind is FaultKind.BROKER_DOWN and (host or link):
            raise r.error(node, key, "a broker_down fault names no host or link")
        if after is not None and kind not in (FaultKind.CUT, FaultKind.CRASH):
            raise r.error(args["after"][0], f"{key}.after", "only cut and crash faults can strike mid-transfer")
        return FaultStep(**base, kind=kind, host=host, link=link, after_bytes=after)

    def _heal(self, node, key, args, base) -> Step:
        host = self.host(node, key, args, "host", None, optional=True)
        link = self.link(args["link"][1], f"{key}.link") if "link" in args else None
        broker = self.r.boolean(args["broker"][1], f"{key}.broker") if "broker" in args else False
        if sum(map(bool, (host, link, broker))) != 1:
            raise self.r.error(node, key, "heal names exactly one of: host, link, broker: true")
        return HealStep(**base, host=host, link=link, broker=broker)
