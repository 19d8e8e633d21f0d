"""The serving errors a request can meet, with OVMS's messages; front ends map them to gRPC / HTTP codes."""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    """OVMS status codes a client can see: (message, gRPC code name, HTTP status)."""

    MODEL_NAME_MISSING = ("Model with requested name is not found", "NOT_FOUND", 404)
    MODEL_VERSION_MISSING = ("Model with requested version is not found", "NOT_FOUND", 404)
    MODEL_VERSION_LABEL_MISSING = ("Model with requested version label is not found", "NOT_FOUND", 404)
    MODEL_VERSION_NOT_LOADED_ANYMORE = ("Model with requested version is retired", "NOT_FOUND", 404)
    MODEL_VERSION_NOT_LOADED_YET = ("Model with requested version is not loaded yet", "UNAVAILABLE", 404)
    MODEL_SPEC_MISSING = ("model_spec missing in request", "INVALID_ARGUMENT", 400)
    MODEL_VERSION_INVALID_FORMAT = ("invalid model version format in request", "INVALID_ARGUMENT", 400)
    INVALID_SIGNATURE_DEF = ("Invalid signature name", "INVALID_ARGUMENT", 400)
    INVALID_NO_OF_INPUTS = ("Invalid number of inputs", "INVALID_ARGUMENT", 400)
    INVALID_MISSING_INPUT = ("Missing input with specific name", "INVALID_ARGUMENT", 400)
    INVALID_MISSING_OUTPUT = ("Missing output with specific name", "INVALID_ARGUMENT", 400)
    INVALID_NO_OF_SHAPE_DIMENSIONS = ("Invalid number of shape dimensions", "INVALID_ARGUMENT", 400)
    INVALID_BATCH_SIZE = ("Invalid input batch size", "INVALID_ARGUMENT", 400)
    INVALID_SHAPE = ("Invalid input shape", "INVALID_ARGUMENT", 400)
    INVALID_PRECISION = ("Invalid input precision", "INVALID_ARGUMENT", 400)
    INVALID_VALUE_COUNT = ("Invalid number of values in tensor proto container", "INVALID_ARGUMENT", 400)
    INVALID_CONTENT_SIZE = ("Invalid content size of tensor proto", "INVALID_ARGUMENT", 400)
    INVALID_MESSAGE_STRUCTURE = (
        "Passing buffers both in InferInputTensor contents and in ModelInferRequest raw_input_contents is not allowed",
        "INVALID_ARGUMENT",
        400,
    )
    INVALID_ARGUMENT = ("Invalid argument", "INVALID_ARGUMENT", 400)
    RESHAPE_ERROR = ("Model could not be reshaped with requested shape", "FAILED_PRECONDITION", 412)
    CONFIG_FROM_FILE_ONLY = ("models.json is the source of truth; edit it instead", "FAILED_PRECONDITION", 412)
    UNIMPLEMENTED = ("Not implemented", "UNIMPLEMENTED", 501)
    INTERNAL_ERROR = ("Internal server error", "INTERNAL", 500)
    REQUEST_TOO_LARGE = ("Request is larger than --max_request_mb", "RESOURCE_EXHAUSTED", 413)
    BODY_TIMEOUT = ("Request body stalled past --rest_body_timeout_seconds", "DEADLINE_EXCEEDED", 408)
    MESSAGE_TIMEOUT = ("Request message not received within --grpc_receive_timeout_seconds", "DEADLINE_EXCEEDED", 408)
    SHUTTING_DOWN = ("Server is shutting down", "UNAVAILABLE", 503)
    QUEUE_FULL = ("The model's batching queue is full", "RESOURCE_EXHAUSTED", 429)

    @property
    def message(self) -> str:
        return self.value[0]

    @property
    def grpc_code(self) -> str:
        return self.value[1]

    @property
    def http_status(self) -> int:
        return self.value[2]


class ServingError(Exception):
    """An error answered to a client: OVMS's message, then ` - ` and the details when there are some."""

    def __init__(self, code: Code, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code.message} - {detail}" if detail else code.message)

    def __reduce__(self) -> tuple[type[ServingError], tuple[Code, str]]:
        return ServingError, (self.code, self.detail)  # raised in the decoder process, re-raised in the server
