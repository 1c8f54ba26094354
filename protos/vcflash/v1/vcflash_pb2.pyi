from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Clock(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOCK_MEDIA: _ClassVar[Clock]
    CLOCK_WALL: _ClassVar[Clock]

class Selection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_DEFAULT: _ClassVar[Selection]
    SELECTION_UNIFORM: _ClassVar[Selection]
    SELECTION_RETRIEVAL: _ClassVar[Selection]
    SELECTION_SCAN: _ClassVar[Selection]
    SELECTION_INDEX: _ClassVar[Selection]
CLOCK_MEDIA: Clock
CLOCK_WALL: Clock
SELECTION_DEFAULT: Selection
SELECTION_UNIFORM: Selection
SELECTION_RETRIEVAL: Selection
SELECTION_SCAN: Selection
SELECTION_INDEX: Selection

class TimeRange(_message.Message):
    __slots__ = ("start", "end", "clock")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    start: float
    end: float
    clock: Clock
    def __init__(self, start: _Optional[float] = ..., end: _Optional[float] = ..., clock: _Optional[_Union[Clock, str]] = ...) -> None: ...

class ClipInfo(_message.Message):
    __slots__ = ("stream_id", "seq", "wall_start", "wall_end", "media_start", "media_end", "frame_media_times")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WALL_START_FIELD_NUMBER: _ClassVar[int]
    WALL_END_FIELD_NUMBER: _ClassVar[int]
    MEDIA_START_FIELD_NUMBER: _ClassVar[int]
    MEDIA_END_FIELD_NUMBER: _ClassVar[int]
    FRAME_MEDIA_TIMES_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    seq: int
    wall_start: float
    wall_end: float
    media_start: float
    media_end: float
    frame_media_times: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, stream_id: _Optional[str] = ..., seq: _Optional[int] = ..., wall_start: _Optional[float] = ..., wall_end: _Optional[float] = ..., media_start: _Optional[float] = ..., media_end: _Optional[float] = ..., frame_media_times: _Optional[_Iterable[float]] = ...) -> None: ...

class AddStreamRequest(_message.Message):
    __slots__ = ("stream_id", "source", "fps", "realtime", "loop", "retention_max_age_s", "retention_max_bytes", "transport", "keyframes_only", "listen", "live", "camera_clock", "record")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    REALTIME_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KEYFRAMES_ONLY_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CAMERA_CLOCK_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    source: str
    fps: float
    realtime: bool
    loop: bool
    retention_max_age_s: float
    retention_max_bytes: int
    transport: str
    keyframes_only: bool
    listen: bool
    live: bool
    camera_clock: bool
    record: bool
    def __init__(self, stream_id: _Optional[str] = ..., source: _Optional[str] = ..., fps: _Optional[float] = ..., realtime: _Optional[bool] = ..., loop: _Optional[bool] = ..., retention_max_age_s: _Optional[float] = ..., retention_max_bytes: _Optional[int] = ..., transport: _Optional[str] = ..., keyframes_only: _Optional[bool] = ..., listen: _Optional[bool] = ..., live: _Optional[bool] = ..., camera_clock: _Optional[bool] = ..., record: _Optional[bool] = ...) -> None: ...

class StreamStatus(_message.Message):
    __slots__ = ("stream_id", "source", "fps", "state", "error", "frames_in", "frames_sampled", "frames_dropped", "clips_emitted", "clips_stored", "last_media_time", "last_wall_time", "reconnects", "memory_error", "clock", "decode", "recording_bytes")
    class FramesDroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    CLIPS_EMITTED_FIELD_NUMBER: _ClassVar[int]
    CLIPS_STORED_FIELD_NUMBER: _ClassVar[int]
    LAST_MEDIA_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ERROR_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    RECORDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    source: str
    fps: float
    state: str
    error: str
    frames_in: int
    frames_sampled: int
    frames_dropped: _containers.ScalarMap[str, int]
    clips_emitted: int
    clips_stored: int
    last_media_time: float
    last_wall_time: float
    reconnects: int
    memory_error: str
    clock: str
    decode: str
    recording_bytes: int
    def __init__(self, stream_id: _Optional[str] = ..., source: _Optional[str] = ..., fps: _Optional[float] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., frames_in: _Optional[int] = ..., frames_sampled: _Optional[int] = ..., frames_dropped: _Optional[_Mapping[str, int]] = ..., clips_emitted: _Optional[int] = ..., clips_stored: _Optional[int] = ..., last_media_time: _Optional[float] = ..., last_wall_time: _Optional[float] = ..., reconnects: _Optional[int] = ..., memory_error: _Optional[str] = ..., clock: _Optional[str] = ..., decode: _Optional[str] = ..., recording_bytes: _Optional[int] = ...) -> None: ...

