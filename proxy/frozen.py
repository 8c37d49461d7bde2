"""A quicker constructor for the frozen dataclasses made on every request.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__`, looked up
and called once per field: 1.3 µs for eight fields here, where a plain class takes 0.3. One request
makes a dozen such objects (the spool's frames and records, the request's scope, submission and
preparation), about 60 fields in all. `quick_init` keeps them frozen (assigning a field still
raises `FrozenInstanceError`) and gives them an `__init__` that stores each field through its slot's
own descriptor, which skips the frozen check by design: about half the cost.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, TypeVar

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Replace the `__init__` of `cls`, a `@dataclass(frozen=True, slots=True)` without `__post_init__`
    or default factories, with one that takes the same arguments and stores them through the slots."""
    params = getattr(cls, "__dataclass_params__", None)
    if (params is None or not params.frozen or not params.init or "__slots__" not in vars(cls) or hasattr(cls, "__post_init__")
            or getattr(vars(cls).get("__init__"), "__code__", None) is None or vars(cls)["__init__"].__code__.co_filename != "<string>"):
        raise TypeError(f"{cls.__name__}: quick_init takes a frozen, slotted dataclass with its generated __init__ and no __post_init__")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if list(inspect.signature(cls.__init__).parameters)[1:] != [field.name for field in fields]:  # an InitVar, a keyword-only field
        raise TypeError(f"{cls.__name__}: quick_init takes only plain positional fields")
    namespace: dict[str, Any] = {}
    signature, body = ["self"], []
    for field in fields:
        if not field.init or field.kw_only or field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name}: quick_init takes only plain positional fields, with or without a default")
        if field.default is dataclasses.MISSING:
            signature.append(field.name)
        else:
            namespace[f"_default_{field.name}"] = field.default
            signature.append(f"{field.name}=_default_{field.name}")
        slot = inspect.getattr_static(cls, field.name)  # the slot's descriptor, in this class or the base that has it
        if not isinstance(slot, types.MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{field.name}: not a slot")
        namespace[f"_set_{field.name}"] = slot.__set__
        body.append(f"    _set_{field.name}(self, {field.name})")
    source = f"def __init__({', '.join(signature)}):\n" + "\n".join(body or ["    pass"]) + "\n"
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
