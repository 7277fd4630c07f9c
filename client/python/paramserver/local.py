"""The local channel, for a client on the host of a shard started with
`--local-dir` (README, "Writing a client in another language", step 8):
gRPC over the shard's Unix socket, and gradients and weights through memory
segments (Linux memfds traded as file descriptors over a second socket).

Segments are read and written with `os.pread`/`os.pwrite`, never mapped: a
shard that resizes a segment cannot crash this process, and the copies are
those of a mapping (one into the segment, one out).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Optional, Tuple

import grpc

from .v1 import paramserver_pb2 as pb
from .v1 import paramserver_pb2_grpc as pb_grpc

#: How shards on this host are reached: shared memory and the Unix socket, the socket only, or the network only.
MODES = ("segments", "socket", "off")
_MAX_MESSAGE = 64 << 10
#: The bulk methods, called with bytes the client encodes itself (see `wire`).
PUSH_METHOD = "/paramserver.v1.ParameterServer/PushGradients"
PULL_METHOD = "/paramserver.v1.ParameterServer/PullWeights"


class NotLocal(Exception):
    """The shard cannot be used through its local channel; the network will do."""


def _send(sock: socket.socket, message, fd: Optional[int] = None) -> None:
    body = message.SerializeToString()
    frame = struct.pack("<I", len(body)) + body
    # The descriptor rides with the frame's first byte; the rest is a plain send.
    sent = socket.send_fds(sock, [frame[:1]], [fd]) if fd is not None else sock.send(frame[:1])
    sock.sendall(frame[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise NotLocal("the shard closed the segment socket")
        data += part
    return bytes(data)


def _recv(sock: socket.socket) -> Tuple[pb.SegmentReply, Optional[int]]:
    first, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if not first:
        raise NotLocal("the shard closed the segment socket")
    header = first + _recv_exact(sock, 3)
    (length,) = struct.unpack("<I", header)
    if length > _MAX_MESSAGE:
        raise NotLocal(f"a segment-socket reply of {length} bytes")
    reply = pb.SegmentReply.FromString(_recv_exact(sock, length))
    return reply, (fds[0] if fds else None)


class LocalShard:
    """One shard reached on this host: its Unix-socket stub and its segment socket."""

    def __init__(self, advertised: pb.LocalChannel, token: Optional[str], options, segments: bool):
        self.segments = segments
        self._authorization = f"Bearer {token}" if token else ""
        self._lock = threading.Lock()
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.settimeout(30.0)  # a shard that stops answering must not hang a push for ever
            self._socket.connect(advertised.segment_socket)
        except OSError as error:
            raise NotLocal(f"{advertised.segment_socket}: {error}") from None
        hello = self.request(pb.SegmentRequest(hello=pb.SegmentHello()))[0]
        if hello.WhichOneof("item") != "hello" or hello.hello.instance != advertised.instance:
            raise NotLocal(f"another process answers at {advertised.segment_socket}")
        # grpc-core names the socket path as the :authority, which the shard's HTTP/2 library refuses.
        options = list(options) + [("grpc.default_authority", "localhost")]
        self.channel = grpc.insecure_channel(f"unix:{advertised.grpc_socket}", options=options)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.instance = advertised.instance
        # The bulk calls with hand-encoded messages, as the client makes them for TCP.
        self.raw_push = self.channel.stream_unary(PUSH_METHOD, request_serializer=None, response_deserializer=pb.PushGradientsResponse.FromString)
        self.raw_pull = self.channel.unary_stream(PULL_METHOD, request_serializer=pb.PullWeightsRequest.SerializeToString, response_deserializer=None)

    def request(self, request: pb.SegmentRequest, fd: Optional[int] = None) -> Tuple[pb.SegmentReply, Optional[int]]:
        """One request and its reply on the segment socket."""
        request.authorization = self._authorization
        with self._lock:
            try:
                _send(self._socket, request, fd)
                reply, received = _recv(self._socket)
            except OSError as error:
                raise NotLocal(f"segment socket: {error}") from None
        if reply.WhichOneof("item") == "error":
            if received is not None:
                os.close(received)
            raise NotLocal(reply.error.message)
        return reply, received

    def attach(self, size: int) -> Tuple[int, str]:
        """A new memfd of `size` bytes attached on the shard: (descriptor, segment id)."""
        fd = os.memfd_create("ps-push", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            reply, _ = self.request(pb.SegmentRequest(attach=pb.AttachSegment()), fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, reply.attached.segment

    def open_weights(self, model: str) -> Tuple[int, str]:
        """The read-only weights segment of `model`: (descriptor, segment id)."""
        reply, fd = self.request(pb.SegmentRequest(open_weights=pb.OpenWeights(model=model)))
        if fd is None:
            raise NotLocal("open_weights came back without a segment")
        return fd, reply.weights.segment

    def close(self) -> None:
        """Closes both sockets (the shard forgets this client's segments)."""
        self._socket.close()
        self.channel.close()


def read_sequence(fd: int, slot: int) -> int:
    """The sequence number of a weights-segment slot."""
    return struct.unpack("<Q", os.pread(fd, 8, 8 * slot))[0]
