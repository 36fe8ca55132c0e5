"""Operators' intent per VM, written where they already describe their VMs: libvirt domain metadata (pure).

A domain carries it as one element in vmq's namespace inside ``<metadata>`` (docs/operations.md, "Intent in
libvirt metadata")::

    <metadata>
      <vmq:intent xmlns:vmq="http://vmq.dev/xmlns/intent/1">
        <vmq:enroll>yes</vmq:enroll>            <!-- yes | no: watched and restarted by vmq, or left alone -->
        <vmq:priority>100</vmq:priority>        <!-- 0..1000, higher restarts first where restarts compete -->
        <vmq:probe-path>agent</vmq:probe-path>  <!-- redis | channel | agent; `vmq path` wins over it -->
        <vmq:knob name="max_restarts">5</vmq:knob>  <!-- any knob `vmq set` takes -->
      </vmq:intent>
    </metadata>

``virsh metadata DOMAIN --uri http://vmq.dev/xmlns/intent/1 --key vmq --set '<intent>...</intent>'`` writes it
live. Children are matched by local name (libvirt namespaces the element it stores, not always its children).
The host's inventory reads it from the domain XML it already reads for the channels and stores it in the VM's
record as ``intent.*`` fields; a document that does not parse, or a value out of range, is reported (audited)
and ignored value by value: the defaults apply, never a crash of the inventory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from vmq.model import ProbePath
from vmq.policy import OVERRIDABLE

__all__ = ["ENROLL_MODES", "NAMESPACE", "NO_INTENT", "Intent", "enrolment", "failover_enabled", "intent_from_domain_xml", "intent_xml", "knobs", "parse_intent",
           "priority"]

NAMESPACE = "http://vmq.dev/xmlns/intent/1"
ENROLL_MODES = ("all", "opt-in")
PRIORITY_MAX = 1000
PROBE_PATHS = tuple(path.value for path in ProbePath)
DEFAULT_PRIORITY = 0
MAX_DOCUMENT_BYTES = 16 * 1024
_YES, _NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


@dataclass(frozen=True)
class Intent:
    """What one domain's vmq metadata says; None or empty: not said. ``errors`` lists what was refused."""

    enroll: bool | None = None
    priority: int | None = None
    knobs: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    probe_path: str | None = None  # redis, channel or agent (vmq.model.ProbePath values)
    failover: bool | None = None  # started on another host when its host dies and is fenced (VMQ_FAILOVER on)

    def record_fields(self) -> dict[str, str]:
        """The VM record's ``intent.*`` fields (every one, "" when not said, so a removed value is cleared)."""
        return {"intent.enroll": "" if self.enroll is None else ("yes" if self.enroll else "no"),
                "intent.priority": "" if self.priority is None else str(self.priority),
                "intent.knobs": json.dumps(dict(self.knobs), sort_keys=True) if self.knobs else "",
                "intent.probe_path": self.probe_path or "",
                "intent.failover": "" if self.failover is None else ("yes" if self.failover else "no"),
                "intent.error": "; ".join(self.errors)[:500]}

    def summary(self) -> str:
        """One line for audit events and `vmq explain`."""
        parts = [f"enroll={'yes' if self.enroll else 'no'}" if self.enroll is not None else "",
                 f"priority={self.priority}" if self.priority is not None else "",
                 f"probe-path={self.probe_path}" if self.probe_path else "",
                 f"failover={'yes' if self.failover else 'no'}" if self.failover is not None else "",
                 " ".join(f"{k}={v}" for k, v in sorted(self.knobs.items()))]
        return " ".join(p for p in parts if p) or "nothing"


NO_INTENT = Intent()


