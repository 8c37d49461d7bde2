# cython: language_level=3, cdivision=True
"""The compiled twin of `proxy.ingress.prepare.prepare` and of the decision it makes per event.

Built from source by pip with the machine's C compiler when Cython is there (setup.py); without it,
or with `SPLITTER_NO_EXTENSIONS=1`, splitter runs the pure-Python `prepare()` instead
(proxy/ingress/implementation.py chooses, once, and says which at start-up). The two behave
identically: the same tests and golden cases run on both, and a property test compares their output.
Change one, change the other.

Why it exists: `prepare()` is the largest piece of a batch request's CPU, and typed, it measures
about 1.6x the pure-Python one on batches (`python -m loadtest.bench_compiled`). It keeps the objects
the rest of splitter uses (Chunk, Submission, Prepared, the engine's rules and its per-signature
memo) and gains from:
- the per-event loop inline, with typed dicts and tuples (direct C look-ups), the decision's fields
  read by tuple index, and the request's candidate rules looked up once;
- the decision (`first_match`, `routing_signature`, the split arm) with the cohort hash in C:
  MurmurHash3 x86_32, seed 0, of "salt:key" in UTF-8 (the rules schema's contract, pinned by the
  golden cohort cases on both) instead of a call to mmh3 with an f-string.
"""
from libc.stdint cimport uint32_t
from libc.string cimport memcpy
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

import orjson

from proxy.delivery import Chunk, Rejection, Submission
from proxy.engine import NAME_FIELDS, has_envelope, merge_envelope
from proxy.engine import BUCKETS as _BUCKETS
from proxy.engine import NO_KEY_BUCKET as _NO_KEY_BUCKET
from proxy.engine import bucket as _bucket_py
from proxy.engine.cohort import field_value as _field_value_py
from proxy.engine.cohort import key_text as _key_text_py
from proxy.engine.evaluate import MAX_SIGNATURES as _MAX_SIGNATURES
from proxy.ingress.body import MAX_EVENT_BYTES
from proxy.ingress.plan_checks import screen
from proxy.ingress.prepare import CLIENT_CHANNELS as _CLIENT_CHANNELS
from proxy.ingress.prepare import EVENT_CLIENT_CHANNELS as _EVENT_CLIENT_CHANNELS
from proxy.ingress.prepare import (_NO_COPIES, Prepared, RequestScope, _encode_transformed, _file_copies, _Filing, _sample, events_of,
                                   message_id_for)

cdef extern from *:
    """
    static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }
    static uint32_t murmur3_32(const unsigned char *data, Py_ssize_t len, uint32_t seed) {
        const Py_ssize_t nblocks = len / 4;
        uint32_t h1 = seed, c1 = 0xcc9e2d51, c2 = 0x1b873593;
        for (Py_ssize_t i = 0; i < nblocks; i++) {
            uint32_t k1 = (uint32_t)data[4*i] | ((uint32_t)data[4*i+1] << 8) | ((uint32_t)data[4*i+2] << 16) | ((uint32_t)data[4*i+3] << 24);
            k1 *= c1; k1 = rotl32(k1, 15); k1 *= c2;
            h1 ^= k1; h1 = rotl32(h1, 13); h1 = h1 * 5 + 0xe6546b64;
        }
        const unsigned char *tail = data + nblocks * 4;
        uint32_t k1 = 0;
        switch (len & 3) {
            case 3: k1 ^= tail[2] << 16;
            case 2: k1 ^= tail[1] << 8;
            case 1: k1 ^= tail[0]; k1 *= c1; k1 = rotl32(k1, 15); k1 *= c2; h1 ^= k1;
        }
        h1 ^= (uint32_t)len;
        h1 ^= h1 >> 16; h1 *= 0x85ebca6b; h1 ^= h1 >> 13; h1 *= 0xc2b2ae35; h1 ^= h1 >> 16;
        return h1;
    }
    """
    uint32_t murmur3_32(const unsigned char *data, Py_ssize_t len, uint32_t seed)

cdef int NO_KEY_BUCKET = _NO_KEY_BUCKET
cdef uint32_t N_BUCKETS = _BUCKETS
cdef enum:
    BUFFER = 4096  # bytes of "salt:key" hashed without an allocation


