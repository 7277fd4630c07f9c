//! The local channel shared by shards and clients on one host: the framing of
//! the segment socket (protobuf messages with a file descriptor riding as
//! SCM_RIGHTS), the layout of a weights segment, positional I/O on segments,
//! and a gRPC endpoint over a Unix socket.
//!
//! Segments are Linux memfds read and written with `pread`/`pwrite`, never
//! mapped: a peer that truncates or rewrites a segment can make a read come
//! up short or see torn values, both of which are checked, but it cannot make
//! the reader fault (a mapping would take SIGBUS), and no `unsafe` is needed.
//! The copies are the same as through a mapping: one into the segment, one out.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use prost::Message;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tonic::transport::{Channel, Endpoint};

use crate::transport::{CLIENT_MAX_FRAME_BYTES, CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};

/// Name of the gRPC socket in a shard's local directory.
pub const GRPC_SOCKET: &str = "grpc.sock";
/// Name of the segment socket in a shard's local directory.
pub const SEGMENT_SOCKET: &str = "segments.sock";
/// The largest message either side sends on the segment socket.
pub const MAX_SEGMENT_MESSAGE_BYTES: usize = 64 << 10;
/// Slots of a weights segment: a reader is only disturbed when the shard
/// publishes this many newer states while it reads.
pub const WEIGHT_SLOTS: u32 = 3;
/// Bytes before the first slot; slot `s`'s sequence number is the u64 at `8 * s`.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;

/// Byte offset of slot `slot` in a weights segment whose slots hold `slot_bytes` each.
pub fn slot_offset(slot: u32, slot_bytes: u64) -> u64 {
    SEGMENT_HEADER_BYTES + u64::from(slot) * slot_bytes
}

/// Bytes of one slot holding `elements` f32 values, page-aligned.
pub fn slot_bytes(elements: u64) -> u64 {
    (elements * 4).div_ceil(4096) * 4096
}

/// Reads the sequence number of `slot`.
pub fn read_sequence(segment: &File, slot: u32) -> io::Result<u64> {
    let mut word = [0u8; 8];
    segment.read_exact_at(&mut word, 8 * u64::from(slot))?;
    Ok(u64::from_le_bytes(word))
}

/// Writes the sequence number of `slot`.
pub fn write_sequence(segment: &File, slot: u32, sequence: u64) -> io::Result<()> {
    segment.write_all_at(&sequence.to_le_bytes(), 8 * u64::from(slot))
}

/// Reads f32 values (little-endian) at byte `offset` straight into `out`.
/// A segment that ends early gives `UnexpectedEof`, never a fault.
pub fn read_f32s(segment: &File, offset: u64, out: &mut [f32]) -> io::Result<()> {
    segment.read_exact_at(bytemuck::cast_slice_mut(out), offset)
}

/// Writes f32 values (little-endian) at byte `offset`.
pub fn write_f32s(segment: &File, offset: u64, values: &[f32]) -> io::Result<()> {
    segment.write_all_at(bytemuck::cast_slice(values), offset)
}

/// A new memory segment of `bytes`, for gradients a client pushes.
pub fn create_segment(name: &str, bytes: u64) -> io::Result<File> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(bytes)?;
    Ok(file)
}

/// Makes a segment's mode 0444, so that a reader cannot reopen the read-only
/// descriptor it was given (through `/proc/self/fd`) for writing; descriptors
/// opened before, such as the writer's own, keep their access.
pub fn forbid_reopening_for_write(segment: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    segment.set_permissions(std::fs::Permissions::from_mode(0o444))
}

/// The same segment, opened again read-only: what a shard hands to readers, so
/// that writing through the descriptor they get fails.
pub fn read_only(segment: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", segment.as_raw_fd()))
}

/// Sends one framed message, with `fd` attached to its first byte.
pub fn send_frame(socket: &UnixStream, message: &impl Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptor"));
    }
    let sent = rustix::net::sendmsg(socket, &[IoSlice::new(&frame)], &mut control, SendFlags::NOSIGNAL)?;
    // The descriptor went with the first byte; the rest is a plain write.
    (&*socket).write_all(&frame[sent..])
}

