"""Typed errors: a stable ``code`` an agent can branch on, a message naming the value, and a hint."""

from __future__ import annotations


class Codes:
    """Stable error codes. Agents branch on these strings; never rename one."""

    DATASET_INVALID = "dataset_invalid"
    DATASET_NOT_FOUND = "dataset_not_found"
    EMPTY_LOSS_MASK = "empty_loss_mask"
    BASE_MODEL_NOT_FOUND = "base_model_not_found"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    ADAPTER_INVALID = "adapter_invalid"
    MODEL_NOT_FOUND = "model_not_found"
    CONFIG_INVALID = "config_invalid"
    CUDA_REQUIRED = "cuda_required"
    CONVERTER_MISSING = "converter_missing"
    CONVERSION_FAILED = "conversion_failed"
    QUANTIZATION_FAILED = "quantization_failed"
    LLAMA_TOOLS_MISSING = "llama_tools_missing"  # llama-quantize / llama-imatrix could not be found or built
    IMATRIX_FAILED = "imatrix_failed"
    VERIFICATION_FAILED = "verification_failed"
    UNSUPPORTED_TEMPLATE = "unsupported_template"
    UNKNOWN_PRE_TOKENIZER = "unknown_pre_tokenizer"
    OUTPUT_EXISTS = "output_exists"
    OUT_OF_MEMORY = "out_of_memory"
    PARITY_FAILED = "merge_parity_failed"
    NO_CHECKPOINT = "no_checkpoint"
    SCHEDULE_COMPLETE = "schedule_complete"  # a resume whose checkpoint already reached the steps planned
    MODELFILE_INVALID = "modelfile_invalid"
    GGUF_NOT_FOUND = "gguf_not_found"
    GGUF_INVALID = "gguf_invalid"
    PATH_NOT_ALLOWED = "path_not_allowed"
    INVALID_ARGUMENT = "invalid_argument"
    FILE_NOT_FOUND = "file_not_found"
    DISK_FULL = "disk_full"
    PLAN_TOO_LARGE = "plan_too_large"
    STORE_DAMAGED = "store_damaged"
    TOKEN_REQUIRED = "token_required"
    SEAL_NOT_FOUND = "seal_not_found"
    RUN_NOT_FOUND = "run_not_found"
    HUB_AUTH_MISSING = "hub_auth_missing"
    HUB_ERROR = "hub_error"
    PUBLISH_DECLINED = "publish_declined"  # the person asked to confirm an upload did not
    INTERNAL = "internal_error"
    EXECUTOR_UNAVAILABLE = "executor_unavailable"  # FORGE_EXECUTOR=ray without Ray, or no cluster answers
    WORKER_LOST = "worker_lost"  # a job's worker ended without a final state (on Ray: its node left the cluster)
    NO_NODE_FITS = "no_node_fits"  # no node of the Ray cluster has what a job asks for: it would wait forever
    STORAGE_NOT_SHARED = "storage_not_shared"  # a Ray node does not see the server's FORGE_HOME


class ForgeError(Exception):
    """An error a user can cause or fix. ``str(err)`` is the message; ``hint`` says what to do."""

    def __init__(self, code: str, message: str, hint: str = "", *, retryable: bool = False,
                 details: list[str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.retryable = retryable
        self.details = details or []

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint, "retryable": self.retryable,
                "details": self.details}

    def __str__(self) -> str:
        return self.message
