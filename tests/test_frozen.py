"""quick_init: the same constructor as the dataclass's, still frozen, for the per-request objects."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from proxy.delivery.spool_format import Frame, Record, frame
from proxy.delivery.submission import Submission
from proxy.frozen import quick_init
from proxy.ingress.prepare import Prepared, RequestScope


@quick_init
@dataclass(frozen=True, slots=True)
class Pair:
    left: int
    right: str = "r"


def test_same_arguments_defaults_and_keywords_as_the_dataclass() -> None:
    assert Pair(1) == Pair(1, "r") == Pair(right="r", left=1)
    assert repr(Pair(2, "x")) == "Pair(left=2, right='x')"
    with pytest.raises(TypeError):
        Pair()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Pair(1, "r", 3)  # type: ignore[call-arg]


def test_still_frozen() -> None:
    pair = Pair(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.left = 2  # type: ignore[misc]
    assert hash(pair) == hash(Pair(1))
    assert dataclasses.replace(pair, right="z") == Pair(1, "z")


def test_refuses_what_it_cannot_build() -> None:
    @dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list[int] = field(default_factory=list)

    @dataclass(slots=True)
    class Mutable:
        value: int

    @dataclass(frozen=True)
    class Unslotted:
        value: int

    @dataclass(frozen=True, slots=True)
    class KeywordOnly:
        value: int = field(kw_only=True)

    @dataclass(frozen=True, slots=True, init=False)
    class NoInit:
        value: int

    @dataclass(frozen=True, slots=True)
    class OwnInit:
        value: int

        def __init__(self, value: int) -> None:
            object.__setattr__(self, "value", value * 2)

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        value: int
        scale: dataclasses.InitVar[int] = 1

    for cls in (WithFactory, Mutable, Unslotted, KeywordOnly, NoInit, OwnInit, WithInitVar):
        with pytest.raises(TypeError):
            quick_init(cls)


def test_fields_inherited_from_a_slotted_base() -> None:
    @quick_init
    @dataclass(frozen=True, slots=True)
    class Triple(Pair):
        third: float = 0.5

    assert Triple(1, "x", 2.0) == Triple(left=1, right="x", third=2.0)
    assert (Triple(3).left, Triple(3).right, Triple(3).third) == (3, "r", 0.5)


def test_the_per_request_classes_use_it() -> None:
    for cls in (Frame, Record, Submission, Prepared, RequestScope):
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "_set_" in cls.__init__.__code__.co_names[0]
    made = frame(1.5, "key", None, [b'{"a":1}', b'{"b":2}'], b"t")
    assert made.record(3) == Record(3, 1.5, "key", None, b'{"a":1},{"b":2}', (7, 7), made.size, b"t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.tags = b""  # type: ignore[misc]
