"""The DTE rules: who encrypts, who sends plaintext, and who fails, for every operation.

Pure functions of modes, host capabilities and image mode (reference §6), sans-I/O like
h11: no sockets, no asyncio, and no import from the rest of fabric.

Every cell the reference marks [S] is reproduced as documented. Every cell it marks [I]
(inferred) is decided in exactly one place: the `INFERRED_*` constants and the functions
whose docstring begins with "[I]". Search for "[I]" to review them all.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable


class GlobalMode(enum.Enum):
    """The domain-wide setting on the primary server (reference §3)."""

    PREFERRED_OFF = "preferred_off"
    PREFERRED_ON = "preferred_on"
    ENFORCED = "enforced"

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").title()


class ClientMode(enum.Enum):
    """`DTE_CLIENT_MODE` on a 9.1+ client (reference §4)."""

    AUTOMATIC = "automatic"
    ON = "on"
    OFF = "off"


class MediaMode(enum.Enum):
    """A media server's DTE mode, a setting that exists from 10.0 (reference §5)."""

    ON = "on"
    OFF = "off"


class DteMode(enum.Enum):
    """What a job, an image or a copy really was: encrypted in transit or not."""

    ON = "on"
    OFF = "off"

    @classmethod
    def of(cls, encrypted: bool) -> "DteMode":
        return cls.ON if encrypted else cls.OFF

    @property
    def is_on(self) -> bool:
        return self is DteMode.ON


class IgnoreImageMode(enum.Enum):
    """`DTE_IGNORE_IMAGE_MODE` on the NetBackup servers (reference §7.4)."""

    NEVER = "never"
    WHERE_UNSUPPORTED = "where_unsupported"
    ALWAYS = "always"


class Decision(enum.Enum):
    ENCRYPT = "encrypt"
    PLAINTEXT = "plaintext"
    FAIL = "fail"


class Operation(enum.Enum):
    BACKUP = "backup"
    UNIVERSAL_SHARE_BACKUP = "universal_share_backup"
    RESTORE = "restore"
    DUPLICATION = "duplicate"
    VERIFY = "verify"
    REPLICATION = "replicate"
    IMPORT = "import"
    SYNTHETIC = "synthetic"


class FailCause(enum.Enum):
    """Why DTE made a job fail: one cause per status code (fabric.status maps by name)."""

    ENFORCED_MEDIA_UNSUPPORTED = "enforced_media_unsupported"
    ENFORCED_CLIENT_UNSUPPORTED = "enforced_client_unsupported"
    ENFORCED_CLIENT_OFF = "enforced_client_off"
    ENFORCED_MEDIA_OFF = "enforced_media_off"
    CLIENT_ON_MEDIA_OFF = "client_on_media_off"
    RESTORE_CLIENT_ON_MEDIA_OFF = "restore_client_on_media_off"
    IMAGE_ON_CLIENT_UNSUPPORTED = "image_on_client_unsupported"
    IMAGE_ON_MEDIA_UNSUPPORTED = "image_on_media_unsupported"
    IMAGE_ON_MEDIA_OFF = "image_on_media_off"


# --------------------------------------------------------------------------------------
# Versions and host capability (reference §2 "Key version thresholds")
# --------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")


@dataclass(frozen=True, order=True)
class Version:
    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "Version":
        text = str(text).strip()
        if not _VERSION_RE.fullmatch(text):
            raise ValueError(f"not a NetBackup version: {text!r} (expected e.g. 9.0, 10.5 or 10.0.0.1)")
        parts = tuple(int(p) for p in text.split("."))
        while len(parts) > 1 and parts[-1] == 0:
            parts = parts[:-1]
        return cls(parts)

    def __str__(self) -> str:
        shown = self.parts if len(self.parts) > 1 else self.parts + (0,)
        return ".".join(str(p) for p in shown)

    def at_least(self, other: "Version") -> bool:
        return self.parts >= other.parts


