"""Hostile input against a running front (issue 23): property-based fuzzing with hypothesis.

Requests are built from the contract's descriptors - every field of ExplainRequest, nested messages, oneofs and
repeated fields, so a field added to the proto is fuzzed without a change here - with extreme values (NaN, inf,
the integer types' ends, negatives, empty and huge lists, long strings, odd code points, NUL), and raw bytes go on
the wire to every RPC of the service (random, mutated valid messages, string fields that are not UTF-8). Per call,
against a `difflens serve` process on Redis with no worker (hostile.RunningFront):
- no crash: the process is alive and its health SERVING after every call;
- no hang: every call returns within its deadline (DEADLINE_EXCEEDED fails the property);
- only the codes the method allows: OK, INVALID_ARGUMENT, and NOT_FOUND where the request names a job; never
  INTERNAL or UNKNOWN for bad input;
- every INVALID_ARGUMENT starts with a field path of the method's request message ("request" for one that does not
  parse), then ": " (interceptors.py's "<request field path>: <what is allowed>"), and says what is allowed; no
  error's message holds a control character (it is also the front's log line);
- nothing queued for a refused request: the keys in Redis, the enqueue counter, the model's waiting set and work
  stream as they were; an accepted one made one job (none for a repeated idempotency key), whose stream starts with
  Queued, and which is cancelled at once;
and after each test every key of the front's queue is of the queue's own forms (no request value in a key).

DIFFLENS_FUZZ_EXAMPLES sets the examples per test: 500 in `make test`, 10,000 in `make fuzz`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from difflens.api.pb import pb
from tests.api.helpers import CAM_LAYERS, MODEL
from tests.api.hostile import RunningFront, running_front

EXAMPLES = int(os.environ.get("DIFFLENS_FUZZ_EXAMPLES", "500"))
CALL_TIMEOUT_S = 10.0
SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"]
METHODS = {m.name: m for m in SERVICE.methods}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])

# Ids of jobs the front made (submitted and cancelled at start-up), so that job_id fields sometimes name a real job.
JOB_IDS: list[str] = []

# ---------------------------------------------------------------- values

INT_EDGES = [0, 1, -1, 2, 3, 4, 7, 8, 16, 32, 64, 75, 100, 200, 201, 256, 999, 1000, 1024, 2048, 8192, 21201,
             10**6]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e-9, 0.5, 1.0, 2.0, 7.5, 50.0,
               50.000001, 60.0, 10_000.0, 1e15, 1e308, -1.0, -1e308]
ODD_STRINGS = ["", " ", "\x00", "a\x00b", "\n", "\r\n", "\t", "*", "?", "[a-z]", ":", "a:b", "{x}", "..", "../..",
               "../../etc/passwd", "/etc/passwd", "C:\\x", "%s%n", "\u202e", "\u200b", "\ufeff", "\ufffd",
               "\uffff", "\U0001f600", "\U0010ffff", "\u0301", "\u00df", "\u0130", "\ufb01", "\x7f", "\x1b[31m"]
WORDS = ["a", "red", "large", "circle", "square", "in", "the", "center", "striped"]
# Any code point UTF-8 can carry (a surrogate cannot be serialized at all).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
LONG_TEXT = st.builds(lambda s, n: (s * (n // len(s) + 1))[:n], st.text(st.characters(exclude_categories=("Cs",)),
                                                                        min_size=1, max_size=4),
                      st.sampled_from([65, 257, 4_801, 70_000, 1 << 20]))
PROMPTS = st.lists(st.sampled_from(WORDS), max_size=90).map(" ".join)


def ints(bits: int, signed: bool = True) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in INT_EDGES if lo <= v <= hi] + [lo, hi, lo + 1, hi - 1]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -3), 300), st.integers(lo, hi))


FLOATS = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(-10, 100), st.floats())
FLOATS32 = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0]), st.floats(width=32))


# One of JOB_IDS, read when drawn (the fixture fills it after the strategies are built).
REAL_JOB_ID = st.integers(0, 2).map(lambda i: JOB_IDS[i % len(JOB_IDS)] if JOB_IDS else "0" * 32)
JOB_ID_LIKE = st.one_of(REAL_JOB_ID, st.builds(str.__add__, REAL_JOB_ID, st.sampled_from(ODD_STRINGS)),
                        st.builds(str.upper, REAL_JOB_ID), st.text("0123456789abcdef", min_size=31, max_size=33))
# Field-name hints: values that get a request past its first checks so the deeper ones are reached. Every field also
# gets the generic values of its type.
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["", MODEL, MODEL.upper(), MODEL + " "]), "prompt": PROMPTS, "negative_prompt": PROMPTS,
    "layers": st.sampled_from(CAM_LAYERS), "job_id": JOB_ID_LIKE,
    "idempotency_key": st.sampled_from(["", "k", "same-key"])}


@functools.cache  # per field: building strategies on every draw cost more than drawing from them
def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    T = FieldDescriptor
    if f.type in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
        base: st.SearchStrategy[Any] = ints(32)
    elif f.type in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
        base = ints(64)
    elif f.type in (T.TYPE_UINT32, T.TYPE_FIXED32):
        base = ints(32, signed=False)
    elif f.type in (T.TYPE_UINT64, T.TYPE_FIXED64):
        base = ints(64, signed=False)
    elif f.type == T.TYPE_DOUBLE:
        base = FLOATS
    elif f.type == T.TYPE_FLOAT:
        base = FLOATS32
    elif f.type == T.TYPE_BOOL:
        base = st.booleans()
    elif f.type == T.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel too
        base = st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), ints(32))
    elif f.type == T.TYPE_STRING:
        base = st.one_of(st.sampled_from(ODD_STRINGS), TEXT, LONG_TEXT)
    elif f.type == T.TYPE_BYTES:
        base = st.binary(max_size=64)
    else:
        raise AssertionError(f"a field type the fuzzer does not know: {f.full_name} ({f.type})")
    return st.one_of(HINTS[f.name], base) if f.name in HINTS else base


@functools.cache
def repeated(f: FieldDescriptor) -> st.SearchStrategy[list[Any]]:
    """Short lists of any values, and huge ones (copies of one short value; for integers also long decreasing runs,
    which is what a list of timesteps looks like)."""
    elem = scalar(f)
    small = elem if f.type != FieldDescriptor.TYPE_STRING else st.one_of(st.sampled_from(ODD_STRINGS), TEXT)
    strategies = [st.lists(elem, max_size=6),
                  st.builds(lambda v, n: [v] * n, small, st.sampled_from([201, 1_001, 100_000]))]
    if f.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        strategies.append(st.builds(lambda top, n, step: list(range(top, top - n * step, -step)),
                                    st.integers(-10, 1_200), st.integers(1, 300), st.integers(1, 50)))
    if f.name in HINTS:
        strategies.append(st.lists(HINTS[f.name], max_size=4))
    return st.one_of(strategies)


def _synthetic(o: OneofDescriptor) -> bool:
    """The oneof proto3 makes for an `optional` field."""
    return len(o.fields) == 1 and o.name == "_" + o.fields[0].name


@functools.cache
def _member(o: OneofDescriptor) -> st.SearchStrategy[str | None]:
    return st.sampled_from([None, *(f.name for f in o.fields)])


def fill(draw: Callable[[st.SearchStrategy[Any]], Any], msg: Any, depth: int = 0) -> None:
    """Set a drawn selection of `msg`'s fields (walking its descriptor) to drawn values: at most one member of each
    oneof, each other field set or left unset, nested messages filled the same way."""
    desc: Descriptor = msg.DESCRIPTOR
    left_out: set[str] = set()
    chosen: set[str] = set()
    for o in desc.oneofs:
        if not _synthetic(o):
            pick = draw(_member(o))
            left_out.update(f.name for f in o.fields if f.name != pick)
            chosen.update([pick] if pick else [])
    for f in desc.fields:
        if f.name in left_out or (f.name not in chosen and not draw(st.booleans())):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            _fill_map(draw, getattr(msg, f.name), f, depth)
        elif f.is_repeated and f.message_type is not None:
            for _ in range(draw(st.integers(0, 3))):
                fill(draw, getattr(msg, f.name).add(), depth + 1)
        elif f.is_repeated:
            getattr(msg, f.name).extend(draw(repeated(f)))
        elif f.message_type is not None:
            sub = getattr(msg, f.name)
            sub.SetInParent()  # present, even when nothing inside is set
            if depth < 8:
                fill(draw, sub, depth + 1)
        else:
            setattr(msg, f.name, draw(scalar(f)))


def _fill_map(draw: Callable[[st.SearchStrategy[Any]], Any], target: Any, f: FieldDescriptor, depth: int) -> None:
    key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
    for key in draw(st.lists(scalar(key_f), max_size=3)):
        if value_f.message_type is not None:
            fill(draw, target[key], depth + 1)
        else:
            target[key] = draw(scalar(value_f))


def message_class(desc: Descriptor) -> Any:
    return message_factory.GetMessageClass(desc)


@st.composite
def messages(draw: Callable[[st.SearchStrategy[Any]], Any], desc: Descriptor) -> Any:
    msg = message_class(desc)()
    fill(draw, msg)
    return msg


# ---------------------------------------------------------------- raw bytes


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _string_fields(desc: Descriptor) -> list[int]:
    return [f.number for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING] or [1]


@st.composite
def not_utf8(draw: Callable[[st.SearchStrategy[Any]], Any], desc: Descriptor) -> bytes:
    """A valid message with one string field that is not UTF-8 (a lone surrogate's bytes, an invalid lead byte, a
    cut sequence) appended: the last value of a field wins, so it is what the server reads."""
    number = draw(st.sampled_from(_string_fields(desc)))
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
    return draw(messages(desc)).SerializeToString() + varint(number << 3 | 2) + varint(len(bad)) + bad


@st.composite
def mutated(draw: Callable[[st.SearchStrategy[Any]], Any], desc: Descriptor) -> bytes:
    """A valid message's bytes with a few random edits: bytes flipped, inserted, cut, or the end truncated."""
    data = bytearray(draw(messages(desc)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def payloads(desc: Descriptor) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=512), mutated(desc), not_utf8(desc),
        st.builds(lambda b, n: (b * (n // len(b) + 1))[:n], st.binary(min_size=1, max_size=16),
                  st.sampled_from([1 << 12, 1 << 16, 1 << 20])),
        # a field number far past the contract's, in each wire type: a newer client's field
        st.builds(lambda msg, n, wire, tail: msg.SerializeToString() + varint(n << 3 | wire) + tail,
                  messages(desc), st.integers(16, 2**29 - 1), st.sampled_from([0, 1, 2, 5]),
                  st.sampled_from([b"\x01", b"\x00" * 8, b"\x03abc", b"\x00" * 4, b""])))


# ---------------------------------------------------------------- calls and properties


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    job_id: str = ""  # the job an accepted Submit or Explain made (or found, for a repeated idempotency key)
    first_event: Any = None


def call(front: RunningFront, method: str, payload: bytes, caller: str | None) -> Outcome:
    """`payload` as the serialized request of `method`, through a generic callable (no serializer: the bytes go on
    the wire as they are). An Explain stream is read to its first event, then cancelled; a WatchJob stream to its
    end (the jobs it can name have ended)."""
    m = METHODS[method]
    path = f"/{SERVICE.full_name}/{method}"
    metadata = (("x-difflens-caller", caller),) if caller is not None else None
    output = message_class(m.output_type)
    try:
        if not m.server_streaming:
            reply = output.FromString(front.channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT_S,
                                                                      metadata=metadata))
            return Outcome(grpc.StatusCode.OK, "", getattr(reply, "id", "") if method == "Submit" else "")
        stream = front.channel.unary_stream(path)(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
        if method != "Explain":
            for _ in stream:
                pass
            return Outcome(grpc.StatusCode.OK, "")
        first = next(stream, None)
        stream.cancel()
        event = output.FromString(first) if first is not None else None
        return Outcome(grpc.StatusCode.OK, "", event.job_id if event is not None else "", event)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")


# How every refusal says what is allowed (test_invalid.py's words), and what a log line must not hold.
ALLOWED_WORDS = ("allowed", "must", "expected", "available", "needs")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
FIELD_PATH = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*): ")


def names_a_field(details: str, desc: Descriptor) -> bool:
    """Whether `details` starts with "<path>: " for a field path of messages `desc` (or "request: ")."""
    found = FIELD_PATH.match(details)
    if found is None:
        return False
    if found.group(1) == "request":
        return True
    for part in found.group(1).split("."):
        if desc is None or part not in desc.fields_by_name:
            return False
        desc = desc.fields_by_name[part].message_type
    return True


def allowed_codes(method: str) -> set[grpc.StatusCode]:
    codes = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    if "job_id" in METHODS[method].input_type.fields_by_name:
        codes.add(grpc.StatusCode.NOT_FOUND)  # any id that is not a live job's
    return codes


def check(front: RunningFront, method: str, payload: bytes, caller: str | None, idempotent: bool = True) -> None:
    """One call and every property. `idempotent`: the request may carry an idempotency key (a repeated key finds
    the job it made before instead of making one)."""
    before = front.ledger()
    started = time.monotonic()
    out = call(front, method, payload, caller)
    elapsed = time.monotonic() - started
    assert out.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung: no answer in {elapsed:.1f} s"
    assert out.code in allowed_codes(method), f"{method}: {out.code.name} {out.details!r}"
    event(f"{method} {out.code.name} {out.details.split(':')[0] if out.details else ''}".strip())
    if out.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert names_a_field(out.details, METHODS[method].input_type), f"{method}: names no field: {out.details!r}"
        assert any(w in out.details for w in ALLOWED_WORDS), f"{method}: says nothing of what is allowed: " \
                                                               f"{out.details!r}"
    # an error's message is also the front's log line: a raw newline in it would forge the next one
    assert not CONTROL.search(out.details), f"{method}: a control character in {out.details!r}"
    after = front.ledger()
    if out.job_id:
        assert after.enqueued - before.enqueued in ({0, 1} if idempotent else {1}), (before, after)
        if method == "Explain":
            assert out.first_event.WhichOneof("event") == "queued" and out.first_event.sequence == 0, out.first_event
        cancelled = pb.Job.FromString(front.channel.unary_unary(f"/{SERVICE.full_name}/CancelJob")(
            pb.CancelJobRequest(job_id=out.job_id).SerializeToString(), timeout=CALL_TIMEOUT_S))
        assert cancelled.state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_FAILED), cancelled
        assert front.ledger().waiting == before.waiting
    elif method in ("Submit", "Explain"):
        assert after == before, f"{method} refused ({out.code.name} {out.details!r}) but the queue changed: " \
                                f"{before} -> {after}"
    front.assert_healthy()


