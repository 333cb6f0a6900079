from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawImage(_message.Message):
    __slots__ = ("height", "width", "channels", "pixels")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    pixels: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., pixels: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "raw")
    DATA_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    raw: RawImage
    def __init__(self, data: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "model_version", "image", "top_k", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    image: Image
    top_k: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("class_id", "label", "score")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    score: float
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResult(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, classes: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "model_version", "classes", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    classes: _containers.RepeatedCompositeFieldContainer[Classification]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResult]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[ClassifyResult, _Mapping]]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model", "model_version", "image", "images", "confidence_threshold", "iou_threshold", "class_agnostic", "max_detections", "class_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLASS_AGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    image: Image
    images: _containers.RepeatedCompositeFieldContainer[Image]
    confidence_threshold: float
    iou_threshold: float
    class_agnostic: bool
    max_detections: int
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., confidence_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., class_agnostic: _Optional[bool] = ..., max_detections: _Optional[int] = ..., class_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "score", "class_id", "label")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    class_id: int
    label: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., class_id: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class DetectResult(_message.Message):
    __slots__ = ("detections", "width", "height")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    width: int
    height: int
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("model", "model_version", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[DetectResult]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[DetectResult, _Mapping]]] = ...) -> None: ...

class DetectFrame(_message.Message):
    __slots__ = ("frame_id", "request")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    request: DetectRequest
    def __init__(self, frame_id: _Optional[int] = ..., request: _Optional[_Union[DetectRequest, _Mapping]] = ...) -> None: ...

class DetectFrameResult(_message.Message):
    __slots__ = ("frame_id", "response", "error_code", "error_message")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    response: DetectResponse
    error_code: str
    error_message: str
    def __init__(self, frame_id: _Optional[int] = ..., response: _Optional[_Union[DetectResponse, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "model_version", "image", "images", "return_rle", "confidence_threshold", "iou_threshold", "max_detections", "class_agnostic", "class_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_RLE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_AGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    image: Image
    images: _containers.RepeatedCompositeFieldContainer[Image]
    return_rle: bool
    confidence_threshold: float
    iou_threshold: float
    max_detections: int
    class_agnostic: bool
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., return_rle: _Optional[bool] = ..., confidence_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., class_agnostic: _Optional[bool] = ..., class_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassMask(_message.Message):
    __slots__ = ("class_id", "label", "pixel_count", "rle_counts")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    RLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    pixel_count: int
    rle_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., pixel_count: _Optional[int] = ..., rle_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("box", "score", "class_id", "label", "mask_png", "mask_x", "mask_y", "mask_width", "mask_height", "pixel_count", "rle_counts")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_X_FIELD_NUMBER: _ClassVar[int]
    MASK_Y_FIELD_NUMBER: _ClassVar[int]
    MASK_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MASK_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    RLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    class_id: int
    label: str
    mask_png: bytes
    mask_x: int
    mask_y: int
    mask_width: int
    mask_height: int
    pixel_count: int
    rle_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., class_id: _Optional[int] = ..., label: _Optional[str] = ..., mask_png: _Optional[bytes] = ..., mask_x: _Optional[int] = ..., mask_y: _Optional[int] = ..., mask_width: _Optional[int] = ..., mask_height: _Optional[int] = ..., pixel_count: _Optional[int] = ..., rle_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class SegmentResult(_message.Message):
    __slots__ = ("mask_png", "width", "height", "classes", "instances")
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    mask_png: bytes
    width: int
    height: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassMask]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, mask_png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassMask, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("model", "model_version", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[SegmentResult]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SegmentResult, _Mapping]]] = ...) -> None: ...

class CaptionRequest(_message.Message):
    __slots__ = ("model", "model_version", "image", "images", "beam_size", "max_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    image: Image
    images: _containers.RepeatedCompositeFieldContainer[Image]
    beam_size: int
    max_length: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., beam_size: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("text", "log_prob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    log_prob: float
    def __init__(self, text: _Optional[str] = ..., log_prob: _Optional[float] = ...) -> None: ...

class CaptionResult(_message.Message):
    __slots__ = ("text", "tokens", "log_prob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    log_prob: float
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., log_prob: _Optional[float] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("model", "model_version", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[CaptionResult]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[CaptionResult, _Mapping]]] = ...) -> None: ...

class ModelMetadataRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("height", "width", "resize", "pipeline", "color")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    resize: str
    pipeline: str
    color: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., resize: _Optional[str] = ..., pipeline: _Optional[str] = ..., color: _Optional[str] = ...) -> None: ...

class ModelMetadataResponse(_message.Message):
    __slots__ = ("model", "served_by", "model_version", "versions", "task", "method", "labels", "input", "defaults")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    served_by: str
    model_version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    task: str
    method: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: InputInfo
    defaults: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., served_by: _Optional[str] = ..., model_version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., method: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputInfo, _Mapping]] = ..., defaults: _Optional[_Mapping[str, str]] = ...) -> None: ...
