"""The routing engine: pure, I/O-free (beyond `load_rules` reading the rules file and the plan files it names).

Everything else in splitter imports the engine from here and only from here.
"""

from proxy.engine.catalog_plan import MissingRequired, PlanComparison, SeenEvent, SeenPath, TypeBreak, compare_with_plan
from proxy.engine.catalog_schema import CatalogSettings
from proxy.engine.cohort import BUCKETS, NO_KEY_BUCKET, bucket
from proxy.engine.errors import Problem, RulesError
from proxy.engine.evaluate import decide, shared_decision
from proxy.engine.events import events_of_body, has_envelope, merge_envelope
from proxy.engine.masking import MASK, mask
from proxy.engine.model import EVENT_TYPES, Cohort, Decision, Destination, EventContext, Rule, RuleSet, Source
from proxy.engine.moves import Move, replay_view
from proxy.engine.plan_report import plan_report_lines
from proxy.engine.ramp import RampView, effective_rules, iso, next_step_at, ramp_views
from proxy.engine.recording import RecordSettings, is_recorded, picked, recorded_line
from proxy.engine.rollout import RolloutReport, compare, rollback_line, verdict_lines
from proxy.engine.rules_diff import RulesDiff, diff_rules
from proxy.engine.schema import SCHEMA_VERSION, compile_rules, load_rules
from proxy.engine.shapes import NAME_FIELDS, OTHER, Shape, event_name, event_shape, masked_sample
from proxy.engine.simulate import Sample, against, tally
from proxy.engine.tracking import KINDS as VIOLATION_KINDS
from proxy.engine.tracking import TrackingPlan, Violation, plan_files
from proxy.engine.tracking_schema import compile_plan
from proxy.engine.transforms import TransformTable, transformed_events
from proxy.engine.webhook_schema import DedupSettings

__all__ = [
    "BUCKETS",
    "EVENT_TYPES",
    "MASK",
    "NAME_FIELDS",
    "NO_KEY_BUCKET",
    "OTHER",
    "SCHEMA_VERSION",
    "VIOLATION_KINDS",
    "CatalogSettings",
    "Cohort",
    "Decision",
    "DedupSettings",
    "Destination",
    "EventContext",
    "MissingRequired",
    "Move",
    "PlanComparison",
    "Problem",
    "RampView",
    "RecordSettings",
    "RolloutReport",
    "Rule",
    "RuleSet",
    "RulesDiff",
    "RulesError",
    "Sample",
    "SeenEvent",
    "SeenPath",
    "Shape",
    "Source",
    "TrackingPlan",
    "TransformTable",
    "TypeBreak",
    "Violation",
    "against",
    "bucket",
    "compare",
    "compare_with_plan",
    "compile_plan",
    "compile_rules",
    "decide",
    "diff_rules",
    "effective_rules",
    "event_name",
    "event_shape",
    "events_of_body",
    "has_envelope",
    "is_recorded",
    "iso",
    "load_rules",
    "mask",
    "masked_sample",
    "merge_envelope",
    "next_step_at",
    "picked",
    "plan_files",
    "plan_report_lines",
    "ramp_views",
    "recorded_line",
    "replay_view",
    "rollback_line",
    "shared_decision",
    "tally",
    "transformed_events",
    "verdict_lines",
]