cpdef int bucket(str salt, str key):
    """The engine's `bucket(salt, key)`: murmur3 of "salt:key" in UTF-8, seed 0, unsigned, mod the buckets."""
    cdef unsigned char buf[BUFFER]  # on the stack: no state between calls
    cdef Py_ssize_t ls, lk
    cdef const char* s = PyUnicode_AsUTF8AndSize(salt, &ls)
    cdef const char* k = PyUnicode_AsUTF8AndSize(key, &lk)
    cdef Py_ssize_t n = ls + 1 + lk
    if n > BUFFER:  # a key this long is rare: the engine's own way
        return _bucket_py(salt, key)
    memcpy(buf, s, ls)
    buf[ls] = 58  # ":"
    memcpy(buf + ls + 1, k, lk)
    return murmur3_32(buf, n, 0) % N_BUCKETS

cdef object key_text(object value):
    """The engine's `key_text`, its common case (a str) inline; anything else is left to the engine."""
    if type(value) is str:
        return value if (<str>value).strip() else None
    return _key_text_py(value)

cdef int _bucket(object rule, object event):
    cdef tuple fields = rule.cohort.paths
    cdef tuple path
    for name, path in fields:
        text = key_text(event.get(path[0]) if len(path) == 1 else _field_value_py(event, path))
        if text is not None:
            return bucket(rule.cohort.salt, text)
    return NO_KEY_BUCKET

cdef object _arm(object rule, int chosen):
    cdef tuple arms = rule.arms
    for upper, decision in arms:
        if chosen < <int>upper:
            return decision
    return arms[len(arms) - 1][1]

cdef tuple routing_signature(object event, object ctx):
    context = event.get("context")
    version = os_name = library = country = None
    cdef dict c
    if type(context) is dict:
        c = <dict>context
        section = c.get("app")
        if type(section) is dict:
            version = (<dict>section).get("version")
            if version is not None and type(version) is not str:
                version = (type(version), version)
        section = c.get("os")
        if type(section) is dict:
            os_name = (<dict>section).get("name")
        section = c.get("library")
        if type(section) is dict:
            library = (<dict>section).get("name")
        section = c.get("location")
        if type(section) is dict:
            country = (<dict>section).get("country")
    return (event.get("type"), event.get("event"), ctx.country, country, version, os_name, library)

cdef Py_ssize_t MAX_SIGNATURES = _MAX_SIGNATURES

cdef object first_match_in(object candidates, object event, object ctx):
    cdef tuple crules = candidates.rules
    if not crules[0].event_conditions:
        return crules[0]
    signature = routing_signature(event, ctx)
    cdef dict memo = candidates.first_match
    hashable = True
    try:
        found = memo.get(signature)
    except TypeError:
        found, hashable = None, False
    if found is not None:
        return found
    for rule in crules:
        for condition in rule.event_conditions:
            if not condition(event, ctx):
                break
        else:
            if hashable:
                if len(memo) >= MAX_SIGNATURES:
                    memo.clear()
                memo[signature] = rule
            return rule
    raise AssertionError("unreachable: the last rule has no conditions")


cdef object _dumps = orjson.dumps
cdef object _EncodeError = orjson.JSONEncodeError
cdef dict _NAME_FIELDS = dict(NAME_FIELDS)
cdef tuple CLIENT_CHANNELS = _CLIENT_CHANNELS
cdef tuple EVENT_CLIENT_CHANNELS = _EVENT_CLIENT_CHANNELS
cdef Py_ssize_t _MAX_EVENT_BYTES = MAX_EVENT_BYTES

cdef object decision_in(object candidates, object event, object ctx):
    rule = first_match_in(candidates, event, ctx)
    decision = rule.decision
    if decision is not None:
        return decision
    return _arm(rule, _bucket(rule, event))

def shared_decision(rules, event, ctx):
    return decision_in(rules.candidates(ctx), event, ctx)

cdef bint _has_identity(dict event):
    for name in ("anonymousId", "userId"):
        value = event.get(name)
        if type(value) is str:
            if (<str>value).strip():
                return True
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False

cdef void _reject(object filing, Py_ssize_t index, str code, str message):
    filing.rejected.append(Rejection(index, code, message))

cdef void _set_ip(dict event, object client_ip):
    context = event.get("context")
    if not isinstance(context, dict):
        if context is not None:
            return
        context = event["context"] = {}
    if not context.get("ip"):
        context["ip"] = client_ip

cdef bint _is_client_channel(object context):
    return type(context) is dict and (<dict>context).get("channel") in CLIENT_CHANNELS