@pytest.fixture(scope="module")
def front(tiny_dir, redis_url, tmp_path_factory):
    queue = f"fuzz-{os.getpid()}"
    with running_front(tiny_dir, redis_url, queue, tmp_path_factory.mktemp("fuzz") / "front.log") as f:
        stub = f.channel.unary_unary(f"/{SERVICE.full_name}/Submit")
        for i in range(3):
            req = pb.ExplainRequest(model=MODEL, prompt=f"a red circle {i}", steps=2)
            job = pb.Job.FromString(stub(req.SerializeToString(), timeout=CALL_TIMEOUT_S))
            f.channel.unary_unary(f"/{SERVICE.full_name}/CancelJob")(
                pb.CancelJobRequest(job_id=job.id).SerializeToString(), timeout=CALL_TIMEOUT_S)
            JOB_IDS.append(job.id)
        yield f
        JOB_IDS.clear()


CALLERS = st.one_of(st.none(), st.sampled_from(["*", "a:b", "x y", "../..", "k" * 300]),
                    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24))


def test_any_explain_request_gets_an_answer_within_the_contract(front):
    """Structured ExplainRequests, to Submit and to Explain."""

    @FUZZ_SETTINGS
    @given(req=messages(pb.ExplainRequest.DESCRIPTOR), method=st.sampled_from(["Submit", "Explain"]),
           caller=CALLERS)
    def fuzz(req: Any, method: str, caller: str | None) -> None:
        check(front, method, req.SerializeToString(), caller)

    fuzz()
    assert front.stray_keys() == []


def test_any_bytes_to_any_method_get_an_answer_within_the_contract(front):
    """Raw bytes as the serialized request of each RPC of the service."""

    @st.composite
    def wire(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[str, bytes]:
        method = draw(st.sampled_from(sorted(METHODS)))
        return method, draw(payloads(METHODS[method].input_type))

    @FUZZ_SETTINGS
    @given(sent=wire(), caller=CALLERS)
    def fuzz(sent: tuple[str, bytes], caller: str | None) -> None:
        check(front, sent[0], sent[1], caller)

    fuzz()
    assert front.stray_keys() == []


def test_the_field_path_check_refuses_what_is_not_a_path():
    """The property's own check: it must be able to fail."""
    desc = pb.ExplainRequest.DESCRIPTOR
    assert names_a_field("explain.rise.masks: got 0", desc) and names_a_field("request: not a valid message", desc)
    for bad in ("rise.masks: got 0", "explain.risk: x", "internal error", "explain.rise.masks got 0", ": x",
                "explain.rise.masks.x: y"):
        assert not names_a_field(bad, desc), bad
