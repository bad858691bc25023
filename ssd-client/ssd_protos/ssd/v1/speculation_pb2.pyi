from ssd_protos.ssd.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_INLINE: _ClassVar[Transport]
    TRANSPORT_NCCL: _ClassVar[Transport]
    TRANSPORT_CUDA_IPC: _ClassVar[Transport]
    TRANSPORT_GLOO: _ClassVar[Transport]

class SpeculationSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECULATION_SOURCE_UNSPECIFIED: _ClassVar[SpeculationSource]
    SPECULATION_SOURCE_CACHE_HIT: _ClassVar[SpeculationSource]
    SPECULATION_SOURCE_JIT: _ClassVar[SpeculationSource]
    SPECULATION_SOURCE_FAST: _ClassVar[SpeculationSource]
    SPECULATION_SOURCE_NONE: _ClassVar[SpeculationSource]
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_INLINE: Transport
TRANSPORT_NCCL: Transport
TRANSPORT_CUDA_IPC: Transport
TRANSPORT_GLOO: Transport
SPECULATION_SOURCE_UNSPECIFIED: SpeculationSource
SPECULATION_SOURCE_CACHE_HIT: SpeculationSource
SPECULATION_SOURCE_JIT: SpeculationSource
SPECULATION_SOURCE_FAST: SpeculationSource
SPECULATION_SOURCE_NONE: SpeculationSource

class ChannelOffer(_message.Message):
    __slots__ = ("transports", "host_id", "gpu_uuid")
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    transports: _containers.RepeatedScalarFieldContainer[Transport]
    host_id: str
    gpu_uuid: str
    def __init__(self, transports: _Optional[_Iterable[_Union[Transport, str]]] = ..., host_id: _Optional[str] = ..., gpu_uuid: _Optional[str] = ...) -> None: ...

