"""The base of every mapping in the spec document: what all of them refuse, and how.

Each mapping of the document (the spec, ``service``, ``analysis``, a metric, ...) is a pydantic
model derived from :class:`SpecModel`. Before pydantic reads its fields, the mapping as a whole is
checked, as for every Kubernetes object:

* it must be a mapping (``expected a mapping of fields, got a list``);
* an unknown field is refused with the field the user probably meant (``did you mean
  stepWeight?``) or else the list of the fields there; Flagger fields that Perch knows and does
  not support are refused with the reason (:attr:`SpecModel.unsupported`);
* a field whose value is null counts as absent, so it takes its default.

The fields are declared in the order the reference lists them, which is also the order pydantic
validates them and so the order errors are reported in: the first refusal is the first problem a
reader meets in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from perch.spec.messages import Refusal, unknown_field, wrong_type

__all__ = ["SpecModel", "documented_default"]


class SpecModel(BaseModel):
    """A mapping of the spec document."""

    model_config = ConfigDict(extra="forbid")

    # Flagger's fields that Perch knows and refuses here, with the reason.
    unsupported: ClassVar[Mapping[str, str]] = {}
    # The field names, in order (for messages) and as a set (for lookups); model_fields is a
    # property that costs a few microseconds on each of the many reads of a document.
    _field_names: ClassVar[tuple[str, ...]] = ()
    _field_set: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._field_names = tuple(cls.model_fields)
        cls._field_set = frozenset(cls._field_names)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise wrong_type("a mapping of fields", data)
        known = cls._field_set
        for key in data:
            if key not in known:
                if key in cls.unsupported:
                    raise Refusal(cls.unsupported[key], key)
                raise Refusal(unknown_field(key, cls._field_names), key)
        present = (
            data
            if None not in data.values()
            else {key: value for key, value in data.items() if value is not None}
        )
        cls.check_mapping(present)
        return present

    @classmethod
    def check_mapping(cls, present: dict[str, Any]) -> None:
        """Checks of the mapping as a whole, before its fields are read; none by default."""


def documented_default(value: object, description: str) -> Any:
    """A field that is None when absent, and whose default (applied when the result is built,
    because it depends on other fields or is not a plain JSON value) the schema documents."""
    return Field(None, description=description, json_schema_extra={"default": value})  # type: ignore[dict-item]
