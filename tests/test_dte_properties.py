"""Properties of fabric.dte that must hold for every setting, host line-up and operation.

Where test_dte_tables.py checks the reference's tables cell by cell, this file draws
random domain settings, hosts (each role, versions from 8.3 to 11.0, valid DTE modes)
and operations, and checks rules that follow from the reference as a whole:

- under Enforced nothing is ever sent in plaintext (§3.1, every §6 table);
- with image DTE mode On and DTE_IGNORE_IMAGE_MODE = NEVER, no operation on the image
  is plaintext (§7.1, §7.4);
- ALWAYS gives exactly the image-Off answer (§6.3 "as per the table - image DTE mode Off");
- upgrading a host to 10.5 never turns an encrypted job into a failed one;
- every failure has a cause with its own 83xx status, and only failures have a cause;
- restore with image Off decides like backup (§6.2), Universal Share like a backup from
  an Automatic client (§6.1 vs §6.8), import like verify ([I] §6.7);
- only DTE-capable line-ups encrypt (replication to/from hosts < 9.1 excepted, §6.4);
- duplication and replication do not depend on which side is the source, synthetic
  does not depend on the order of images or media servers;
- decisions are deterministic, and every function is total over the whole input space,
  including host/mode combinations the reference calls invalid;
- copy hierarchical mode, image mode, TLS negotiation and Version invariants (§7, §9.3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.dte import (
    ClientMode,
    Decision,
    DomainSettings,
    DteMode,
    FailCause,
    GlobalMode,
    Host,
    IgnoreImageMode,
    MediaMode,
    Operation,
    Outcome,
    Role,
    Version,
    copy_attributes,
    decide_backup,
    decide_duplication,
    decide_import,
    decide_replication,
    decide_restore,
    decide_synthetic,
    decide_universal_share_backup,
    decide_verify,
    image_dte_mode,
    negotiated_tls_version,
)
from fabric.status import Status, for_dte_failure

# Local to this file: other test modules keep their own Hypothesis settings.
PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VERSIONS = ["8.3", "9.0", "9.1", "10.0", "10.0.0.1", "10.4", "10.5", "11.0"]
DTE_MIN = Version.parse("9.1")
MEDIA_MODE_MIN = Version.parse("10.0")
AUTOMATIC_MIN = Version.parse("10.0")
UPGRADE = Version.parse("10.5")

versions = st.sampled_from(VERSIONS).map(Version.parse)
domain_settings = st.builds(DomainSettings, st.sampled_from(GlobalMode), st.sampled_from(IgnoreImageMode))


def valid_client_mode(version: Version) -> st.SearchStrategy:
    """A 9.1+ client may set DTE_CLIENT_MODE or leave the default; older clients have none."""
    return st.sampled_from([None, *ClientMode]) if version >= DTE_MIN else st.just(None)


def valid_media_mode(version: Version) -> st.SearchStrategy:
    """The media server DTE setting exists from 10.0 (default On)."""
    return st.sampled_from([None, *MediaMode]) if version >= MEDIA_MODE_MIN else st.just(None)


@st.composite
def clients(draw, name: str = "client-x") -> Host:
    version = draw(versions)
    return Host(name, Role.CLIENT, version, draw(valid_client_mode(version)))


@st.composite
def media_servers(draw, name: str) -> Host:
    version = draw(versions)
    return Host(name, Role.MEDIA, version, draw(valid_media_mode(version)))


@st.composite
def any_hosts(draw, name: str) -> Host:
    """Any role, any version, any mode of either kind (including invalid combinations)."""
    role = draw(st.sampled_from(Role))
    version = Version(tuple(draw(st.lists(st.integers(0, 20), min_size=1, max_size=4))))
    mode = draw(st.sampled_from([None, *ClientMode, *MediaMode]))
    return Host(name, role, version, mode)


@dataclass(frozen=True)
class Call:
    """One decision to make: an operation, its hosts and the image DTE mode(s) it carries."""

    op: Operation
    client: Host | None
    media: tuple[Host, ...]
    components: tuple[bool, ...]  # image DTE mode of each image involved (one, except synthetic)

    @property
    def image_on(self) -> bool:
        return any(self.components)

    def run(self, s: DomainSettings) -> Outcome:
        op, c, m, image_on = self.op, self.client, self.media, self.image_on
        if op is Operation.BACKUP:
            return decide_backup(s, c, m[0])
        if op is Operation.UNIVERSAL_SHARE_BACKUP:
            return decide_universal_share_backup(s, m[0])
        if op is Operation.RESTORE:
            return decide_restore(s, image_on, c, list(m))
        if op is Operation.DUPLICATION:
            return decide_duplication(s, image_on, m[0], m[1])
        if op is Operation.VERIFY:
            return decide_verify(s, image_on, m[0])
        if op is Operation.IMPORT:
            return decide_import(s, image_on, m[0])
        if op is Operation.REPLICATION:
            return decide_replication(s, image_on, m[0], m[1])
        if op is Operation.SYNTHETIC:
            return decide_synthetic(s, list(self.components), list(m))
        raise AssertionError(op)

    def with_image(self, on: bool) -> "Call":
        if self.op is Operation.SYNTHETIC and on:
            return replace(self, components=(True, *self.components[1:]))
        return replace(self, components=tuple(on for _ in self.components))

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (*([self.client] if self.client else []), *self.media)

    def with_host(self, index: int, host: Host) -> "Call":
        if self.client is not None:
            if index == 0:
                return replace(self, client=host)
            index -= 1
        media = list(self.media)
        media[index] = host
        return replace(self, media=tuple(media))

    @property
    def is_backup(self) -> bool:
        return self.op in (Operation.BACKUP, Operation.UNIVERSAL_SHARE_BACKUP)


MEDIA_NAMES = ("media-a", "media-b", "media-c")
HAS_CLIENT = {Operation.BACKUP, Operation.RESTORE}
MEDIA_COUNT = {
    Operation.BACKUP: (1, 1),
    Operation.UNIVERSAL_SHARE_BACKUP: (1, 1),
    Operation.RESTORE: (1, 3),
    Operation.DUPLICATION: (2, 2),
    Operation.VERIFY: (1, 1),
    Operation.IMPORT: (1, 1),
    Operation.REPLICATION: (2, 2),
    Operation.SYNTHETIC: (1, 3),
}


@st.composite
def calls(draw, ops=tuple(Operation), client_strategy=clients, media_strategy=media_servers) -> Call:
    op = draw(st.sampled_from(ops))
    low, high = MEDIA_COUNT[op]
    count = draw(st.integers(low, high))
    media = tuple(draw(media_strategy(MEDIA_NAMES[i])) for i in range(count))
    client = draw(client_strategy("client-x")) if op in HAS_CLIENT else None
    if op in (Operation.BACKUP, Operation.UNIVERSAL_SHARE_BACKUP):
        components: tuple[bool, ...] = (False,)
    elif op is Operation.SYNTHETIC:
        components = tuple(draw(st.lists(st.booleans(), min_size=1, max_size=4)))
    else:
        components = (draw(st.booleans()),)
    return Call(op, client, media, components)


AFTER_BACKUP = tuple(op for op in Operation if op not in (Operation.BACKUP, Operation.UNIVERSAL_SHARE_BACKUP))


def capable(host: Host) -> bool:
    return host.version >= DTE_MIN


def media_off(host: Host) -> bool:
    return host.role is Role.MEDIA and host.version >= MEDIA_MODE_MIN and host.dte_mode is MediaMode.OFF


# --------------------------------------------------------------------------------------
# The rules the brief asks for
# --------------------------------------------------------------------------------------


@PROFILE
@given(calls(), st.sampled_from(IgnoreImageMode))
def test_enforced_is_never_plaintext(call: Call, ignore: IgnoreImageMode) -> None:
    """§3.1: Enforced encrypts or fails the job; no operation goes out in plaintext."""
    outcome = call.run(DomainSettings(GlobalMode.ENFORCED, ignore))
    assert outcome.decision is not Decision.PLAINTEXT, outcome.reason


@PROFILE
@given(calls(AFTER_BACKUP), st.sampled_from(GlobalMode))
def test_image_on_and_never_is_never_plaintext(call: Call, global_mode: GlobalMode) -> None:
    """§7.1/§7.4: an image whose DTE mode is On is always encrypted or the job fails."""
    outcome = call.with_image(True).run(DomainSettings(global_mode, IgnoreImageMode.NEVER))
    assert outcome.decision is not Decision.PLAINTEXT, outcome.reason


@PROFILE
@given(calls(AFTER_BACKUP), st.sampled_from(GlobalMode))
def test_always_is_exactly_the_image_off_answer(call: Call, global_mode: GlobalMode) -> None:
    """§6.3: "If DTE_IGNORE_IMAGE_MODE is set to ALWAYS, the DTE decision is as per the
    table - The image DTE mode is Off" (the same holds in every image-On table)."""
    s = DomainSettings(global_mode, IgnoreImageMode.ALWAYS)
    on, off = call.with_image(True).run(s), call.with_image(False).run(s)
    assert (on.decision, on.cause) == (off.decision, off.cause), (on, off)