class ChannelSetup(_message.Message):
    __slots__ = ("transport", "address", "token", "ipc_handle", "reason")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transport: Transport
    address: str
    token: str
    ipc_handle: bytes
    reason: str
    def __init__(self, transport: _Optional[_Union[Transport, str]] = ..., address: _Optional[str] = ..., token: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class DraftInfo(_message.Message):
    __slots__ = ("model_id", "vocab_size", "tokenizer_fingerprint", "dtype", "proto_version", "max_lookahead", "max_fan_out_budget", "max_sequences", "transports", "backups", "step_fixed_ms", "step_ms_per_token")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROTO_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_FAN_OUT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str
    dtype: str
    proto_version: int
    max_lookahead: int
    max_fan_out_budget: int
    max_sequences: int
    transports: _containers.RepeatedScalarFieldContainer[Transport]
    backups: _containers.RepeatedScalarFieldContainer[_generation_pb2.BackupKind]
    step_fixed_ms: float
    step_ms_per_token: float
    def __init__(self, model_id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., proto_version: _Optional[int] = ..., max_lookahead: _Optional[int] = ..., max_fan_out_budget: _Optional[int] = ..., max_sequences: _Optional[int] = ..., transports: _Optional[_Iterable[_Union[Transport, str]]] = ..., backups: _Optional[_Iterable[_Union[_generation_pb2.BackupKind, str]]] = ..., step_fixed_ms: _Optional[float] = ..., step_ms_per_token: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("endpoint", "draft_id", "info", "auth_token")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    draft_id: str
    info: DraftInfo
    auth_token: str
    def __init__(self, endpoint: _Optional[str] = ..., draft_id: _Optional[str] = ..., info: _Optional[_Union[DraftInfo, _Mapping]] = ..., auth_token: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_id", "lease_ttl_ms", "transport", "target_replica_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_ttl_ms: int
    transport: Transport
    target_replica_id: str
    def __init__(self, lease_id: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ..., transport: _Optional[_Union[Transport, str]] = ..., target_replica_id: _Optional[str] = ...) -> None: ...

class DraftLoad(_message.Message):
    __slots__ = ("active_sequences", "active_sessions", "utilization", "rows_per_step", "branches_per_step", "step_ms", "answer_p50_ms", "answer_p99_ms", "saturated")
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_P50_MS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FIELD_NUMBER: _ClassVar[int]
    active_sequences: int
    active_sessions: int
    utilization: float
    rows_per_step: float
    branches_per_step: float
    step_ms: float
    answer_p50_ms: float
    answer_p99_ms: float
    saturated: bool
    def __init__(self, active_sequences: _Optional[int] = ..., active_sessions: _Optional[int] = ..., utilization: _Optional[float] = ..., rows_per_step: _Optional[float] = ..., branches_per_step: _Optional[float] = ..., step_ms: _Optional[float] = ..., answer_p50_ms: _Optional[float] = ..., answer_p99_ms: _Optional[float] = ..., saturated: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id", "load")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    load: DraftLoad
    def __init__(self, lease_id: _Optional[str] = ..., load: _Optional[_Union[DraftLoad, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("ok", "lease_ttl_ms")
    OK_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    lease_ttl_ms: int
    def __init__(self, ok: _Optional[bool] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("info", "registered_targets", "known_targets")
    INFO_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TARGETS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_TARGETS_FIELD_NUMBER: _ClassVar[int]
    info: DraftInfo
    registered_targets: int
    known_targets: int
    def __init__(self, info: _Optional[_Union[DraftInfo, _Mapping]] = ..., registered_targets: _Optional[int] = ..., known_targets: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("lookahead", "fan_out", "saguaro_c", "backup")
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    SAGUARO_C_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    lookahead: int
    fan_out: _containers.RepeatedScalarFieldContainer[int]
    saguaro_c: float
    backup: _generation_pb2.BackupKind
    def __init__(self, lookahead: _Optional[int] = ..., fan_out: _Optional[_Iterable[int]] = ..., saguaro_c: _Optional[float] = ..., backup: _Optional[_Union[_generation_pb2.BackupKind, str]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("target_replica_id", "lease_id", "config", "transport", "channel", "want_offers")
    TARGET_REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WANT_OFFERS_FIELD_NUMBER: _ClassVar[int]
    target_replica_id: str
    lease_id: str
    config: SessionConfig
    transport: Transport
    channel: ChannelOffer
    want_offers: bool
    def __init__(self, target_replica_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., transport: _Optional[_Union[Transport, str]] = ..., channel: _Optional[_Union[ChannelOffer, _Mapping]] = ..., want_offers: _Optional[bool] = ...) -> None: ...

class DraftSamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SequenceStart(_message.Message):
    __slots__ = ("seq_id", "token_ids", "sampling", "first_round")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: DraftSamplingParams
    first_round: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[DraftSamplingParams, _Mapping]] = ..., first_round: _Optional[int] = ...) -> None: ...

class AddSequences(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceStart]
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceStart, _Mapping]]] = ...) -> None: ...

class SequenceOutcome(_message.Message):
    __slots__ = ("seq_id", "round", "num_accepted", "bonus_token", "committed")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BONUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    round: int
    num_accepted: int
    bonus_token: int
    committed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[str] = ..., round: _Optional[int] = ..., num_accepted: _Optional[int] = ..., bonus_token: _Optional[int] = ..., committed: _Optional[_Iterable[int]] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("step", "outcomes", "want_draft_probs", "probs_over_channel", "answer_not_needed")
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    WANT_DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    PROBS_OVER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ANSWER_NOT_NEEDED_FIELD_NUMBER: _ClassVar[int]
    step: int
    outcomes: _containers.RepeatedCompositeFieldContainer[SequenceOutcome]
    want_draft_probs: bool
    probs_over_channel: bool
    answer_not_needed: bool
    def __init__(self, step: _Optional[int] = ..., outcomes: _Optional[_Iterable[_Union[SequenceOutcome, _Mapping]]] = ..., want_draft_probs: _Optional[bool] = ..., probs_over_channel: _Optional[bool] = ..., answer_not_needed: _Optional[bool] = ...) -> None: ...

class RemoveSequences(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "add", "round", "remove", "close", "reconfigure")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    RECONFIGURE_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    add: AddSequences
    round: RoundRequest
    remove: RemoveSequences
    close: SessionClose
    reconfigure: SessionConfig
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., add: _Optional[_Union[AddSequences, _Mapping]] = ..., round: _Optional[_Union[RoundRequest, _Mapping]] = ..., remove: _Optional[_Union[RemoveSequences, _Mapping]] = ..., close: _Optional[_Union[SessionClose, _Mapping]] = ..., reconfigure: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class SequenceSpeculation(_message.Message):
    __slots__ = ("seq_id", "round", "tokens", "source", "probs", "probs_handle")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    PROBS_HANDLE_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    round: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    source: SpeculationSource
    probs: Tensor
    probs_handle: int
    def __init__(self, seq_id: _Optional[str] = ..., round: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[SpeculationSource, str]] = ..., probs: _Optional[_Union[Tensor, _Mapping]] = ..., probs_handle: _Optional[int] = ...) -> None: ...

class SpeculationTimings(_message.Message):
    __slots__ = ("queue_ns", "lookup_ns", "jit_ns", "encode_ns", "total_ns", "prefetch_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_NS_FIELD_NUMBER: _ClassVar[int]
    JIT_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    lookup_ns: int
    jit_ns: int
    encode_ns: int
    total_ns: int
    prefetch_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., lookup_ns: _Optional[int] = ..., jit_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., prefetch_ns: _Optional[int] = ...) -> None: ...

class Speculations(_message.Message):
    __slots__ = ("step", "sequences", "timings", "channel_probs")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PROBS_FIELD_NUMBER: _ClassVar[int]
    step: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceSpeculation]
    timings: SpeculationTimings
    channel_probs: Tensor
    def __init__(self, step: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceSpeculation, _Mapping]]] = ..., timings: _Optional[_Union[SpeculationTimings, _Mapping]] = ..., channel_probs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "config", "channel")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    channel: ChannelSetup
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., channel: _Optional[_Union[ChannelSetup, _Mapping]] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message", "seq_ids")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CacheOffer(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceOffer]
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceOffer, _Mapping]]] = ...) -> None: ...

class SequenceOffer(_message.Message):
    __slots__ = ("seq_id", "round", "entries")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    round: int
    entries: _containers.RepeatedCompositeFieldContainer[OfferEntry]
    def __init__(self, seq_id: _Optional[str] = ..., round: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[OfferEntry, _Mapping]]] = ...) -> None: ...

class OfferEntry(_message.Message):
    __slots__ = ("num_accepted", "bonus_token", "tokens")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BONUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    bonus_token: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_accepted: _Optional[int] = ..., bonus_token: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("speculations", "error", "opened", "offer")
    SPECULATIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    speculations: Speculations
    error: SessionError
    opened: SessionOpened
    offer: CacheOffer
    def __init__(self, speculations: _Optional[_Union[Speculations, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., offer: _Optional[_Union[CacheOffer, _Mapping]] = ...) -> None: ...