DTE_MIN_VERSION = Version.parse("9.1")  # "earlier than 9.1" cannot do DTE at all [S]
MEDIA_MODE_MIN_VERSION = Version.parse("10.0")  # media DTE setting, copy attributes [S]
AUTOMATIC_DEFAULT_VERSION = Version.parse("10.0")  # client default Off on 9.1, Automatic from 10.0 [S]
TLS13_DEFAULT_VERSION = Version.parse("10.5")  # TLS 1.3 is the DTE default from 10.5 [S] KB-TLS13


class Role(enum.Enum):
    PRIMARY = "primary"
    MEDIA = "media"
    CLIENT = "client"


@dataclass(frozen=True)
class Host:
    """What the rules need to know of one participating host."""

    name: str
    role: Role
    version: Version
    # Client: ClientMode; media server: MediaMode; None means "the version's default".
    dte_mode: ClientMode | MediaMode | None = None

    @property
    def supports_dte(self) -> bool:
        return self.version.at_least(DTE_MIN_VERSION)

    @property
    def has_media_mode(self) -> bool:
        return self.version.at_least(MEDIA_MODE_MIN_VERSION)

    @property
    def client_mode(self) -> ClientMode:
        """The client's effective `DTE_CLIENT_MODE` (defaults by version, reference §4)."""
        if isinstance(self.dte_mode, ClientMode):
            return self.dte_mode
        return ClientMode.AUTOMATIC if self.version.at_least(AUTOMATIC_DEFAULT_VERSION) else ClientMode.OFF

    @property
    def media_off(self) -> bool:
        """True only for a 10.0+ media server whose DTE mode is set Off (default On)."""
        return self.has_media_mode and self.dte_mode is MediaMode.OFF

    @property
    def max_tls(self) -> str:
        return "TLSv1.3" if self.version.at_least(TLS13_DEFAULT_VERSION) else "TLSv1.2"


@dataclass(frozen=True)
class DomainSettings:
    global_mode: GlobalMode = GlobalMode.PREFERRED_ON
    ignore_image_mode: IgnoreImageMode = IgnoreImageMode.NEVER


@dataclass(frozen=True)
class Outcome:
    """One job's DTE decision, with the reason a person can read."""

    decision: Decision
    reason: str
    cause: FailCause | None = None

    @property
    def encrypts(self) -> bool:
        return self.decision is Decision.ENCRYPT

    @property
    def fails(self) -> bool:
        return self.decision is Decision.FAIL


def _encrypt(reason: str) -> Outcome:
    return Outcome(Decision.ENCRYPT, reason)


def _plain(reason: str) -> Outcome:
    return Outcome(Decision.PLAINTEXT, reason)


def _fail(cause: FailCause, reason: str) -> Outcome:
    return Outcome(Decision.FAIL, reason, cause)


# --------------------------------------------------------------------------------------
# Inferred choices [I]: every cell the reference could not source is decided here.
# --------------------------------------------------------------------------------------

# [I] §6.2 open question: a restore of an image whose DTE mode is On, NEVER, all hosts
# 9.1+, to a client whose DTE mode is Off. "Subsequent operations always encrypt the
# data for DTE supported hosts" (D-IMGMOD) suggests the image wins: encrypt.
INFERRED_RESTORE_IMAGE_ON_CLIENT_OFF_ENCRYPTS = True

# [I] §6.3: the documented duplication columns are "both media servers On" and "both
# Off"; one On and one Off is not documented. We treat the pair as Off if either is Off
# (the transfer cannot be encrypted end to end).
INFERRED_ANY_MEDIA_OFF_MEANS_OFF = True

# [I] §6.4: the replication table for image On with a media server DTE mode Off was not
# in the available copy; we treat it like duplication (§6.3): NEVER and
# WHERE_UNSUPPORTED fail, ALWAYS falls back to the image-Off table.
# [I] §6.7: no import table exists; import follows the Verify table (§6.5).
INFERRED_IMPORT_FOLLOWS = Operation.VERIFY

