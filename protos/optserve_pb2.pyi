from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class SyncMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_MODE_UNSPECIFIED: _ClassVar[SyncMode]
    SYNC: _ClassVar[SyncMode]
    ASYNC: _ClassVar[SyncMode]

class NonFinitePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_FINITE_POLICY_UNSPECIFIED: _ClassVar[NonFinitePolicy]
    NON_FINITE_REJECT: _ClassVar[NonFinitePolicy]
    NON_FINITE_ALLOW: _ClassVar[NonFinitePolicy]
    NON_FINITE_SKIP_STEP: _ClassVar[NonFinitePolicy]

class TimeoutPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIMEOUT_POLICY_UNSPECIFIED: _ClassVar[TimeoutPolicy]
    FAIL: _ClassVar[TimeoutPolicy]
    APPLY_PARTIAL: _ClassVar[TimeoutPolicy]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
INT32: DType
INT64: DType
SYNC_MODE_UNSPECIFIED: SyncMode
SYNC: SyncMode
ASYNC: SyncMode
NON_FINITE_POLICY_UNSPECIFIED: NonFinitePolicy
NON_FINITE_REJECT: NonFinitePolicy
NON_FINITE_ALLOW: NonFinitePolicy
NON_FINITE_SKIP_STEP: NonFinitePolicy
TIMEOUT_POLICY_UNSPECIFIED: TimeoutPolicy
FAIL: TimeoutPolicy
APPLY_PARTIAL: TimeoutPolicy

