"""vmq.intent: operators' intent read from a domain XML's vmq metadata, as a table of documents; bad input
everywhere gives named refusals and the defaults, never an exception; the policy leaves a VM that is not
enrolled alone."""

from __future__ import annotations

import pytest

from vmq.intent import (
    NAMESPACE,
    Intent,
    enrolment,
    intent_from_domain_xml,
    intent_xml,
    knobs,
    priority,
)
from vmq.model import Action, VmState, VmView
from vmq.policy import PolicyConfig, decide


def domain(metadata: str) -> str:
    return f"<domain type='kvm'><name>web-1</name><metadata>{metadata}</metadata><devices/></domain>"


def element(body: str, prefix: str = "vmq") -> str:
    return f'<{prefix}:intent xmlns:{prefix}="{NAMESPACE}">{body}</{prefix}:intent>'


@pytest.mark.parametrize(("body", "expected"), [
    ("<vmq:enroll>yes</vmq:enroll>", Intent(enroll=True)),
    ("<vmq:enroll> No </vmq:enroll>", Intent(enroll=False)),
    ("<vmq:priority>1000</vmq:priority><vmq:priority>0</vmq:priority>", Intent(priority=0)),
    ('<vmq:knob name="boot_grace_s">12.5</vmq:knob><vmq:knob name="max_restarts">4</vmq:knob>',
     Intent(knobs={"boot_grace_s": "12.5", "max_restarts": "4"})),
    ("", Intent()),
    ("<vmq:enroll>maybe</vmq:enroll>", Intent(errors=("enroll 'maybe' is neither yes nor no",))),
    ("<vmq:priority>1001</vmq:priority>", Intent(errors=("priority '1001' is not an integer from 0 to 1000",))),
    ("<vmq:priority>-1</vmq:priority>", Intent(errors=("priority '-1' is not an integer from 0 to 1000",))),
    ("<vmq:priority>high</vmq:priority>", Intent(errors=("priority 'high' is not an integer from 0 to 1000",))),
    ('<vmq:knob name="max_restarts">-2</vmq:knob>',
     Intent(errors=("knob max_restarts='-2' is not a non-negative int",))),
    ('<vmq:knob name="max_restarts">2.5</vmq:knob>',
     Intent(errors=("knob max_restarts='2.5' is not a non-negative int",))),
    ("<vmq:probe-path>agent</vmq:probe-path>", Intent(probe_path="agent")),
    ("<vmq:probe-path>ssh</vmq:probe-path>", Intent(errors=("probe-path 'ssh' is not one of redis, channel, agent",))),
    ("<vmq:colour>blue</vmq:colour><vmq:enroll>yes</vmq:enroll>",
     Intent(enroll=True, errors=("unknown element <colour>",))),
], ids=lambda value: value if isinstance(value, str) else "")
def test_metadata_documents(body: str, expected: Intent) -> None:
    assert intent_from_domain_xml(domain(element(body))) == expected


def test_an_unknown_knob_is_refused_by_name_and_the_known_ones_listed() -> None:
    intent = intent_from_domain_xml(domain(element('<vmq:knob name="rm_rf">1</vmq:knob>')))
    assert intent is not None and intent.knobs == {}
    [error] = intent.errors
    assert error.startswith("unknown knob 'rm_rf' (known: ") and "max_restarts" in error


def test_children_without_the_prefix_count_too_as_libvirt_may_store_them() -> None:
    xml = domain(f'<intent xmlns="{NAMESPACE}"><enroll>no</enroll><priority>3</priority></intent>')
    assert intent_from_domain_xml(xml) == Intent(enroll=False, priority=3)


@pytest.mark.parametrize("xml", [
    "<domain><name>web-1</name></domain>",  # no metadata at all
    "<domain><metadata><other:x xmlns:other='urn:other'/></metadata></domain>",  # somebody else's
    domain(element("<enroll>yes</enroll>").replace(NAMESPACE, "http://vmq.dev/xmlns/intent/2")),  # a later version
])
def test_no_vmq_metadata_is_none(xml: str) -> None:
    assert intent_from_domain_xml(xml) is None


def test_xml_that_does_not_parse_or_is_huge_is_a_named_refusal_never_an_exception() -> None:
    broken = intent_from_domain_xml(f"<domain><metadata><vmq:intent xmlns:vmq='{NAMESPACE}'>")
    assert broken is not None and broken.errors[0].startswith("domain XML does not parse")
    huge = intent_from_domain_xml(domain(element("<vmq:enroll>yes</vmq:enroll>" + "<vmq:x/>" * 5000)))
    assert huge == Intent(errors=("vmq metadata larger than 16384 bytes: ignored",))


def test_intent_xml_round_trips_and_escapes() -> None:
    made = intent_xml(enroll=True, priority=5, knobs={"max_restarts": 2})
    assert intent_from_domain_xml(domain(made)) == Intent(enroll=True, priority=5, knobs={"max_restarts": "2"})
    odd = intent_from_domain_xml(domain(intent_xml(knobs={'a"<b': "&"})))
    assert odd is not None and odd.errors and odd.errors[0].startswith("unknown knob 'a\"<b'")


def test_record_fields_clear_what_is_no_longer_said_and_read_back() -> None:
    fields = Intent(enroll=False, priority=9, knobs={"max_restarts": "1"}).record_fields()
    assert fields == {"intent.enroll": "no", "intent.priority": "9", "intent.knobs": '{"max_restarts": "1"}',
                      "intent.probe_path": "", "intent.failover": "", "intent.error": ""}
    stored = {k[7:]: v for k, v in fields.items() if v}
    assert (knobs(stored), priority(stored)) == ({"max_restarts": "1"}, 9)
    assert Intent().record_fields() == dict.fromkeys(fields, "")
    assert (knobs({"knobs": "not json"}), priority({"priority": "x"}), priority({})) == ({}, 0, 0)


@pytest.mark.parametrize(("said", "mode", "enrolled"), [
    ({}, "all", True), ({"enroll": "yes"}, "all", True), ({"enroll": "no"}, "all", False),
    ({}, "opt-in", False), ({"enroll": "yes"}, "opt-in", True), ({"enroll": "no"}, "opt-in", False),
])
def test_enrolment_by_mode_and_metadata(said: dict[str, str], mode: str, enrolled: bool) -> None:
    assert (enrolment(said, mode) == "") is enrolled


def test_the_policy_leaves_a_vm_that_is_not_enrolled_alone_even_when_it_crashed() -> None:
    from vmq.model import DomainStatus

    why = enrolment({"enroll": "no"}, "all")
    view = VmView("web-1", VmState.HEALTHY, "node1", 0, last_valid_ms=1, domain_status=DomainStatus.CRASHED,
                  not_enrolled=why)
    decision = decide(view, PolicyConfig(), now_ms=100_000)
    assert decision.action is Action.NONE and decision.reasons == (why,)