/// Receives one framed message and the descriptor that came with it, if any.
/// `Ok(None)` when the peer closed the connection between messages.
pub fn recv_frame<M: Message + Default>(socket: &UnixStream) -> io::Result<Option<(M, Option<OwnedFd>)>> {
    let mut header = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received =
        rustix::net::recvmsg(socket, &mut [IoSliceMut::new(&mut header)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received_fd in fds {
                // More than one descriptor is a protocol error; the extra ones are closed here.
                fd.get_or_insert(received_fd);
            }
        }
    }
    if received.bytes == 0 {
        return Ok(None);
    }
    (&*socket).read_exact(&mut header[received.bytes..])?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_SEGMENT_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("segment socket message of {len} bytes, over the limit of {MAX_SEGMENT_MESSAGE_BYTES}"),
        ));
    }
    let mut body = vec![0u8; len];
    (&*socket).read_exact(&mut body)?;
    let message = M::decode(body.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((message, fd)))
}

/// One request and its reply on a blocking segment socket.
pub fn call(
    socket: &UnixStream,
    request: &crate::pb::SegmentRequest,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<(crate::pb::SegmentReply, Option<OwnedFd>)> {
    send_frame(socket, request, fd)?;
    recv_frame(socket)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the shard closed the segment socket"))
}

/// The sockets of a local directory.
pub fn sockets(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(GRPC_SOCKET), dir.join(SEGMENT_SOCKET))
}

/// A lazy gRPC channel over the Unix socket at `path`, with the transport
/// settings of TCP connections (windows, frame size).
pub fn unix_channel(path: PathBuf) -> Channel {
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://local.invalid")
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(CLIENT_MAX_FRAME_BYTES))
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
}

/// Whether `fd` is a descriptor this side can read and write at positions.
pub fn check_segment(fd: impl AsFd) -> io::Result<u64> {
    let stat = rustix::fs::fstat(fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a segment must be a memfd or a regular file"));
    }
    Ok(stat.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn frames_carry_a_message_and_a_descriptor_across_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let segment = create_segment("test", 64).unwrap();
        write_f32s(&segment, 8, &[1.5, -2.0]).unwrap();
        let request = pb::SegmentRequest {
            authorization: "Bearer x".into(),
            item: Some(pb::segment_request::Item::Attach(pb::AttachSegment {})),
        };
        send_frame(&a, &request, Some(segment.as_fd())).unwrap();
        send_frame(&a, &request, None).unwrap();
        let (got, fd) = recv_frame::<pb::SegmentRequest>(&b).unwrap().unwrap();
        assert_eq!(got, request);
        let received = File::from(fd.expect("the descriptor came along"));
        let mut out = [0f32; 2];
        read_f32s(&received, 8, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        let (_, none) = recv_frame::<pb::SegmentRequest>(&b).unwrap().unwrap();
        assert!(none.is_none());
        drop(a);
        assert!(recv_frame::<pb::SegmentRequest>(&b).unwrap().is_none());
    }

    #[test]
    fn a_segment_that_shrank_reads_short_instead_of_faulting() {
        let segment = create_segment("test", 4096).unwrap();
        segment.set_len(16).unwrap();
        let mut out = [0f32; 8];
        assert_eq!(read_f32s(&segment, 0, &mut out).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_only_descriptors_refuse_writes() {
        use std::os::fd::AsRawFd;
        let segment = create_segment("test", 4096).unwrap();
        forbid_reopening_for_write(&segment).unwrap();
        write_sequence(&segment, 1, 42).unwrap();
        let reader = read_only(&segment).unwrap();
        assert_eq!(read_sequence(&reader, 1).unwrap(), 42);
        assert!(write_sequence(&reader, 1, 7).is_err());
        let reopened = File::options().write(true).open(format!("/proc/self/fd/{}", reader.as_raw_fd()));
        // Root passes permission checks; everyone else is held to the 0444 mode.
        if !rustix::process::geteuid().is_root() {
            assert!(reopened.is_err(), "a reader reopened the weights for writing");
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(reader.metadata().unwrap().permissions().mode() & 0o777, 0o444);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(u32::MAX).to_le_bytes()).unwrap();
        assert_eq!(recv_frame::<pb::SegmentRequest>(&b).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