@PROFILE
@given(calls(tuple(op for op in AFTER_BACKUP if op is not Operation.REPLICATION)), st.sampled_from(GlobalMode))
def test_where_unsupported_with_a_host_before_9_1_is_the_image_off_answer(call: Call, global_mode: GlobalMode) -> None:
    """§7.4 / the "earlier than 9.1" rows of §6.3, 6.5, 6.6: WHERE_UNSUPPORTED ignores the
    image mode where a host cannot do DTE (N under Preferred Off/On, F under Enforced)."""
    if all(capable(h) for h in call.hosts) or any(media_off(m) for m in call.media):
        return
    s = DomainSettings(global_mode, IgnoreImageMode.WHERE_UNSUPPORTED)
    assert call.with_image(True).run(s).decision is call.with_image(False).run(s).decision


@PROFILE
@given(calls(), domain_settings, st.data())
def test_upgrading_a_host_to_10_5_never_turns_encrypt_into_fail(call: Call, s: DomainSettings, data) -> None:
    before = call.run(s)
    index = data.draw(st.integers(0, len(call.hosts) - 1), label="host")
    host = call.hosts[index]
    mode = host.dte_mode  # every drawn mode stays valid on 10.5
    upgraded = call.with_host(index, Host(host.name, host.role, UPGRADE, mode))
    after = upgraded.run(s)
    if before.decision is Decision.ENCRYPT:
        assert after.decision is not Decision.FAIL, (before, after)


