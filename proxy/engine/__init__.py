"""The routing engine: pure, I/O-free (beyond `load_rules` reading the rules file and the plan files it names).

Everything else in splitter imports the engine from here and only from here.
"""

from proxy.engine.cohort import BUCKETS, NO_KEY_BUCKET, bucket
from proxy.engine.decide import decide, route
from proxy.engine.errors import Problem, RulesError
from proxy.engine.events import events_of_body, merge_envelope
from proxy.engine.masking import mask
from proxy.engine.model import EVENT_TYPES, Decision, Destination, EventContext, Rule, RuleSet, Source
from proxy.engine.schema import SCHEMA_VERSION, compile_rules, load_rules
from proxy.engine.tracking import KINDS as VIOLATION_KINDS
from proxy.engine.tracking import TrackingPlan, Violation, plan_files
from proxy.engine.transforms import TransformTable, transformed_events

__all__ = [
    "BUCKETS",
    "EVENT_TYPES",
    "NO_KEY_BUCKET",
    "SCHEMA_VERSION",
    "VIOLATION_KINDS",
    "Decision",
    "Destination",
    "EventContext",
    "Problem",
    "Rule",
    "RuleSet",
    "RulesError",
    "Source",
    "TrackingPlan",
    "TransformTable",
    "Violation",
    "bucket",
    "compile_rules",
    "decide",
    "route",
    "events_of_body",
    "load_rules",
    "mask",
    "merge_envelope",
    "plan_files",
    "transformed_events",
]
