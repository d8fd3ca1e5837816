from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_PROTOTYPE: _ClassVar[Method]
    METHOD_KNN: _ClassVar[Method]
    METHOD_ZERO_SHOT: _ClassVar[Method]
    METHOD_HYBRID: _ClassVar[Method]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]
    METRIC_L2: _ClassVar[Metric]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_MARGIN: _ClassVar[Strategy]
    STRATEGY_ENTROPY: _ClassVar[Strategy]
    STRATEGY_LEAST_CONFIDENCE: _ClassVar[Strategy]
    STRATEGY_DIVERSE: _ClassVar[Strategy]
METHOD_UNSPECIFIED: Method
METHOD_PROTOTYPE: Method
METHOD_KNN: Method
METHOD_ZERO_SHOT: Method
METHOD_HYBRID: Method
METRIC_UNSPECIFIED: Metric
METRIC_COSINE: Metric
METRIC_L2: Metric
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_MARGIN: Strategy
STRATEGY_ENTROPY: Strategy
STRATEGY_LEAST_CONFIDENCE: Strategy
STRATEGY_DIVERSE: Strategy

class Collection(_message.Message):
    __slots__ = ("name", "model", "method", "metric", "open_set_threshold", "hybrid_alpha", "hybrid_beta", "class_count", "support_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    OPEN_SET_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HYBRID_ALPHA_FIELD_NUMBER: _ClassVar[int]
    HYBRID_BETA_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    method: Method
    metric: Metric
    open_set_threshold: float
    hybrid_alpha: float
    hybrid_beta: float
    class_count: int
    support_count: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., metric: _Optional[_Union[Metric, str]] = ..., open_set_threshold: _Optional[float] = ..., hybrid_alpha: _Optional[float] = ..., hybrid_beta: _Optional[float] = ..., class_count: _Optional[int] = ..., support_count: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: Collection
    def __init__(self, collection: _Optional[_Union[Collection, _Mapping]] = ...) -> None: ...

class GetCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[Collection]
    def __init__(self, collections: _Optional[_Iterable[_Union[Collection, _Mapping]]] = ...) -> None: ...

class DeleteCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Support(_message.Message):
    __slots__ = ("image", "text", "source")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    text: str
    source: str
    def __init__(self, image: _Optional[bytes] = ..., text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ClassInfo(_message.Message):
    __slots__ = ("label", "image_supports", "text_supports", "support_ids")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SUPPORTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_SUPPORTS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    label: str
    image_supports: int
    text_supports: int
    support_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, label: _Optional[str] = ..., image_supports: _Optional[int] = ..., text_supports: _Optional[int] = ..., support_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterClassRequest(_message.Message):
    __slots__ = ("collection", "label", "supports", "template_set", "templates")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_SET_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    label: str
    supports: _containers.RepeatedCompositeFieldContainer[Support]
    template_set: str
    templates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., label: _Optional[str] = ..., supports: _Optional[_Iterable[_Union[Support, _Mapping]]] = ..., template_set: _Optional[str] = ..., templates: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterClassResponse(_message.Message):
    __slots__ = ("class_info", "added_support_ids")
    CLASS_INFO_FIELD_NUMBER: _ClassVar[int]
    ADDED_SUPPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    class_info: ClassInfo
    added_support_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, class_info: _Optional[_Union[ClassInfo, _Mapping]] = ..., added_support_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveSupportRequest(_message.Message):
    __slots__ = ("collection", "label", "support_id")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_ID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    label: str
    support_id: int
    def __init__(self, collection: _Optional[str] = ..., label: _Optional[str] = ..., support_id: _Optional[int] = ...) -> None: ...

class RemoveSupportResponse(_message.Message):
    __slots__ = ("class_info",)
    CLASS_INFO_FIELD_NUMBER: _ClassVar[int]
    class_info: ClassInfo
    def __init__(self, class_info: _Optional[_Union[ClassInfo, _Mapping]] = ...) -> None: ...

class RemoveClassRequest(_message.Message):
    __slots__ = ("collection", "label")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    label: str
    def __init__(self, collection: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class RemoveClassResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClassRequest(_message.Message):
    __slots__ = ("collection", "label")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    label: str
    def __init__(self, collection: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class ListClassesRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class ListClassesResponse(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassInfo]
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassInfo, _Mapping]]] = ...) -> None: ...

class ClassifyOptions(_message.Message):
    __slots__ = ("top_k", "method", "transductive")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TRANSDUCTIVE_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    method: Method
    transductive: bool
    def __init__(self, top_k: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ..., transductive: _Optional[bool] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    probability: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("predictions", "entropy", "margin", "unknown", "id")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    entropy: float
    margin: float
    unknown: bool
    id: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., entropy: _Optional[float] = ..., margin: _Optional[float] = ..., unknown: _Optional[bool] = ..., id: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("collection", "images", "options")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    options: ClassifyOptions
    def __init__(self, collection: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., options: _Optional[_Union[ClassifyOptions, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ...) -> None: ...

class ClassifyItem(_message.Message):
    __slots__ = ("collection", "image", "id", "options")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    image: bytes
    id: str
    options: ClassifyOptions
    def __init__(self, collection: _Optional[str] = ..., image: _Optional[bytes] = ..., id: _Optional[str] = ..., options: _Optional[_Union[ClassifyOptions, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("collection", "model", "images", "texts", "normalize")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    texts: _containers.RepeatedScalarFieldContainer[str]
    normalize: bool
    def __init__(self, collection: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., texts: _Optional[_Iterable[str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("image_embeddings", "text_embeddings", "dim")
    IMAGE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    image_embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    text_embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    def __init__(self, image_embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., text_embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ...) -> None: ...

class SuggestRequest(_message.Message):
    __slots__ = ("collection", "images", "budget", "strategy", "seed", "scores_only")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCORES_ONLY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    budget: int
    strategy: Strategy
    seed: int
    scores_only: bool
    def __init__(self, collection: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., budget: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., seed: _Optional[int] = ..., scores_only: _Optional[bool] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("index", "score", "prediction", "embedding", "nearest_support", "nearest_support_id", "probabilities")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NEAREST_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    NEAREST_SUPPORT_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    prediction: Prediction
    embedding: Embedding
    nearest_support: Embedding
    nearest_support_id: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., nearest_support: _Optional[_Union[Embedding, _Mapping]] = ..., nearest_support_id: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class SuggestResponse(_message.Message):
    __slots__ = ("suggestions", "labels")
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...