def intent_xml(enroll: bool | None = None, priority: int | None = None, knobs: Mapping[str, object] | None = None,
               prefix: str = "vmq", probe_path: str | None = None, failover: bool | None = None) -> str:
    """The metadata element for these values, as ``virsh metadata --set`` takes it and a domain XML holds it."""
    parts = [] if enroll is None else [f"<{prefix}:enroll>{'yes' if enroll else 'no'}</{prefix}:enroll>"]
    if priority is not None:
        parts.append(f"<{prefix}:priority>{priority}</{prefix}:priority>")
    if probe_path is not None:
        parts.append(f"<{prefix}:probe-path>{escape(probe_path)}</{prefix}:probe-path>")
    if failover is not None:
        parts.append(f"<{prefix}:failover>{'yes' if failover else 'no'}</{prefix}:failover>")
    for name, value in (knobs or {}).items():
        parts.append(f"<{prefix}:knob name={quoteattr(str(name))}>{escape(str(value))}</{prefix}:knob>")
    return f'<{prefix}:intent xmlns:{prefix}="{NAMESPACE}">{"".join(parts)}</{prefix}:intent>'


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_intent(element: ElementTree.Element) -> Intent:
    """The intent of one ``intent`` element; every refused value named in ``errors``."""
    enroll: bool | None = None
    failover: bool | None = None
    level: int | None = None
    path: str | None = None
    chosen: dict[str, str] = {}
    errors: list[str] = []
    for child in element:
        name, text = _local(child.tag), (child.text or "").strip()
        if name in ("enroll", "failover"):
            said = True if text.lower() in _YES else False if text.lower() in _NO else None
            if said is None:
                errors.append(f"{name} {text[:40]!r} is neither yes nor no")
            elif name == "enroll":
                enroll = said
            else:
                failover = said
        elif name == "priority":
            try:
                value = int(text)
            except ValueError:
                value = -1
            if 0 <= value <= PRIORITY_MAX:
                level = value
            else:
                errors.append(f"priority {text[:40]!r} is not an integer from 0 to {PRIORITY_MAX}")
        elif name == "probe-path":
            if text in PROBE_PATHS:
                path = text
            else:
                errors.append(f"probe-path {text[:40]!r} is not one of {', '.join(PROBE_PATHS)}")
        elif name == "knob":
            knob = child.get("name", "")
            kind = OVERRIDABLE.get(knob)
            try:
                valid = kind is not None and kind(text) >= 0
            except ValueError:
                valid = False
            if valid:
                chosen[knob] = text
            elif kind is None:
                errors.append(f"unknown knob {knob[:40]!r} (known: {', '.join(sorted(OVERRIDABLE))})")
            else:
                errors.append(f"knob {knob}={text[:40]!r} is not a non-negative {kind.__name__}")
        else:
            errors.append(f"unknown element <{name[:40]}>")
    return Intent(enroll, level, chosen, tuple(errors), path, failover)


def intent_from_domain_xml(domain_xml: str) -> Intent | None:
    """The intent in a domain XML's ``<metadata>`` (vmq's namespace), None when there is none. Never raises: a
    domain XML or a vmq element that cannot be read gives an Intent with only ``errors``."""
    if NAMESPACE not in domain_xml:
        return None  # cheap: most domains carry no vmq metadata
    try:
        root = ElementTree.fromstring(domain_xml)
    except ElementTree.ParseError as exc:
        return Intent(errors=(f"domain XML does not parse: {exc}",))
    element = root.find(f"./metadata/{{{NAMESPACE}}}intent")
    if element is None:
        return None
    if len(ElementTree.tostring(element)) > MAX_DOCUMENT_BYTES:
        return Intent(errors=(f"vmq metadata larger than {MAX_DOCUMENT_BYTES} bytes: ignored",))
    return parse_intent(element)


def knobs(intent_fields: Mapping[str, str]) -> dict[str, str]:
    """The restart-condition knobs the record's intent sets (``intent.knobs``); {} if none or unreadable."""
    raw = intent_fields.get("knobs", "")
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def priority(intent_fields: Mapping[str, str]) -> int:
    """The VM's restart priority (higher first): its intent's, else DEFAULT_PRIORITY."""
    raw = intent_fields.get("priority", "")
    return int(raw) if raw.isdigit() else DEFAULT_PRIORITY


def failover_enabled(intent_fields: Mapping[str, str], default: bool) -> bool:
    """Whether the VM is started elsewhere when its host dies and is fenced: its metadata's ``<failover>``, else
    the cluster's default (VMQ_FAILOVER_DEFAULT)."""
    said = intent_fields.get("failover", "")
    return default if said not in ("yes", "no") else said == "yes"


def enrolment(intent_fields: Mapping[str, str], mode: str) -> str:
    """Why this VM is not enrolled ("" when it is): its metadata says no, or the cluster enrols only VMs whose
    metadata says yes (``mode`` "opt-in", VMQ_ENROLL) and it does not."""
    said = intent_fields.get("enroll", "")
    if said == "no":
        return "not enrolled: its libvirt metadata says <enroll>no</enroll>: left alone"
    if said != "yes" and mode == "opt-in":
        return "not enrolled: the cluster enrols only VMs whose libvirt metadata says <enroll>yes</enroll>"
    return ""