# [I] §7.1: the copy DTE attributes are Off when "the media server involved" is earlier
# than 10.0. For a copy we take every media server that moved its bytes (the writer,
# and the reader for duplication/replication) as involved.


def copy_attributes(encrypted: bool, media_servers: Iterable[Host], parent_hierarchical: bool | None) -> tuple[DteMode, DteMode]:
    """[I] formula: (copy_dte_mode, hierarchical_dte_mode) of a copy just written.

    Copy DTE mode is On iff the transfer was encrypted and every media server involved is
    10.0+ (D-IMGVIEW). Hierarchical is this copy's mode AND its parent copy's
    hierarchical mode; a first copy (no parent) has hierarchical = own.
    """
    own = encrypted and all(m.has_media_mode for m in media_servers)
    hierarchical = own if parent_hierarchical is None else (own and parent_hierarchical)
    return DteMode.of(own), DteMode.of(hierarchical)


def image_dte_mode(encrypted: bool, media_server: Host) -> DteMode:
    """An image's DTE mode after its backup: On iff encrypted (D-IMGMOD); always Off when
    the media server involved is earlier than 9.1 (D-IMGVIEW)."""
    return DteMode.of(encrypted and media_server.supports_dte)


# --------------------------------------------------------------------------------------
# The image-Off / global rule (reference §6.12 step 3)
# --------------------------------------------------------------------------------------


def _unsupported_under_global(settings: DomainSettings, client: Host | None, media: list[Host]) -> Outcome | None:
    """Any host earlier than 9.1: plaintext, or fail under Enforced (every §6 table)."""
    for host in [*media, *([client] if client else [])]:
        if host.supports_dte:
            continue
        if settings.global_mode is GlobalMode.ENFORCED:
            cause = FailCause.ENFORCED_MEDIA_UNSUPPORTED if host.role is Role.MEDIA else FailCause.ENFORCED_CLIENT_UNSUPPORTED
            what = "media server" if host.role is Role.MEDIA else "client"
            return _fail(
                cause,
                f"The global data-in-transit encryption is enforced in the NetBackup domain, but it cannot be "
                f"enabled as the {what} {host.name} is version {host.version}, earlier than 9.1.",
            )
        return _plain(f"{host.name} is version {host.version}, earlier than 9.1: no DTE; global mode {settings.global_mode.label}")
    return None


def _media_off(media: list[Host]) -> Host | None:
    off = [m for m in media if m.media_off]
    if not off:
        return None
    if not INFERRED_ANY_MEDIA_OFF_MEANS_OFF and len(off) < len(media):
        return None
    return off[0]


def _global_rule(settings: DomainSettings, client: Host | None, media: list[Host], restore: bool = False) -> Outcome:
    """Image DTE mode Off (or ignored): global x client x media server (§6.1, 6.3, 6.5, 6.6, 6.8).

    `client` is None where the operation has no client or does not check its mode.
    """
    unsupported = _unsupported_under_global(settings, client, media)
    if unsupported:
        return unsupported
    enforced = settings.global_mode is GlobalMode.ENFORCED
    off = _media_off(media)
    if off is not None:
        if enforced:
            return _fail(
                FailCause.ENFORCED_MEDIA_OFF,
                f"The global data-in-transit encryption (DTE) is enforced in the NetBackup domain, but the DTE "
                f"setting is disabled on the media server {off.name} (MEDIA_DTE_MODE = OFF).",
            )
        if client is not None and client.client_mode is ClientMode.ON:
            cause = FailCause.RESTORE_CLIENT_ON_MEDIA_OFF if restore else FailCause.CLIENT_ON_MEDIA_OFF
            return _fail(
                cause,
                f"DTE_CLIENT_MODE = ON on client {client.name}, but the DTE setting is disabled on the media "
                f"server {off.name} (MEDIA_DTE_MODE = OFF).",
            )
        return _plain(f"media server {off.name} has DTE mode Off; global mode {settings.global_mode.label}")
    if client is not None:
        mode = client.client_mode
        if mode is ClientMode.ON:
            return _encrypt(f"DTE_CLIENT_MODE = ON on client {client.name}")
        if mode is ClientMode.OFF:
            if enforced:
                return _fail(
                    FailCause.ENFORCED_CLIENT_OFF,
                    f"The global data-in-transit encryption is enforced in the NetBackup domain, but "
                    f"DTE_CLIENT_MODE = OFF on client {client.name}.",
                )
            return _plain(f"DTE_CLIENT_MODE = OFF on client {client.name}; global mode {settings.global_mode.label}")
        # Automatic follows the global mode.
    if settings.global_mode is GlobalMode.PREFERRED_OFF:
        return _plain(f"global mode Preferred Off{_automatic(client)}")
    hosts = "all hosts" if client is not None else "media servers"
    return _encrypt(f"global mode {settings.global_mode.label}{_automatic(client)}; {hosts} 9.1+ with DTE On")