class RemoveStreamRequest(_message.Message):
    __slots__ = ("stream_id", "delete_memory")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DELETE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    delete_memory: bool
    def __init__(self, stream_id: _Optional[str] = ..., delete_memory: _Optional[bool] = ...) -> None: ...

class RemoveStreamResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStreamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStreamsResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamStatus]
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamStatus, _Mapping]]] = ...) -> None: ...

class GetStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class RestartStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class ListClipsRequest(_message.Message):
    __slots__ = ("stream_id", "range", "limit")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    range: TimeRange
    limit: int
    def __init__(self, stream_id: _Optional[str] = ..., range: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListClipsResponse(_message.Message):
    __slots__ = ("clips", "truncated")
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    clips: _containers.RepeatedCompositeFieldContainer[ClipInfo]
    truncated: bool
    def __init__(self, clips: _Optional[_Iterable[_Union[ClipInfo, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class StreamMemoryStats(_message.Message):
    __slots__ = ("stream_id", "clips", "bytes", "first", "last", "retention_max_age_s", "retention_max_bytes", "evicted_clips", "configured", "active", "recording_bytes")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    RETENTION_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_CLIPS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    RECORDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    clips: int
    bytes: int
    first: ClipInfo
    last: ClipInfo
    retention_max_age_s: float
    retention_max_bytes: int
    evicted_clips: int
    configured: bool
    active: bool
    recording_bytes: int
    def __init__(self, stream_id: _Optional[str] = ..., clips: _Optional[int] = ..., bytes: _Optional[int] = ..., first: _Optional[_Union[ClipInfo, _Mapping]] = ..., last: _Optional[_Union[ClipInfo, _Mapping]] = ..., retention_max_age_s: _Optional[float] = ..., retention_max_bytes: _Optional[int] = ..., evicted_clips: _Optional[int] = ..., configured: _Optional[bool] = ..., active: _Optional[bool] = ..., recording_bytes: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamMemoryStats]
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamMemoryStats, _Mapping]]] = ...) -> None: ...

class DeleteStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class DeleteStreamResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetThumbnailsRequest(_message.Message):
    __slots__ = ("stream_id", "range", "limit")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    range: TimeRange
    limit: int
    def __init__(self, stream_id: _Optional[str] = ..., range: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class Thumbnail(_message.Message):
    __slots__ = ("clip", "jpeg")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    clip: ClipInfo
    jpeg: bytes
    def __init__(self, clip: _Optional[_Union[ClipInfo, _Mapping]] = ..., jpeg: _Optional[bytes] = ...) -> None: ...

class GetThumbnailsResponse(_message.Message):
    __slots__ = ("thumbnails", "truncated", "next_start")
    THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_FIELD_NUMBER: _ClassVar[int]
    thumbnails: _containers.RepeatedCompositeFieldContainer[Thumbnail]
    truncated: bool
    next_start: float
    def __init__(self, thumbnails: _Optional[_Iterable[_Union[Thumbnail, _Mapping]]] = ..., truncated: _Optional[bool] = ..., next_start: _Optional[float] = ...) -> None: ...

class EncodeClipRequest(_message.Message):
    __slots__ = ("stream_id", "seq", "media_times", "wall_times", "height", "width", "frames", "fps", "thumbnail")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TIMES_FIELD_NUMBER: _ClassVar[int]
    WALL_TIMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    seq: int
    media_times: _containers.RepeatedScalarFieldContainer[float]
    wall_times: _containers.RepeatedScalarFieldContainer[float]
    height: int
    width: int
    frames: bytes
    fps: float
    thumbnail: bytes
    def __init__(self, stream_id: _Optional[str] = ..., seq: _Optional[int] = ..., media_times: _Optional[_Iterable[float]] = ..., wall_times: _Optional[_Iterable[float]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., frames: _Optional[bytes] = ..., fps: _Optional[float] = ..., thumbnail: _Optional[bytes] = ...) -> None: ...

class EncodeClipAck(_message.Message):
    __slots__ = ("stream_id", "seq", "stored", "error")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    seq: int
    stored: bool
    error: str
    def __init__(self, stream_id: _Optional[str] = ..., seq: _Optional[int] = ..., stored: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AddAlertRequest(_message.Message):
    __slots__ = ("name", "stream_ids", "question", "window_frames", "every_clips", "threshold", "min_duration_s", "cooldown_s", "webhook_url", "mqtt_topic")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EVERY_CLIPS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    MQTT_TOPIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    stream_ids: _containers.RepeatedScalarFieldContainer[str]
    question: str
    window_frames: int
    every_clips: int
    threshold: float
    min_duration_s: float
    cooldown_s: float
    webhook_url: str
    mqtt_topic: str
    def __init__(self, name: _Optional[str] = ..., stream_ids: _Optional[_Iterable[str]] = ..., question: _Optional[str] = ..., window_frames: _Optional[int] = ..., every_clips: _Optional[int] = ..., threshold: _Optional[float] = ..., min_duration_s: _Optional[float] = ..., cooldown_s: _Optional[float] = ..., webhook_url: _Optional[str] = ..., mqtt_topic: _Optional[str] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("name", "stream_ids", "question", "window_frames", "every_clips", "threshold", "min_duration_s", "cooldown_s", "webhook_url", "mqtt_topic", "created_wall", "webhook_secret")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EVERY_CLIPS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    MQTT_TOPIC_FIELD_NUMBER: _ClassVar[int]
    CREATED_WALL_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_SECRET_FIELD_NUMBER: _ClassVar[int]
    name: str
    stream_ids: _containers.RepeatedScalarFieldContainer[str]
    question: str
    window_frames: int
    every_clips: int
    threshold: float
    min_duration_s: float
    cooldown_s: float
    webhook_url: str
    mqtt_topic: str
    created_wall: float
    webhook_secret: str
    def __init__(self, name: _Optional[str] = ..., stream_ids: _Optional[_Iterable[str]] = ..., question: _Optional[str] = ..., window_frames: _Optional[int] = ..., every_clips: _Optional[int] = ..., threshold: _Optional[float] = ..., min_duration_s: _Optional[float] = ..., cooldown_s: _Optional[float] = ..., webhook_url: _Optional[str] = ..., mqtt_topic: _Optional[str] = ..., created_wall: _Optional[float] = ..., webhook_secret: _Optional[str] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class RemoveAlertRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveAlertResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_id", "alert", "follow", "range")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    alert: str
    follow: bool
    range: TimeRange
    def __init__(self, after_id: _Optional[int] = ..., alert: _Optional[str] = ..., follow: _Optional[bool] = ..., range: _Optional[_Union[TimeRange, _Mapping]] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("id", "key", "kind", "alert", "stream_id", "event", "start_media_s", "end_media_s", "start_wall", "end_wall", "peak", "score", "clips", "emitted_wall")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    START_MEDIA_S_FIELD_NUMBER: _ClassVar[int]
    END_MEDIA_S_FIELD_NUMBER: _ClassVar[int]
    START_WALL_FIELD_NUMBER: _ClassVar[int]
    END_WALL_FIELD_NUMBER: _ClassVar[int]
    PEAK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_WALL_FIELD_NUMBER: _ClassVar[int]
    id: int
    key: str
    kind: str
    alert: str
    stream_id: str
    event: str
    start_media_s: float
    end_media_s: float
    start_wall: float
    end_wall: float
    peak: float
    score: float
    clips: _containers.RepeatedScalarFieldContainer[int]
    emitted_wall: float
    def __init__(self, id: _Optional[int] = ..., key: _Optional[str] = ..., kind: _Optional[str] = ..., alert: _Optional[str] = ..., stream_id: _Optional[str] = ..., event: _Optional[str] = ..., start_media_s: _Optional[float] = ..., end_media_s: _Optional[float] = ..., start_wall: _Optional[float] = ..., end_wall: _Optional[float] = ..., peak: _Optional[float] = ..., score: _Optional[float] = ..., clips: _Optional[_Iterable[int]] = ..., emitted_wall: _Optional[float] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("stream_ids", "question", "range", "max_frames", "selection", "dropout", "generation", "history", "wall_clock_anchors")
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    stream_ids: _containers.RepeatedScalarFieldContainer[str]
    question: str
    range: TimeRange
    max_frames: int
    selection: Selection
    dropout: str
    generation: Generation
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    wall_clock_anchors: bool
    def __init__(self, stream_ids: _Optional[_Iterable[str]] = ..., question: _Optional[str] = ..., range: _Optional[_Union[TimeRange, _Mapping]] = ..., max_frames: _Optional[int] = ..., selection: _Optional[_Union[Selection, str]] = ..., dropout: _Optional[str] = ..., generation: _Optional[_Union[Generation, _Mapping]] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., wall_clock_anchors: _Optional[bool] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("question", "answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("text", "result")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    text: str
    result: AskResult
    def __init__(self, text: _Optional[str] = ..., result: _Optional[_Union[AskResult, _Mapping]] = ...) -> None: ...

class AskResult(_message.Message):
    __slots__ = ("answer", "evidence", "frames", "visual_tokens", "prompt_tokens", "new_tokens", "duration_s", "timings_s", "note", "moments")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    frames: int
    visual_tokens: int
    prompt_tokens: int
    new_tokens: int
    duration_s: float
    timings_s: _containers.ScalarMap[str, float]
    note: str
    moments: _containers.RepeatedCompositeFieldContainer[Moment]
    def __init__(self, answer: _Optional[str] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ..., frames: _Optional[int] = ..., visual_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., duration_s: _Optional[float] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., note: _Optional[str] = ..., moments: _Optional[_Iterable[_Union[Moment, _Mapping]]] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("clip", "retrieved", "score")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    clip: ClipInfo
    retrieved: bool
    score: float
    def __init__(self, clip: _Optional[_Union[ClipInfo, _Mapping]] = ..., retrieved: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("stream_ids", "question", "range", "limit", "selection")
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    stream_ids: _containers.RepeatedScalarFieldContainer[str]
    question: str
    range: TimeRange
    limit: int
    selection: Selection
    def __init__(self, stream_ids: _Optional[_Iterable[str]] = ..., question: _Optional[str] = ..., range: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ..., selection: _Optional[_Union[Selection, str]] = ...) -> None: ...

class Moment(_message.Message):
    __slots__ = ("stream_id", "media_start", "media_end", "wall_start", "wall_end", "score", "first_seq", "last_seq")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_START_FIELD_NUMBER: _ClassVar[int]
    MEDIA_END_FIELD_NUMBER: _ClassVar[int]
    WALL_START_FIELD_NUMBER: _ClassVar[int]
    WALL_END_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    media_start: float
    media_end: float
    wall_start: float
    wall_end: float
    score: float
    first_seq: int
    last_seq: int
    def __init__(self, stream_id: _Optional[str] = ..., media_start: _Optional[float] = ..., media_end: _Optional[float] = ..., wall_start: _Optional[float] = ..., wall_end: _Optional[float] = ..., score: _Optional[float] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("moments", "clips_scored", "timings_s", "note")
    class TimingsSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    CLIPS_SCORED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    moments: _containers.RepeatedCompositeFieldContainer[Moment]
    clips_scored: int
    timings_s: _containers.ScalarMap[str, float]
    note: str
    def __init__(self, moments: _Optional[_Iterable[_Union[Moment, _Mapping]]] = ..., clips_scored: _Optional[int] = ..., timings_s: _Optional[_Mapping[str, float]] = ..., note: _Optional[str] = ...) -> None: ...
