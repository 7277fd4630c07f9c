//! `PushGradients` read straight from the HTTP/2 request body.
//!
//! tonic's generated path copies every DATA frame into one growing message
//! buffer before it decodes a message, so each pushed byte is copied once
//! more on the shard than it has to be. [`PushRoute`] takes that one path out
//! of the generated service and reads the gRPC messages itself: a message
//! that arrived whole in one DATA frame is decoded in place (its payload stays
//! a slice of the frame h2 read from the socket); only a message split across
//! frames is copied, once, into a buffer of its exact size. The Rust client
//! sends each message as one DATA frame and the shard allows frames larger
//! than a message (`transport::SHARD_MAX_FRAME_BYTES`), so splits are rare.
//!
//! The token and shard headers are checked before, by the same interceptor as
//! every method. Everything else the generated path checks is checked here
//! too: compression (none is accepted), the
//! message size limit (read from the 5-byte prefix, before a byte of the
//! message is buffered), the protobuf encoding and the decoded-size rule of
//! `wire_codec`. Every other method goes to the generated service unchanged.
//!
//! A payload kept in place holds on to h2's read buffer, as it held on to
//! tonic's message buffer before; `wire_codec`'s rules (small or padded
//! messages are copied out) bound what a held chunk can pin either way.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, StreamBody};
use ps_proto::pb;
use ps_proto::push_frame::{self, PREFIX_BYTES};
use ps_proto::transport::MAX_MESSAGE_BYTES;
use ps_proto::wire_codec;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::service::{ParameterService, PushMessages, message_too_large};

/// The shard's service with `PushGradients` read by hand (see the module docs).
#[derive(Clone)]
pub(super) struct PushRoute<S> {
    generated: S,
    shard: ParameterService,
}

impl<S> PushRoute<S> {
    /// `generated` serves every method but `PushGradients`, which `shard` serves.
    pub(super) fn new(generated: S, shard: ParameterService) -> Self {
        Self { generated, shard }
    }
}