def _automatic(client: Host | None) -> str:
    return f", DTE_CLIENT_MODE = AUTOMATIC on client {client.name}" if client else ""


# --------------------------------------------------------------------------------------
# The image-On rule (reference §6.12 step 2), honored by every operation after backup
# --------------------------------------------------------------------------------------


def _image_rule(
    settings: DomainSettings,
    image_on: bool,
    client: Host | None,
    media: list[Host],
    restore: bool = False,
) -> Outcome:
    if not image_on:
        return _global_rule(settings, client, media, restore)
    ignore = settings.ignore_image_mode
    if ignore is IgnoreImageMode.ALWAYS:
        # "If DTE_IGNORE_IMAGE_MODE is set to ALWAYS, the DTE decision is as per the
        # table - The image DTE mode is Off." [S] D-DUP
        outcome = _global_rule(settings, client, media, restore)
        return Outcome(outcome.decision, f"image DTE mode On ignored (DTE_IGNORE_IMAGE_MODE = ALWAYS): {outcome.reason}", outcome.cause)
    off = _media_off(media)
    if off is not None:
        # Image On, media server (10.0+) Off: NEVER and WHERE_UNSUPPORTED fail in every
        # global mode [S] D-VERIFY, D-DUP.
        return _fail(
            FailCause.IMAGE_ON_MEDIA_OFF,
            f"The image DTE mode is On, but the DTE setting is disabled on the media server {off.name} "
            f"(MEDIA_DTE_MODE = OFF; DTE_IGNORE_IMAGE_MODE = {ignore.name}).",
        )
    hosts = [*media, *([client] if client else [])]
    old = next((h for h in hosts if not h.supports_dte), None)
    if old is None:
        if client is not None and client.client_mode is ClientMode.OFF and not INFERRED_RESTORE_IMAGE_ON_CLIENT_OFF_ENCRYPTS:
            return _global_rule(settings, client, media, restore)
        return _encrypt(f"image DTE mode On is honored: every host involved supports DTE (DTE_IGNORE_IMAGE_MODE = {ignore.name})")
    if ignore is IgnoreImageMode.NEVER:
        cause = FailCause.IMAGE_ON_MEDIA_UNSUPPORTED if old.role is Role.MEDIA else FailCause.IMAGE_ON_CLIENT_UNSUPPORTED
        return _fail(
            cause,
            f"The image DTE mode is On, but {old.name} is version {old.version}, earlier than 9.1, and "
            f"DTE_IGNORE_IMAGE_MODE = NEVER.",
        )
    # WHERE_UNSUPPORTED: ignore the image mode where a host cannot do DTE.
    outcome = _global_rule(settings, client, media, restore)
    return Outcome(
        outcome.decision,
        f"image DTE mode On ignored for {old.name} (earlier than 9.1, DTE_IGNORE_IMAGE_MODE = WHERE_UNSUPPORTED): {outcome.reason}",
        outcome.cause,
    )