@PROFILE
@given(calls(), domain_settings)
def test_only_failures_have_a_cause_and_it_maps_to_an_83xx_status(call: Call, s: DomainSettings) -> None:
    outcome = call.run(s)
    if outcome.decision is Decision.FAIL:
        assert isinstance(outcome.cause, FailCause), outcome
        status = for_dte_failure(outcome.cause.name)
        assert 8300 <= int(status) <= 8399
        assert status.name == outcome.cause.name
    else:
        assert outcome.cause is None, outcome
    assert outcome.reason.strip()


def test_every_cause_has_a_distinct_status() -> None:
    statuses = [for_dte_failure(cause.name) for cause in FailCause]
    assert all(cause.name in Status.__members__ for cause in FailCause)
    assert len(set(statuses)) == len(statuses) == len(FailCause)
    assert len({cause.value for cause in FailCause}) == len(FailCause)


@PROFILE
@given(calls(), domain_settings)
def test_decisions_are_deterministic(call: Call, s: DomainSettings) -> None:
    # Same call twice, and again with equal but freshly built hosts and settings.
    rebuilt = Call(
        call.op,
        None if call.client is None else Host(call.client.name, call.client.role, call.client.version, call.client.dte_mode),
        tuple(Host(m.name, m.role, m.version, m.dte_mode) for m in call.media),
        tuple(call.components),
    )
    first = call.run(s)
    assert call.run(s) == first
    assert rebuilt.run(DomainSettings(s.global_mode, s.ignore_image_mode)) == first


@PROFILE
@given(calls(client_strategy=any_hosts, media_strategy=any_hosts), domain_settings)
def test_every_decision_is_total(call: Call, s: DomainSettings) -> None:
    """Any role in any position, any version, any mode: an Outcome, never an exception."""
    outcome = call.run(s)
    assert isinstance(outcome, Outcome) and isinstance(outcome.decision, Decision)


@PROFILE
@given(st.lists(any_hosts("media-a"), max_size=3), domain_settings, st.lists(st.booleans(), max_size=3), any_hosts("c"))
def test_list_taking_functions_are_total_on_empty_and_odd_input(media, s, components, client) -> None:
    assert isinstance(decide_synthetic(s, components, media), Outcome)
    assert isinstance(decide_restore(s, bool(components), client, media), Outcome)
    copy, hierarchical = copy_attributes(True, media, None)
    assert isinstance(copy, DteMode) and isinstance(hierarchical, DteMode)


# --------------------------------------------------------------------------------------
# More rules that follow from the reference
# --------------------------------------------------------------------------------------