impl<S: NamedService> NamedService for PushRoute<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for PushRoute<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != ps_proto::PUSH_GRADIENTS_PATH {
            return Box::pin(self.generated.call(request));
        }
        let (parts, body) = request.into_parts();
        let shard = self.shard.clone();
        Box::pin(async move {
            let result = match compression(&parts.headers) {
                Ok(()) => shard.push(MessageReader::new(body)).await,
                Err(status) => Err(status),
            };
            Ok(match super::service::observe("PushGradients", result) {
                Ok(reply) => reply_response(&reply),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Refuses compressed pushes as the generated service does: this shard accepts none.
fn compression(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|value| value.to_str().unwrap_or("?")) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(Status::unimplemented(format!(
            "the push is compressed with `{other}`, which this shard does not accept; send it uncompressed"
        ))),
    }
}

/// The reply to a push that was taken: one message, then an OK status in the trailers.
fn reply_response(reply: &pb::PushGradientsResponse) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [Frame::data(push_frame::prefixed(reply)), Frame::trailers(trailers)];
    let body = StreamBody::new(tokio_stream::iter(frames.map(Ok::<_, Infallible>)));
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// Reads gRPC messages out of an HTTP/2 body, holding no more than the
/// message being read (HTTP/2 flow control holds back the rest).
pub(super) struct MessageReader<B> {
    body: B,
    /// DATA frames, or what is left of them, not yet read as messages.
    pending: VecDeque<Bytes>,
    buffered: usize,
    ended: bool,
}

impl<B> MessageReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(body: B) -> Self {
        Self { body, pending: VecDeque::new(), buffered: 0, ended: false }
    }

    /// The next whole message without its prefix, `None` at the end of the body.
    async fn next_message_bytes(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(message) = self.take_message()? {
                return Ok(Some(message));
            }
            if self.ended {
                if self.buffered == 0 {
                    return Ok(None);
                }
                return Err(Status::invalid_argument(format!(
                    "the push stream ended inside a message ({} bytes of it arrived); nothing of it was applied",
                    self.buffered
                )));
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Ok(frame)) => {
                    // Trailers carry nothing a push needs.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.buffered += data.len();
                        self.pending.push_back(data);
                    }
                }
                Some(Err(error)) => return Err(Status::from_error(error.into())),
            }
        }
    }

    /// A whole message if one is buffered; refuses a prefix the shard will not take before its message arrives.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buffered < PREFIX_BYTES {
            return Ok(None);
        }
        let prefix = self.peek_prefix();
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(
                    "a push message is marked compressed; this shard accepts only uncompressed messages",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "protocol error: a push message has compression flag {flag} (only 0 and 1 exist)"
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(message_too_large(&format!(
                "a push message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes"
            )));
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

    /// The next `len` buffered bytes: a slice of the front frame when it holds
    /// them all, else one copy into a buffer of exactly `len` bytes.
    fn take(&mut self, len: usize) -> Bytes {
        self.buffered -= len;
        let Some(front) = self.pending.front_mut() else { return Bytes::new() };
        if front.len() >= len {
            let taken = front.split_to(len);
            if front.is_empty() {
                self.pending.pop_front();
            }
            return taken;
        }
        let mut joined = BytesMut::with_capacity(len);
        while joined.len() < len {
            let Some(front) = self.pending.front_mut() else { break };
            let n = front.len().min(len - joined.len());
            joined.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
        joined.freeze()
    }
}

impl<B> PushMessages for MessageReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn next_chunk(&mut self) -> Result<Option<pb::GradientChunk>, Status> {
        match self.next_message_bytes().await? {
            Some(message) => Ok(Some(wire_codec::decode_message(message)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;
    use ps_proto::pb::TensorChunk;

    use super::*;

    type Frames = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn body(frames: Vec<Bytes>) -> Frames {
        StreamBody::new(tokio_stream::iter(frames.into_iter().map(|f| Ok(Frame::data(f))).collect::<Vec<_>>()))
    }

    fn framed(message: &pb::GradientChunk) -> Vec<u8> {
        push_frame::prefixed(message).to_vec()
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
        let mut reader = MessageReader::new(body(frames));
        let mut read = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            read.push(chunk);
        }
        Ok(read)
    }

    #[tokio::test]
    async fn messages_cut_at_every_byte_read_back_whole() {
        let sent = vec![message(1, 8), message(2, 100), message(3, 0)];
        let wire: Vec<u8> = sent.iter().flat_map(framed).collect();
        for cut in 0..=wire.len() {
            let frames = vec![Bytes::copy_from_slice(&wire[..cut]), Bytes::copy_from_slice(&wire[cut..])];
            assert_eq!(read_all(frames).await.unwrap(), sent, "cut at {cut}");
        }
        // One byte per frame, and empty frames in between.
        let frames = wire.iter().flat_map(|b| [Bytes::new(), Bytes::copy_from_slice(&[*b])]).collect();
        assert_eq!(read_all(frames).await.unwrap(), sent);
    }

    #[tokio::test]
    async fn a_message_whole_in_one_frame_keeps_its_payload_in_place() {
        let sent = message(1, 1 << 20);
        let frame = Bytes::from(framed(&sent));
        let (base, len) = (frame.as_ptr() as usize, frame.len());
        let read = read_all(vec![frame]).await.unwrap();
        let payload = &read[0].chunk.as_ref().unwrap().payload;
        assert_eq!(read[0], sent);
        let at = payload.as_ptr() as usize;
        assert!(at > base && at < base + len, "the payload was copied");
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_from_their_prefix() {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes());
        let refused = read_all(vec![Bytes::from(prefix)]).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("over the limit"), "{}", refused.message());
    }

    #[tokio::test]
    async fn bad_prefixes_truncation_and_garbage_are_errors() {
        let compressed = Bytes::from_static(&[1, 0, 0, 0, 1, 0]);
        assert_eq!(read_all(vec![compressed]).await.unwrap_err().code(), tonic::Code::Unimplemented);
        let unknown_flag = Bytes::from_static(&[7, 0, 0, 0, 0]);
        assert_eq!(read_all(vec![unknown_flag]).await.unwrap_err().code(), tonic::Code::Internal);
        let mut cut = framed(&message(1, 64));
        cut.truncate(cut.len() - 1);
        let truncated = read_all(vec![Bytes::from(cut)]).await.unwrap_err();
        assert_eq!(truncated.code(), tonic::Code::InvalidArgument);
        assert!(truncated.message().contains("ended inside a message"), "{}", truncated.message());
        let garbage = Bytes::from_static(&[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(read_all(vec![garbage]).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(read_all(vec![Bytes::from_static(&[0, 0])]).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(read_all(vec![]).await.unwrap().is_empty());
    }
}