# --------------------------------------------------------------------------------------
# One decision per operation
# --------------------------------------------------------------------------------------


def decide_backup(settings: DomainSettings, client: Host, media: Host) -> Outcome:
    """§6.1 [S]: global x client x media server; a new image, so no image mode."""
    return _global_rule(settings, client, [media])


def decide_universal_share_backup(settings: DomainSettings, media: Host) -> Outcome:
    """§6.8 [S]: the client DTE mode is not checked; only global and media server."""
    return _global_rule(settings, None, [media])


def decide_restore(settings: DomainSettings, image_on: bool, client: Host, media: Iterable[Host]) -> Outcome:
    """§6.2: image Off is the backup table [S]; image On is [I] (see the module's [I] constants)."""
    return _image_rule(settings, image_on, client, list(media), restore=True)


def decide_duplication(settings: DomainSettings, image_on: bool, source: Host, target: Host) -> Outcome:
    """§6.3 [S], media server to media server, no client."""
    return _image_rule(settings, image_on, None, [source, target])


def decide_verify(settings: DomainSettings, image_on: bool, media: Host) -> Outcome:
    """§6.5 [S]: one media server reads the image, no client."""
    return _image_rule(settings, image_on, None, [media])


def decide_import(settings: DomainSettings, image_on: bool, media: Host) -> Outcome:
    """[I] §6.7: no import table is documented; import follows Verify (§6.5), decided by
    the importing domain's settings with the image mode carried over."""
    assert INFERRED_IMPORT_FOLLOWS is Operation.VERIFY
    return decide_verify(settings, image_on, media)


def decide_synthetic(settings: DomainSettings, component_images_on: Iterable[bool], media: Iterable[Host]) -> Outcome:
    """§6.6 [S] (Enforced row with image On [I], same as duplication): the image counts as
    On if any one component image is On."""
    return _image_rule(settings, any(component_images_on), None, list(media))


def decide_replication(settings: DomainSettings, image_on: bool, source: Host, target: Host) -> Outcome:
    """§6.4 [S], decided by the *source* domain's settings (D-REPL).

    Replication differs from duplication for media servers earlier than 9.1: the
    documented outcome is E wherever the domain wants encryption, because MSDP's
    optimized-duplication encryption (OPTDUP_ENCRYPTION) carries it, not NetBackup DTE.
    """
    media = [source, target]
    off = _media_off(media)
    ignore = settings.ignore_image_mode
    if image_on and ignore is not IgnoreImageMode.ALWAYS:
        if off is not None:
            # [I] image On + media Off table not retrieved: treated like §6.3.
            return _image_rule(settings, True, None, media)
        return _encrypt(f"image DTE mode On is honored by replication (DTE_IGNORE_IMAGE_MODE = {ignore.name})")
    prefix = "image DTE mode On ignored (DTE_IGNORE_IMAGE_MODE = ALWAYS): " if image_on else ""
    if settings.global_mode is GlobalMode.PREFERRED_OFF:
        return _plain(f"{prefix}source domain global mode Preferred Off")
    if off is not None:
        if settings.global_mode is GlobalMode.ENFORCED:
            return _global_rule(settings, None, [off])
        return _plain(f"{prefix}media server {off.name} has DTE mode Off; global mode {settings.global_mode.label}")
    old = next((m for m in media if not m.supports_dte), None)
    if old is not None:
        return _encrypt(f"{prefix}{old.name} is earlier than 9.1: replication is encrypted by MSDP (OPTDUP_ENCRYPTION)")
    return _encrypt(f"{prefix}source domain global mode {settings.global_mode.label}; media servers DTE On")


def negotiated_tls_version(a: Host, b: Host) -> str:
    """[I] §9.3: the highest version both hosts allow; a peer before 10.5 forces TLS 1.2."""
    return "TLSv1.3" if a.max_tls == b.max_tls == "TLSv1.3" else "TLSv1.2"
