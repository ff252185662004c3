from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    DONE: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
    REVIEW: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
DONE: JobState
FAILED: JobState
CANCELLED: JobState
REVIEW: JobState

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Worker(_message.Message):
    __slots__ = ("index", "device", "pid", "state", "job_id", "node")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    device: str
    pid: int
    state: str
    job_id: str
    node: str
    def __init__(self, index: _Optional[int] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., job_id: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("address", "resource", "nodes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    address: str
    resource: str
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, address: _Optional[str] = ..., resource: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("id", "address", "alive", "gpus", "gpus_free", "labels")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FREE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    alive: bool
    gpus: float
    gpus_free: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., alive: _Optional[bool] = ..., gpus: _Optional[float] = ..., gpus_free: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "pid", "started", "home", "inbox", "outputs", "models", "default_model", "workers", "jobs_by_state", "pending_folders", "last_event_seq", "quiet_seconds", "captioner", "cluster")
    class JobsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FOLDERS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    QUIET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    started: float
    home: str
    inbox: str
    outputs: str
    models: str
    default_model: str
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    jobs_by_state: _containers.ScalarMap[str, int]
    pending_folders: _containers.RepeatedScalarFieldContainer[str]
    last_event_seq: int
    quiet_seconds: float
    captioner: str
    cluster: Cluster
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., started: _Optional[float] = ..., home: _Optional[str] = ..., inbox: _Optional[str] = ..., outputs: _Optional[str] = ..., models: _Optional[str] = ..., default_model: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., jobs_by_state: _Optional[_Mapping[str, int]] = ..., pending_folders: _Optional[_Iterable[str]] = ..., last_event_seq: _Optional[int] = ..., quiet_seconds: _Optional[float] = ..., captioner: _Optional[str] = ..., cluster: _Optional[_Union[Cluster, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("dataset", "overrides", "name", "model", "block_vector")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_VECTOR_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    overrides: _containers.RepeatedScalarFieldContainer[str]
    name: str
    model: str
    block_vector: str
    def __init__(self, dataset: _Optional[str] = ..., overrides: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ..., model: _Optional[str] = ..., block_vector: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("job", "data")
    JOB_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job: SubmitJobRequest
    data: bytes
    def __init__(self, job: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "loss", "avg_loss", "lr_unet", "lr_te", "rate", "eta_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    AVG_LOSS_FIELD_NUMBER: _ClassVar[int]
    LR_UNET_FIELD_NUMBER: _ClassVar[int]
    LR_TE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    loss: float
    avg_loss: float
    lr_unet: float
    lr_te: float
    rate: float
    eta_s: float
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., avg_loss: _Optional[float] = ..., lr_unet: _Optional[float] = ..., lr_te: _Optional[float] = ..., rate: _Optional[float] = ..., eta_s: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "number", "name", "state", "source", "dataset", "model", "block_vector", "recipe_toml", "created", "started", "ended", "error", "attempts", "progress", "out_dir", "final", "resized", "chopped", "last_seq", "captioner", "trigger", "review")
    ID_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_VECTOR_FIELD_NUMBER: _ClassVar[int]
    RECIPE_TOML_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    RESIZED_FIELD_NUMBER: _ClassVar[int]
    CHOPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTIONER_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    id: str
    number: int
    name: str
    state: JobState
    source: str
    dataset: str
    model: str
    block_vector: str
    recipe_toml: str
    created: float
    started: float
    ended: float
    error: str
    attempts: int
    progress: Progress
    out_dir: str
    final: str
    resized: str
    chopped: str
    last_seq: int
    captioner: str
    trigger: str
    review: bool
    def __init__(self, id: _Optional[str] = ..., number: _Optional[int] = ..., name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., source: _Optional[str] = ..., dataset: _Optional[str] = ..., model: _Optional[str] = ..., block_vector: _Optional[str] = ..., recipe_toml: _Optional[str] = ..., created: _Optional[float] = ..., started: _Optional[float] = ..., ended: _Optional[float] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., out_dir: _Optional[str] = ..., final: _Optional[str] = ..., resized: _Optional[str] = ..., chopped: _Optional[str] = ..., last_seq: _Optional[int] = ..., captioner: _Optional[str] = ..., trigger: _Optional[str] = ..., review: _Optional[bool] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("job_id", "since", "follow", "kinds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    since: int
    follow: bool
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., since: _Optional[int] = ..., follow: _Optional[bool] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("level", "text")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    level: str
    text: str
    def __init__(self, level: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class StageChange(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    def __init__(self, stage: _Optional[str] = ...) -> None: ...

class SampleReady(_message.Message):
    __slots__ = ("path", "step", "prompt_index", "prompt")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    prompt_index: int
    prompt: str
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., prompt_index: _Optional[int] = ..., prompt: _Optional[str] = ...) -> None: ...

class ArtifactReady(_message.Message):
    __slots__ = ("path", "kind", "bytes", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: str
    bytes: int
    step: int
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[str] = ..., bytes: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "error")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    error: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., error: _Optional[str] = ...) -> None: ...

class PreviewProgress(_message.Message):
    __slots__ = ("request_id", "image", "images", "step", "steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: int
    images: int
    step: int
    steps: int
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[int] = ..., images: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "global_seq", "job_id", "time", "kind", "log", "stage", "progress", "sample", "artifact", "state", "other_json", "preview")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OTHER_JSON_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    seq: int
    global_seq: int
    job_id: str
    time: float
    kind: str
    log: LogLine
    stage: StageChange
    progress: Progress
    sample: SampleReady
    artifact: ArtifactReady
    state: StateChange
    other_json: str
    preview: PreviewProgress
    def __init__(self, seq: _Optional[int] = ..., global_seq: _Optional[int] = ..., job_id: _Optional[str] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ..., stage: _Optional[_Union[StageChange, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., sample: _Optional[_Union[SampleReady, _Mapping]] = ..., artifact: _Optional[_Union[ArtifactReady, _Mapping]] = ..., state: _Optional[_Union[StateChange, _Mapping]] = ..., other_json: _Optional[str] = ..., preview: _Optional[_Union[PreviewProgress, _Mapping]] = ...) -> None: ...

class GetSampleRequest(_message.Message):
    __slots__ = ("path", "job_id", "seq", "max_size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    job_id: str
    seq: int
    max_size: int
    def __init__(self, path: _Optional[str] = ..., job_id: _Optional[str] = ..., seq: _Optional[int] = ..., max_size: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("path", "png", "width", "height", "original_width", "original_height")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    path: str
    png: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    def __init__(self, path: _Optional[str] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., original_width: _Optional[int] = ..., original_height: _Optional[int] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("path", "kind", "bytes", "job_id", "mtime")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: str
    bytes: int
    job_id: str
    mtime: float
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[str] = ..., bytes: _Optional[int] = ..., job_id: _Optional[str] = ..., mtime: _Optional[float] = ...) -> None: ...

class ListArtifactsReply(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("name", "label", "tensors", "energy", "share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    label: str
    tensors: int
    energy: float
    share: float
    def __init__(self, name: _Optional[str] = ..., label: _Optional[str] = ..., tensors: _Optional[int] = ..., energy: _Optional[float] = ..., share: _Optional[float] = ...) -> None: ...

class Preset(_message.Message):
    __slots__ = ("name", "vector")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    vector: str
    def __init__(self, name: _Optional[str] = ..., vector: _Optional[str] = ...) -> None: ...

class BlockLayoutReply(_message.Message):
    __slots__ = ("path", "blocks", "pass_through", "vector", "presets")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PASS_THROUGH_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PRESETS_FIELD_NUMBER: _ClassVar[int]
    path: str
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    pass_through: int
    vector: str
    presets: _containers.RepeatedCompositeFieldContainer[Preset]
    def __init__(self, path: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ..., pass_through: _Optional[int] = ..., vector: _Optional[str] = ..., presets: _Optional[_Iterable[_Union[Preset, _Mapping]]] = ...) -> None: ...

class ChopRequest(_message.Message):
    __slots__ = ("path", "vector")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    path: str
    vector: str
    def __init__(self, path: _Optional[str] = ..., vector: _Optional[str] = ...) -> None: ...

class ResizeRequest(_message.Message):
    __slots__ = ("path", "recipe")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    recipe: str
    def __init__(self, path: _Optional[str] = ..., recipe: _Optional[str] = ...) -> None: ...

class PreviewRequest(_message.Message):
    __slots__ = ("path", "vector", "prompts", "seed", "max_size", "steps", "request_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    vector: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    max_size: int
    steps: int
    request_id: str
    def __init__(self, path: _Optional[str] = ..., vector: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., max_size: _Optional[int] = ..., steps: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class PreviewReply(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Caption(_message.Message):
    __slots__ = ("image", "caption_file", "text", "exists")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FILE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    image: str
    caption_file: str
    text: str
    exists: bool
    def __init__(self, image: _Optional[str] = ..., caption_file: _Optional[str] = ..., text: _Optional[str] = ..., exists: _Optional[bool] = ...) -> None: ...

class ListCaptionsReply(_message.Message):
    __slots__ = ("captions",)
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[Caption]
    def __init__(self, captions: _Optional[_Iterable[_Union[Caption, _Mapping]]] = ...) -> None: ...

class SetCaptionRequest(_message.Message):
    __slots__ = ("job_id", "image", "text")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    image: str
    text: str
    def __init__(self, job_id: _Optional[str] = ..., image: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...