@PROFILE
@given(calls(), domain_settings)
def test_a_failure_names_a_host_of_the_job(call: Call, s: DomainSettings) -> None:
    """A failed job says which host blocked it (§8.2 messages name the media server)."""
    outcome = call.run(s)
    if outcome.fails:
        assert any(h.name in outcome.reason for h in call.hosts), outcome.reason


@PROFILE
@given(calls((Operation.BACKUP, Operation.RESTORE)), st.sampled_from(GlobalMode), st.sampled_from(["9.1", "10.0", "10.5"]))
def test_client_on_with_capable_media_on_encrypts(call: Call, global_mode: GlobalMode, version: str) -> None:
    """§4: a client set On is encrypted in every global mode when the media servers can
    (9.1+, DTE On) - first column of the §6.1 media-On table (and §6.2 image Off)."""
    client = Host("client-x", Role.CLIENT, Version.parse(version), ClientMode.ON)
    call = replace(call.with_image(False), client=client)
    if not all(capable(m) and not media_off(m) for m in call.media):
        return
    outcome = call.run(DomainSettings(global_mode))
    assert outcome.decision is Decision.ENCRYPT, outcome.reason


@PROFILE
@given(calls(AFTER_BACKUP + (Operation.BACKUP,)), domain_settings)
def test_an_unset_client_mode_is_the_version_default(call: Call, s: DomainSettings) -> None:
    """§2/§4 [S]: 9.1 clients default to Off, 10.0+ clients to Automatic."""
    if call.client is None or not capable(call.client) or call.client.dte_mode is not None:
        return
    default = ClientMode.AUTOMATIC if call.client.version >= AUTOMATIC_MIN else ClientMode.OFF
    explicit = replace(call, client=replace(call.client, dte_mode=default))
    assert call.run(s).decision is explicit.run(s).decision


@PROFILE
@given(clients(), media_servers("media-a"), domain_settings)
def test_restore_of_image_off_decides_like_backup(client: Host, media: Host, s: DomainSettings) -> None:
    """§6.2 [S]: image DTE mode Off is identical to the two backup tables."""
    assert decide_restore(s, False, client, [media]).decision is decide_backup(s, client, media).decision


@PROFILE
@given(media_servers("media-a"), domain_settings, st.sampled_from(["10.0", "10.5", "11.0"]))
def test_universal_share_decides_like_an_automatic_client(media: Host, s: DomainSettings, version: str) -> None:
    """§6.8's table equals §6.1's "client Automatic" and "earlier than 9.1" columns."""
    automatic = Host("client-x", Role.CLIENT, Version.parse(version), ClientMode.AUTOMATIC)
    assert decide_universal_share_backup(s, media).decision is decide_backup(s, automatic, media).decision


@PROFILE
@given(media_servers("media-a"), domain_settings, st.booleans())
def test_import_decides_like_verify(media: Host, s: DomainSettings, image_on: bool) -> None:
    """[I] §6.7: import follows the Verify table."""
    assert decide_import(s, image_on, media) == decide_verify(s, image_on, media)


@PROFILE
@given(calls(), domain_settings)
def test_only_dte_capable_lineups_encrypt(call: Call, s: DomainSettings) -> None:
    """Every E cell of §6.1–6.8 has all hosts 9.1+ and no media server DTE Off, except
    replication, which §6.4 encrypts through MSDP even with a media server before 9.1."""
    outcome = call.run(s)
    if outcome.decision is not Decision.ENCRYPT:
        return
    assert not any(media_off(m) for m in call.media), outcome.reason
    if call.op is not Operation.REPLICATION:
        assert all(capable(h) for h in call.hosts), outcome.reason


@PROFILE
@given(calls(tuple(op for op in Operation if op is not Operation.REPLICATION)), st.sampled_from(IgnoreImageMode))
def test_enforced_with_a_host_before_9_1_fails(call: Call, ignore: IgnoreImageMode) -> None:
    """§3.1: under Enforced "jobs fail ... for the hosts earlier than 9.1" (replication aside, §6.4)."""
    if all(capable(h) for h in call.hosts):
        return
    outcome = call.run(DomainSettings(GlobalMode.ENFORCED, ignore))
    assert outcome.decision is Decision.FAIL, outcome.reason