class TensorChunk(_message.Message):
    __slots__ = ("name", "slot", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    slot: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., slot: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("model_id", "optimizer_config_json", "num_workers", "mode", "sync_timeout_s", "timeout_policy", "non_finite_policy")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    optimizer_config_json: str
    num_workers: int
    mode: SyncMode
    sync_timeout_s: float
    timeout_policy: TimeoutPolicy
    non_finite_policy: NonFinitePolicy
    def __init__(self, model_id: _Optional[str] = ..., optimizer_config_json: _Optional[str] = ..., num_workers: _Optional[int] = ..., mode: _Optional[_Union[SyncMode, str]] = ..., sync_timeout_s: _Optional[float] = ..., timeout_policy: _Optional[_Union[TimeoutPolicy, str]] = ..., non_finite_policy: _Optional[_Union[NonFinitePolicy, str]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("spec", "variables", "worker_index")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    variables: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    worker_index: int
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., variables: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., worker_index: _Optional[int] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("created", "model")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    created: bool
    model: ModelInfo
    def __init__(self, created: _Optional[bool] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ApplyGradientsHeader(_message.Message):
    __slots__ = ("model_id", "worker_index", "step", "aggregated", "return_variables", "num_gradients", "hold_for_joint_norm", "shared_memory_session", "shared_memory_gradients", "data_plane_session", "data_plane_sequence", "shared_memory_values_region")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    RETURN_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    NUM_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    HOLD_FOR_JOINT_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SESSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_SESSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_VALUES_REGION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    worker_index: int
    step: int
    aggregated: bool
    return_variables: bool
    num_gradients: int
    hold_for_joint_norm: bool
    shared_memory_session: str
    shared_memory_gradients: _containers.RepeatedScalarFieldContainer[str]
    data_plane_session: str
    data_plane_sequence: int
    shared_memory_values_region: int
    def __init__(self, model_id: _Optional[str] = ..., worker_index: _Optional[int] = ..., step: _Optional[int] = ..., aggregated: _Optional[bool] = ..., return_variables: _Optional[bool] = ..., num_gradients: _Optional[int] = ..., hold_for_joint_norm: _Optional[bool] = ..., shared_memory_session: _Optional[str] = ..., shared_memory_gradients: _Optional[_Iterable[str]] = ..., data_plane_session: _Optional[str] = ..., data_plane_sequence: _Optional[int] = ..., shared_memory_values_region: _Optional[int] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("header", "gradients", "sparse_gradients")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    header: ApplyGradientsHeader
    gradients: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    sparse_gradients: _containers.RepeatedCompositeFieldContainer[SparseGradient]
    def __init__(self, header: _Optional[_Union[ApplyGradientsHeader, _Mapping]] = ..., gradients: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., sparse_gradients: _Optional[_Iterable[_Union[SparseGradient, _Mapping]]] = ...) -> None: ...

class SparseGradient(_message.Message):
    __slots__ = ("name", "dense_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DENSE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dense_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dense_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step", "iterations", "learning_rate", "duplicate", "contributors", "missing_workers", "skipped_non_finite", "non_finite_variables", "scalars", "generation", "joint_norm")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    MISSING_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    JOINT_NORM_FIELD_NUMBER: _ClassVar[int]
    step: int
    iterations: int
    learning_rate: float
    duplicate: bool
    contributors: _containers.RepeatedScalarFieldContainer[int]
    missing_workers: _containers.RepeatedScalarFieldContainer[int]
    skipped_non_finite: bool
    non_finite_variables: _containers.RepeatedScalarFieldContainer[str]
    scalars: _containers.ScalarMap[str, float]
    generation: ServerGeneration
    joint_norm: JointNormTerms
    def __init__(self, step: _Optional[int] = ..., iterations: _Optional[int] = ..., learning_rate: _Optional[float] = ..., duplicate: _Optional[bool] = ..., contributors: _Optional[_Iterable[int]] = ..., missing_workers: _Optional[_Iterable[int]] = ..., skipped_non_finite: _Optional[bool] = ..., non_finite_variables: _Optional[_Iterable[str]] = ..., scalars: _Optional[_Mapping[str, float]] = ..., generation: _Optional[_Union[ServerGeneration, _Mapping]] = ..., joint_norm: _Optional[_Union[JointNormTerms, _Mapping]] = ...) -> None: ...

class NormTerm(_message.Message):
    __slots__ = ("name", "dtype", "sum_squares")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    sum_squares: float
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., sum_squares: _Optional[float] = ...) -> None: ...

class JointNormTerms(_message.Message):
    __slots__ = ("terms", "held")
    TERMS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[NormTerm]
    held: bool
    def __init__(self, terms: _Optional[_Iterable[_Union[NormTerm, _Mapping]]] = ..., held: _Optional[bool] = ...) -> None: ...

class ServerGeneration(_message.Message):
    __slots__ = ("server_id", "restored_checkpoint")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    RESTORED_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    restored_checkpoint: str
    def __init__(self, server_id: _Optional[str] = ..., restored_checkpoint: _Optional[str] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ("result", "variables", "variables_in_shared_memory", "variables_in_data_plane")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_IN_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_IN_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    result: StepResult
    variables: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    variables_in_shared_memory: bool
    variables_in_data_plane: bool
    def __init__(self, result: _Optional[_Union[StepResult, _Mapping]] = ..., variables: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., variables_in_shared_memory: _Optional[bool] = ..., variables_in_data_plane: _Optional[bool] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ("model_id", "worker_index")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    worker_index: int
    def __init__(self, model_id: _Optional[str] = ..., worker_index: _Optional[int] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "gradient_offset", "value_offset", "second_value_offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SECOND_VALUE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    gradient_offset: int
    value_offset: int
    second_value_offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., gradient_offset: _Optional[int] = ..., value_offset: _Optional[int] = ..., second_value_offset: _Optional[int] = ...) -> None: ...

class OpenSharedMemoryResponse(_message.Message):
    __slots__ = ("session_id", "path", "nonce", "size", "tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    path: str
    nonce: bytes
    size: int
    tensors: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    def __init__(self, session_id: _Optional[str] = ..., path: _Optional[str] = ..., nonce: _Optional[bytes] = ..., size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ...) -> None: ...

class OpenDataPlaneRequest(_message.Message):
    __slots__ = ("model_id", "worker_index", "frames_only")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ONLY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    worker_index: int
    frames_only: bool
    def __init__(self, model_id: _Optional[str] = ..., worker_index: _Optional[int] = ..., frames_only: _Optional[bool] = ...) -> None: ...

class OpenDataPlaneResponse(_message.Message):
    __slots__ = ("session_id", "port", "secret", "tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    port: int
    secret: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    def __init__(self, session_id: _Optional[str] = ..., port: _Optional[int] = ..., secret: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ...) -> None: ...

class DataPlaneStatus(_message.Message):
    __slots__ = ("code", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model_id", "names")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("state", "variables")
    STATE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    state: StepResult
    variables: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, state: _Optional[_Union[StepResult, _Mapping]] = ..., variables: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("model_id", "names", "include_variables")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    include_variables: bool
    def __init__(self, model_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., include_variables: _Optional[bool] = ...) -> None: ...

class GetWeightsResponse(_message.Message):
    __slots__ = ("state", "tensors")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    state: OptimizerState
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, state: _Optional[_Union[OptimizerState, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class OptimizerState(_message.Message):
    __slots__ = ("iterations", "raw_iterations", "learning_rate", "step", "scalars", "learning_rate_schedule_json", "generation")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_SCHEDULE_JSON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    raw_iterations: int
    learning_rate: float
    step: int
    scalars: _containers.ScalarMap[str, float]
    learning_rate_schedule_json: str
    generation: ServerGeneration
    def __init__(self, iterations: _Optional[int] = ..., raw_iterations: _Optional[int] = ..., learning_rate: _Optional[float] = ..., step: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., learning_rate_schedule_json: _Optional[str] = ..., generation: _Optional[_Union[ServerGeneration, _Mapping]] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("model_id", "state", "has_state", "tensors", "state_fields")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    state: OptimizerState
    has_state: bool
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    state_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., state: _Optional[_Union[OptimizerState, _Mapping]] = ..., has_state: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., state_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class SetWeightsResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: OptimizerState
    def __init__(self, state: _Optional[_Union[OptimizerState, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model_id", "with_stats", "track_updates", "page_token")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WITH_STATS_FIELD_NUMBER: _ClassVar[int]
    TRACK_UPDATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    with_stats: bool
    track_updates: bool
    page_token: str
    def __init__(self, model_id: _Optional[str] = ..., with_stats: _Optional[bool] = ..., track_updates: _Optional[bool] = ..., page_token: _Optional[str] = ...) -> None: ...

class VariableInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "slots", "norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    slots: _containers.RepeatedScalarFieldContainer[str]
    norm: float
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., slots: _Optional[_Iterable[str]] = ..., norm: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("spec", "state", "variables", "waiting_workers", "update_norm", "pushes", "push_seconds", "activity", "owner", "state_bytes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    WAITING_WORKERS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PUSH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    state: OptimizerState
    variables: _containers.RepeatedCompositeFieldContainer[VariableInfo]
    waiting_workers: _containers.RepeatedScalarFieldContainer[int]
    update_norm: float
    pushes: int
    push_seconds: float
    activity: ModelActivity
    owner: str
    state_bytes: int
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., state: _Optional[_Union[OptimizerState, _Mapping]] = ..., variables: _Optional[_Iterable[_Union[VariableInfo, _Mapping]]] = ..., waiting_workers: _Optional[_Iterable[int]] = ..., update_norm: _Optional[float] = ..., pushes: _Optional[int] = ..., push_seconds: _Optional[float] = ..., activity: _Optional[_Union[ModelActivity, _Mapping]] = ..., owner: _Optional[str] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class ModelActivity(_message.Message):
    __slots__ = ("created_unix_s", "creator_worker", "creator_peer", "last_activity_unix_s", "last_activity", "last_worker", "calls_in_flight", "idle_s")
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CREATOR_WORKER_FIELD_NUMBER: _ClassVar[int]
    CREATOR_PEER_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    LAST_WORKER_FIELD_NUMBER: _ClassVar[int]
    CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    created_unix_s: float
    creator_worker: int
    creator_peer: str
    last_activity_unix_s: float
    last_activity: str
    last_worker: int
    calls_in_flight: int
    idle_s: float
    def __init__(self, created_unix_s: _Optional[float] = ..., creator_worker: _Optional[int] = ..., creator_peer: _Optional[str] = ..., last_activity_unix_s: _Optional[float] = ..., last_activity: _Optional[str] = ..., last_worker: _Optional[int] = ..., calls_in_flight: _Optional[int] = ..., idle_s: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id", "if_idle")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IF_IDLE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    if_idle: bool
    def __init__(self, model_id: _Optional[str] = ..., if_idle: _Optional[bool] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class CommitStepRequest(_message.Message):
    __slots__ = ("model_id", "worker_index", "step", "terms", "return_variables")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    RETURN_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    worker_index: int
    step: int
    terms: _containers.RepeatedCompositeFieldContainer[NormTerm]
    return_variables: bool
    def __init__(self, model_id: _Optional[str] = ..., worker_index: _Optional[int] = ..., step: _Optional[int] = ..., terms: _Optional[_Iterable[_Union[NormTerm, _Mapping]]] = ..., return_variables: _Optional[bool] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "models")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    path: str
    models: int
    def __init__(self, path: _Optional[str] = ..., models: _Optional[int] = ...) -> None: ...
