"""The torch-free data plane: zmq transport on trio, placement, membership, replication."""

from supervise.cluster.errors import (
    ChecksumMismatch,
    ClusterError,
    CurveKeyError,
    Declined,
    PeerUnknown,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    TransferAborted,
)
from supervise.cluster.keys import CurveKeys, generate_keys
from supervise.cluster.messages import KindRegistry, kind_of, message_kind
from supervise.cluster.stats import TransportStats
from supervise.cluster.transport import (
    DEFERRED,
    Incoming,
    Reply,
    Transport,
    TransportLimits,
)

__all__ = [
    "DEFERRED",
    "ChecksumMismatch",
    "ClusterError",
    "CurveKeyError",
    "CurveKeys",
    "Declined",
    "Incoming",
    "KindRegistry",
    "PeerUnknown",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "RequestTimeout",
    "TransferAborted",
    "Transport",
    "TransportLimits",
    "TransportStats",
    "generate_keys",
    "kind_of",
    "message_kind",
]