@PROFILE
@given(calls((Operation.BACKUP, Operation.RESTORE)), domain_settings)
def test_preferred_off_with_image_off_encrypts_only_for_client_on(call: Call, s: DomainSettings) -> None:
    """§3.1: Preferred Off disables DTE unless the client's DTE mode is On."""
    s = DomainSettings(GlobalMode.PREFERRED_OFF, s.ignore_image_mode)
    outcome = call.with_image(False).run(s)
    if outcome.decision is Decision.ENCRYPT:
        assert call.client.client_mode is ClientMode.ON


@PROFILE
@given(calls((Operation.VERIFY, Operation.DUPLICATION, Operation.SYNTHETIC, Operation.REPLICATION,
              Operation.IMPORT, Operation.UNIVERSAL_SHARE_BACKUP)), st.sampled_from(IgnoreImageMode))
def test_clientless_image_off_under_preferred_off_is_plaintext(call: Call, ignore: IgnoreImageMode) -> None:
    """First row of every clientless image-Off table (§6.3–6.8): N N N."""
    outcome = call.with_image(False).run(DomainSettings(GlobalMode.PREFERRED_OFF, ignore))
    assert outcome.decision is Decision.PLAINTEXT, outcome.reason


@PROFILE
@given(calls((Operation.DUPLICATION, Operation.REPLICATION)), domain_settings)
def test_pair_operations_do_not_depend_on_direction(call: Call, s: DomainSettings) -> None:
    """§6.3/§6.4 speak of "both media servers" / "one of the media servers"."""
    swapped = replace(call, media=tuple(reversed(call.media)))
    assert call.run(s).decision is swapped.run(s).decision


@PROFILE
@given(calls((Operation.SYNTHETIC,)), domain_settings, st.randoms(use_true_random=False))
def test_synthetic_does_not_depend_on_order(call: Call, s: DomainSettings, rnd) -> None:
    """§6.6: "any one of the images On"; "all / any media server" - sets, not sequences."""
    media, components = list(call.media), list(call.components)
    rnd.shuffle(media)
    rnd.shuffle(components)
    assert decide_synthetic(s, components, media).decision is call.run(s).decision


@PROFILE
@given(clients(), media_servers("media-a"), domain_settings)
def test_image_mode_after_backup_is_on_iff_encrypted(client: Host, media: Host, s: DomainSettings) -> None:
    """§6.1 / D-IMGMOD: image DTE mode = On iff the backup was encrypted."""
    outcome = decide_backup(s, client, media)
    assert image_dte_mode(outcome.encrypts, media) is DteMode.of(outcome.encrypts)


@PROFILE
@given(st.lists(st.tuples(st.booleans(), st.lists(versions, min_size=1, max_size=2)), min_size=1, max_size=6))
def test_copy_hierarchical_is_the_and_of_the_chain(chain) -> None:
    """§7.1: hierarchical On iff this copy and every parent copy were written securely;
    copy DTE mode is Off when a media server involved is earlier than 10.0."""
    parent = None
    secure_so_far = True
    for encrypted, vs in chain:
        servers = [Host(f"media-{i}", Role.MEDIA, v) for i, v in enumerate(vs)]
        copy, hierarchical = copy_attributes(encrypted, servers, parent)
        own = encrypted and all(v >= MEDIA_MODE_MIN for v in vs)
        secure_so_far = secure_so_far and own
        assert copy is DteMode.of(own)
        assert hierarchical is DteMode.of(secure_so_far)
        parent = hierarchical.is_on


@PROFILE
@given(versions, versions)
def test_tls_negotiation(a: Version, b: Version) -> None:
    """§9.3: TLS 1.3 iff both hosts are 10.5+ [S default, I negotiation]; symmetric."""
    ha, hb = Host("a", Role.MEDIA, a), Host("b", Role.CLIENT, b)
    expected = "TLSv1.3" if a >= UPGRADE and b >= UPGRADE else "TLSv1.2"
    assert negotiated_tls_version(ha, hb) == negotiated_tls_version(hb, ha) == expected


version_texts = st.lists(st.integers(0, 99), min_size=1, max_size=4).map(lambda ps: ".".join(map(str, ps)))


@PROFILE
@given(version_texts, version_texts)
def test_version_order_is_numeric_with_trailing_zeros_ignored(a: str, b: str) -> None:
    def key(text: str) -> tuple[int, ...]:
        parts = [int(p) for p in text.split(".")]
        return tuple(parts + [0] * (4 - len(parts)))

    va, vb = Version.parse(a), Version.parse(b)
    assert (va < vb) == (key(a) < key(b))
    assert (va == vb) == (key(a) == key(b))
    assert Version.parse(str(va)) == va
