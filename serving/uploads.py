"""An uploaded file held in memory, as a BentoML API parameter type.

BentoML 1.4 turns a `pathlib.Path` parameter into a temporary file per upload (a disk write and a
read back for every image, ~8 % of the CPU time of a one-image request) named `tmpXXXXXXXX<name>`.
BentoML treats any `PurePath` subclass as a multipart file field but only rewrites the exact pathlib
classes, so this subclass gets the upload as parsed (starlette's UploadFile) and keeps its bytes and
original file name. The OpenAPI spec still describes the field as binary files.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema


class UploadedFile(PurePosixPath):
    """`.name` is the client's file name (or 'upload'); `.data` the bytes."""

    data: bytes

    @classmethod
    def from_bytes(cls, name: str | None, data: bytes) -> UploadedFile:
        upload = cls(PurePosixPath(name or "upload").name or "upload")
        upload.data = data
        return upload

    @classmethod
    def _validate(cls, value: Any) -> UploadedFile:
        if isinstance(value, UploadedFile):
            return value
        file = getattr(value, "file", None)  # starlette.datastructures.UploadFile
        if file is not None:
            file.seek(0)
            return cls.from_bytes(getattr(value, "filename", None), file.read())
        if isinstance(value, bytes):
            return cls.from_bytes(None, value)
        raise PydanticCustomError("upload_type", "expected an uploaded file")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda u: u.name)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        # As BentoML's own file fields: "file" in its input schema (its HTTP client sends such fields as
        # multipart), which its OpenAPI generator writes as a binary string.
        if handler.mode == "validation":
            return {"type": "file", "format": "binary"}
        return {"type": "string", "format": "binary"}
