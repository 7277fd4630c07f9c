//! gRPC messages read by hand out of an HTTP/2 body: the shard's reading of
//! pushes, and the Rust client's reading of pulls.
//!
//! tonic's generated path copies every DATA frame into one growing message
//! buffer before it decodes a message. [`MessageReader`] keeps the frames as h2
//! handed them over and gives each message as the pieces of those frames it
//! lies in ([`MessagePieces`]); a `bytes` field that lies whole in one piece is
//! then decoded as a slice of it, without a copy. Senders that put a chunk's
//! payload in a DATA frame of its own, or a whole message in one frame (the
//! Rust client's pushes, the shard's pulls), get every payload through
//! untouched; a field split across frames is copied once, into a buffer of its
//! exact size.
//!
//! It checks what the generated path checks before a message is buffered: the
//! compression flag (no compression is accepted) and the size limit, read from
//! the 5-byte prefix. Decoding is `wire_codec::decode_message`'s, with its
//! rules against a small message pinning a large buffer.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tonic::{Code, Status};

use crate::frame::PREFIX_BYTES;
use crate::transport::{MAX_CHUNK_PAYLOAD_BYTES, MAX_MESSAGE_BYTES};

/// Reads gRPC messages out of an HTTP/2 body, holding no more than the
/// message being read (HTTP/2 flow control holds back the rest).
pub struct MessageReader<B> {
    body: B,
    /// DATA frames, or what is left of them, not yet read as messages.
    pending: VecDeque<Bytes>,
    buffered: usize,
    ended: bool,
    trailers: Option<http::HeaderMap>,
    /// What the messages are, for errors ("push", "pull").
    what: &'static str,
}

impl<B> MessageReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A reader of `body`, whose messages are `what` ("push", "pull") in errors.
    pub fn new(body: B, what: &'static str) -> Self {
        Self { body, pending: VecDeque::new(), buffered: 0, ended: false, trailers: None, what }
    }

    /// The next whole message without its prefix, `None` at the end of the body.
    pub async fn next_message(&mut self) -> Result<Option<MessagePieces>, Status> {
        loop {
            if let Some(message) = self.take_message()? {
                return Ok(Some(message));
            }
            if self.ended {
                if self.buffered == 0 {
                    return Ok(None);
                }
                return Err(Status::invalid_argument(format!(
                    "the {} stream ended inside a message ({} bytes of it arrived); nothing of it was applied",
                    self.what, self.buffered
                )));
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        self.buffered += data.len();
                        self.pending.push_back(data);
                    }
                    Ok(_) => {}
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(error)) => return Err(Status::from_error(error.into())),
            }
        }
    }

    /// The trailers, once [`next_message`](Self::next_message) has returned `None`
    /// (a response's status is there); `None` if the body ended without any.
    pub fn trailers(&self) -> Option<&http::HeaderMap> {
        self.trailers.as_ref()
    }

    /// A whole message if one is buffered; refuses a prefix that will not be taken before its message arrives.
    fn take_message(&mut self) -> Result<Option<MessagePieces>, Status> {
        if self.buffered < PREFIX_BYTES {
            return Ok(None);
        }
        let prefix = self.peek_prefix();
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(format!(
                    "a {} message is marked compressed; only uncompressed messages are accepted",
                    self.what
                )));
            }
            flag => {
                return Err(Status::internal(format!(
                    "protocol error: a {} message has compression flag {flag} (only 0 and 1 exist)",
                    self.what
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "a {} message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes; \
                     a message carries one chunk of at most {MAX_CHUNK_PAYLOAD_BYTES} bytes of payload",
                    self.what
                ),
            ));
        }
        if self.buffered < PREFIX_BYTES + len {
            return Ok(None);
        }
        self.take(PREFIX_BYTES);
        Ok(Some(self.take(len)))
    }

    fn peek_prefix(&self) -> [u8; PREFIX_BYTES] {
        let mut prefix = [0u8; PREFIX_BYTES];
        let mut filled = 0;
        for frame in &self.pending {
            let n = frame.len().min(PREFIX_BYTES - filled);
            prefix[filled..filled + n].copy_from_slice(&frame[..n]);
            filled += n;
            if filled == PREFIX_BYTES {
                break;
            }
        }
        prefix
    }

    /// The next `len` buffered bytes, as the pieces of the frames they lie in.
    fn take(&mut self, len: usize) -> MessagePieces {
        self.buffered -= len;
        let mut pieces = MessagePieces { pieces: VecDeque::new(), remaining: len };
        let mut wanted = len;
        while wanted > 0 {
            let Some(front) = self.pending.front_mut() else { break };
            if front.len() > wanted {
                pieces.pieces.push_back(front.split_to(wanted));
                break;
            }
            wanted -= front.len();
            pieces.pieces.extend(self.pending.pop_front());
        }
        pieces
    }
}

