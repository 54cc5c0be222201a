from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("data", "name", "uri")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    name: str
    uri: str
    def __init__(self, data: _Optional[bytes] = ..., name: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("frame", "values", "segment")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    frame: int
    values: _containers.RepeatedScalarFieldContainer[float]
    segment: _struct_pb2.Struct
    def __init__(self, frame: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., segment: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("encoder", "weights_hash", "preprocessing_hash", "dim", "untrained", "modality", "embeddings", "batch_size", "replica", "ood")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_HASH_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    weights_hash: str
    preprocessing_hash: str
    dim: int
    untrained: bool
    modality: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    batch_size: int
    replica: str
    ood: _struct_pb2.Struct
    def __init__(self, encoder: _Optional[str] = ..., weights_hash: _Optional[str] = ..., preprocessing_hash: _Optional[str] = ..., dim: _Optional[int] = ..., untrained: _Optional[bool] = ..., modality: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., batch_size: _Optional[int] = ..., replica: _Optional[str] = ..., ood: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