cdef void _file(dict chunks, tuple destinations, bytes encoded, str message_id, str event_type, str name):
    cdef list meta
    for destination in destinations:
        chunk = chunks.get(destination)
        if chunk is None:
            chunk = chunks[destination] = Chunk()
        chunk.append(encoded)
        meta = chunk.meta
        meta.append(message_id)
        meta.append(event_type)
        meta.append(name)

def prepare(rules, body, shape, source, ctx, client_ip, *, presented_key="", forwarded_for=None, catalog=None):
    events = events_of(body, shape)
    filing = _Filing()
    scope = RequestScope.of(rules, shape, source, ctx, client_ip, body if shape.is_batch and has_envelope(body) else None, catalog)
    cdef Py_ssize_t index
    envelope = scope.envelope
    implied_type = scope.implied_type
    ip_for_all = scope.ip_for_all
    ip_for_client_channels = scope.ip_for_client_channels
    source_name = scope.source.name
    cdef dict primary = filing.primary, mirror = filing.mirror, routed = filing.routed
    plan = scope.plan
    transforms = scope.transforms
    wants_sample = scope.wants_sample
    scope_ctx = scope.ctx
    cdef dict event, names
    candidates = rules.candidates(scope_ctx)
    cdef tuple d
    for index, item in enumerate(events):
        if type(item) is not dict:
            _reject(filing, index, "invalid_event", f"event is not a JSON object ({type(item).__name__})")
            continue
        event = <dict>item
        if envelope is not None:
            merge_envelope(envelope, event)
        elif implied_type is not None and "type" not in event:
            event["type"] = implied_type
        if "writeKey" in event:
            del event["writeKey"]
        event_type = event.get("type")
        if type(event_type) is not str or not event_type:
            _reject(filing, index, "missing_type", "event has no type (track, identify, page, screen, group or alias)")
            continue
        if not _has_identity(event):
            _reject(filing, index, "no_user_anon_id", "event has neither userId nor anonymousId")
            continue
        try:
            message_id = event.get("messageId")
            if type(message_id) is not str or not (<str>message_id).strip():
                message_id = event["messageId"] = message_id_for(source_name, event, index)
            if ip_for_all is not None:
                _set_ip(event, ip_for_all)
            elif ip_for_client_channels is not None and (event.get("channel") in EVENT_CLIENT_CHANNELS or _is_client_channel(event.get("context"))):
                _set_ip(event, ip_for_client_channels)
            encoded = _dumps(event)
        except _EncodeError as exc:
            _reject(filing, index, "invalid_event", f"event cannot be forwarded: {exc}")
            continue
        if len(<bytes>encoded) > _MAX_EVENT_BYTES:
            _reject(filing, index, "event_too_large", f"event is {len(encoded)} bytes; the limit is 32 KB per event")
            continue
        if plan is not None and (refusal := screen(plan, event, encoded, filing.observed, filing.violations)) is not None:
            _reject(filing, index, "tracking_plan_violation", refusal)
            continue
        decision = decision_in(candidates, event, scope_ctx)
        d = <tuple>decision
        copies = _NO_COPIES
        if transforms:
            try:
                copies = _encode_transformed(transforms, decision, event)
            except _EncodeError as exc:
                _reject(filing, index, "invalid_event", f"event cannot be forwarded once transformed: {exc}")
                continue
        name_field = _NAME_FIELDS.get(event_type)
        name = event.get(name_field, event_type) if name_field is not None else event_type
        if type(name) is not str:
            name = event_type
        key = (d[0], d[1], d[2], event_type)
        found = routed.get(key)
        if found is None:
            names = routed[key] = {}
        else:
            names = <dict>found
        seen = names.get(name, 0)
        names[name] = seen + 1
        if not seen and wants_sample is not None and wants_sample(event_type, name):
            _sample(filing, scope, event, event_type, name)
        if copies:
            _file_copies(filing, decision, copies, encoded, message_id, event_type, name)
        else:
            _file(primary, <tuple>d[1], encoded, message_id, event_type, name)
            if d[2]:
                _file(mirror, <tuple>d[2], encoded, message_id, event_type, name)
    submission = Submission(source, presented_key, forwarded_for, filing.primary, filing.mirror, tuple(filing.rejected), filing.routed)
    return Prepared(submission, filing.routed, filing.observed, filing.violations, filing.sampled)