/// One message as the pieces of the DATA frames it arrived in. As a [`Buf`],
/// [`copy_to_bytes`](Buf::copy_to_bytes) of a range that lies in one piece is a
/// slice of it, which is what keeps a decoded payload where h2 put it.
#[derive(Debug, Default)]
pub struct MessagePieces {
    pieces: VecDeque<Bytes>,
    remaining: usize,
}

impl Buf for MessagePieces {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        // Empty pieces are skipped: a `Buf` with bytes left must show some.
        self.pieces.iter().find(|piece| !piece.is_empty()).map_or(&[], |piece| &piece[..])
    }

    fn advance(&mut self, mut count: usize) {
        assert!(count <= self.remaining, "advance past the end of a message");
        self.remaining -= count;
        while count > 0 {
            let Some(front) = self.pieces.front_mut() else { return };
            if front.len() > count {
                front.advance(count);
                return;
            }
            count -= front.len();
            self.pieces.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy_to_bytes past the end of a message");
        if let Some(front) = self.pieces.front_mut()
            && front.len() >= len
        {
            let taken = front.split_to(len);
            if front.is_empty() {
                self.pieces.pop_front();
            }
            self.remaining -= len;
            return taken;
        }
        let mut joined = BytesMut::with_capacity(len);
        while joined.len() < len {
            let chunk = self.chunk();
            let n = chunk.len().min(len - joined.len());
            joined.extend_from_slice(&chunk[..n]);
            self.advance(n);
        }
        joined.freeze()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::StreamBody;
    use prost::Message;

    use super::*;
    use crate::frame::{self, prefixed};
    use crate::pb::{self, TensorChunk};
    use crate::wire_codec::decode_message;

    type Frames = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn body(frames: Vec<Bytes>) -> Frames {
        StreamBody::new(tokio_stream::iter(frames.into_iter().map(|f| Ok(Frame::data(f))).collect::<Vec<_>>()))
    }

    fn message(step: u64, payload_len: usize) -> pb::GradientChunk {
        pb::GradientChunk {
            model: "m".into(),
            worker_id: "w".into(),
            step,
            chunk: Some(TensorChunk {
                tensor: "t".into(),
                length: payload_len as u64 / 4,
                payload: Bytes::from((0..payload_len).map(|i| i as u8).collect::<Vec<_>>()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn read_all(frames: Vec<Bytes>) -> Result<Vec<pb::GradientChunk>, Status> {
        let mut reader = MessageReader::new(body(frames), "push");
        let mut read = Vec::new();
        while let Some(message) = reader.next_message().await? {
            read.push(decode_message(message)?);
        }
        Ok(read)
    }

    #[tokio::test]
    async fn messages_cut_at_every_byte_read_back_whole() {
        let sent = vec![message(1, 8), message(2, 100), message(3, 0)];
        let wire: Vec<u8> = sent.iter().flat_map(|m| prefixed(m).to_vec()).collect();
        for cut in 0..=wire.len() {
            let frames = vec![Bytes::copy_from_slice(&wire[..cut]), Bytes::copy_from_slice(&wire[cut..])];
            assert_eq!(read_all(frames).await.unwrap(), sent, "cut at {cut}");
        }
        // One byte per frame, and empty frames in between.
        let frames = wire.iter().flat_map(|b| [Bytes::new(), Bytes::copy_from_slice(&[*b])]).collect();
        assert_eq!(read_all(frames).await.unwrap(), sent);
    }

    #[tokio::test]
    async fn a_payload_whole_in_one_frame_is_not_copied() {
        let sent = message(1, 1 << 20);
        let frame = prefixed(&sent);
        let (base, len) = (frame.as_ptr() as usize, frame.len());
        let read = read_all(vec![frame]).await.unwrap();
        let at = read[0].chunk.as_ref().unwrap().payload.as_ptr() as usize;
        assert_eq!(read[0], sent);
        assert!(at > base && at < base + len, "the payload was copied");

        // A pull's chunk as the shard sends it: a head frame, then the payload as a frame of its own.
        let weights = pb::WeightChunk { version: 4, chunk: sent.chunk.clone(), checkpoint: false, overflow_steps: 2 };
        let (head, payload) = frame::weight_chunk_pieces(weights.clone());
        let payload_at = payload.as_ptr();
        let mut reader = MessageReader::new(body(vec![head, payload]), "pull");
        let pieces = reader.next_message().await.unwrap().unwrap();
        assert_eq!(pieces.pieces.len(), 2);
        let read: pb::WeightChunk = decode_message(pieces).unwrap();
        assert_eq!(read, weights);
        assert_eq!(read.chunk.unwrap().payload.as_ptr(), payload_at, "the pulled payload was copied");
    }

    #[tokio::test]
    async fn trailers_are_kept_for_the_caller() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let frames = vec![Ok::<_, Infallible>(Frame::data(prefixed(&message(1, 4)))), Ok(Frame::trailers(trailers))];
        let mut reader = MessageReader::new(StreamBody::new(tokio_stream::iter(frames)), "pull");
        assert!(reader.next_message().await.unwrap().is_some());
        assert!(reader.trailers().is_none(), "not read yet");
        assert!(reader.next_message().await.unwrap().is_none());
        assert_eq!(reader.trailers().unwrap().get("grpc-status").unwrap(), "14");
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_from_their_prefix() {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes());
        let refused = read_all(vec![Bytes::from(prefix)]).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("over the limit"), "{}", refused.message());
    }

    #[tokio::test]
    async fn bad_prefixes_truncation_and_garbage_are_errors() {
        let compressed = Bytes::from_static(&[1, 0, 0, 0, 1, 0]);
        assert_eq!(read_all(vec![compressed]).await.unwrap_err().code(), Code::Unimplemented);
        let unknown_flag = Bytes::from_static(&[7, 0, 0, 0, 0]);
        assert_eq!(read_all(vec![unknown_flag]).await.unwrap_err().code(), Code::Internal);
        let mut cut = prefixed(&message(1, 64)).to_vec();
        cut.truncate(cut.len() - 1);
        let truncated = read_all(vec![Bytes::from(cut)]).await.unwrap_err();
        assert_eq!(truncated.code(), Code::InvalidArgument);
        assert!(truncated.message().contains("ended inside a message"), "{}", truncated.message());
        let garbage = Bytes::from_static(&[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(read_all(vec![garbage]).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(read_all(vec![Bytes::from_static(&[0, 0])]).await.unwrap_err().code(), Code::InvalidArgument);
        assert!(read_all(vec![]).await.unwrap().is_empty());
    }

    #[test]
    fn pieces_read_as_one_buffer() {
        let wire: Vec<u8> = (0..=255).collect();
        for cut in [0, 1, 100, 255, 256] {
            let mut pieces = MessagePieces {
                pieces: [Bytes::copy_from_slice(&wire[..cut]), Bytes::copy_from_slice(&wire[cut..])].into(),
                remaining: wire.len(),
            };
            let mut read = Vec::new();
            read.extend_from_slice(&pieces.copy_to_bytes(10));
            pieces.advance(5);
            read.extend_from_slice(&wire[10..15]);
            while pieces.has_remaining() {
                let n = pieces.chunk().len().min(7);
                read.extend_from_slice(&pieces.copy_to_bytes(n.max(1).min(pieces.remaining())));
            }
            assert_eq!(read, wire, "cut at {cut}");
        }
    }

    #[test]
    fn encoded_messages_decode_from_pieces() {
        let sent = message(9, 4096);
        let wire = sent.encode_to_vec();
        for cut in [1, 17, 2000, wire.len() - 1] {
            let pieces = MessagePieces {
                pieces: [Bytes::copy_from_slice(&wire[..cut]), Bytes::copy_from_slice(&wire[cut..])].into(),
                remaining: wire.len(),
            };
            assert_eq!(decode_message::<pb::GradientChunk>(pieces).unwrap(), sent, "cut at {cut}");
        }
    }
}
