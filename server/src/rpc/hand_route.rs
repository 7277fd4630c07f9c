//! The two bulk methods, served by hand beside the generated service.
//!
//! `PushGradients` is read straight from the HTTP/2 request body. tonic's
//! generated path copies every DATA frame into one growing message buffer
//! before it decodes a message, so each pushed byte is copied once more on the
//! shard than it has to be. Here a message is read as the pieces of the DATA
//! frames it arrived in (`ps_proto::message_reader`), and a payload that lies
//! in one piece stays a slice of the frame h2 read from the socket; only a
//! payload split across frames is copied, once, into a buffer of its exact
//! size. The Rust client sends each message as one DATA frame, or a chunk's
//! head and its payload as two (`push_owned`), and the shard allows frames
//! larger than a payload (`transport::SHARD_MAX_FRAME_BYTES`), so splits are rare.
//!
//! `PullWeights` responses are framed by hand. tonic's generated path encodes
//! every message into its send buffer, copying each payload (a view of the
//! block's snapshot) once more; here each chunk goes out as a small head (the
//! gRPC prefix and every field but the payload) and the payload view itself
//! (`ps_proto::frame::weight_chunk_pieces`), which HTTP/2 writes to the socket
//! from where it lies. The stream's end or error goes in the trailers, as the
//! generated path sends it.
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

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::StreamBody;
use ps_proto::frame;
use ps_proto::message_reader::MessageReader;
use ps_proto::pb;
use ps_proto::wire_codec;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::service::{ParameterService, observe};
use super::streams::{PushMessages, WeightStream};

/// The shard's service with `PushGradients` and `PullWeights` served by hand (see the module docs).
#[derive(Clone)]
pub(super) struct HandRoute<S> {
    generated: S,
    shard: ParameterService,
}

impl<S> HandRoute<S> {
    /// `generated` serves every method but the two bulk ones, which `shard` serves.
    pub(super) fn new(generated: S, shard: ParameterService) -> Self {
        Self { generated, shard }
    }
}

impl<S: NamedService> NamedService for HandRoute<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for HandRoute<S>
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
        let path = request.uri().path();
        if path != ps_proto::PUSH_GRADIENTS_PATH && path != ps_proto::PULL_WEIGHTS_PATH {
            return Box::pin(self.generated.call(request));
        }
        let push = path == ps_proto::PUSH_GRADIENTS_PATH;
        let (parts, body) = request.into_parts();
        let shard = self.shard.clone();
        Box::pin(async move {
            Ok(if push {
                match observe("PushGradients", serve_push(&shard, &parts.headers, body).await) {
                    Ok(reply) => reply_response(&reply),
                    Err(status) => status.into_http(),
                }
            } else {
                match observe("PullWeights", open_pull(&shard, &parts.headers, body).await) {
                    Ok(chunks) => grpc_response(Body::new(WeightFrames { chunks, payload: None, ended: false })),
                    Err(status) => status.into_http(),
                }
            })
        })
    }
}

/// Takes one push read from `body`.
async fn serve_push(
    shard: &ParameterService,
    headers: &http::HeaderMap,
    body: Body,
) -> Result<pb::PushGradientsResponse, Status> {
    compression(headers, "push")?;
    shard.push(MessageReader::new(body, "push")).await
}

/// Reads a pull's request from `body` and opens the pull.
async fn open_pull(shard: &ParameterService, headers: &http::HeaderMap, body: Body) -> Result<WeightStream, Status> {
    compression(headers, "pull request")?;
    let mut reader = MessageReader::new(body, "pull request");
    let next = async { reader.next_message().await?.map(wire_codec::decode_message).transpose() };
    let request = shard.pull_request(next).await?;
    shard.pull(request)
}

/// Refuses compressed messages as the generated service does: this shard accepts none.
fn compression(headers: &http::HeaderMap, what: &str) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|value| value.to_str().unwrap_or("?")) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(Status::unimplemented(format!(
            "the {what} is compressed with `{other}`, which this shard does not accept; send it uncompressed"
        ))),
    }
}

/// A gRPC response with `body`, which ends with the status in its trailers.
fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// The trailers that end a response with `status`.
fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that is not a valid header value gets here; the code still goes out.
        trailers.clear();
        trailers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    trailers
}

/// The reply to a push that was taken: one message, then an OK status in the trailers.
fn reply_response(reply: &pb::PushGradientsResponse) -> http::Response<Body> {
    let frames = [Frame::data(frame::prefixed(reply)), Frame::trailers(status_trailers(&Status::ok("")))];
    grpc_response(Body::new(StreamBody::new(tokio_stream::iter(frames.map(Ok::<_, Infallible>)))))
}

/// A pull's chunks as HTTP/2 body frames: each chunk's head, then its payload
/// as it lies in the snapshot; the trailers carry how the stream ended.
struct WeightFrames {
    chunks: WeightStream,
    /// The payload of the chunk whose head went out last.
    payload: Option<Bytes>,
    ended: bool,
}

impl HttpBody for WeightFrames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(payload) = self.payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(payload))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let end = match ready!(self.chunks.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => {
                let (head, payload) = frame::weight_chunk_pieces(chunk);
                self.payload = (!payload.is_empty()).then_some(payload);
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.payload.is_none()
    }
}

impl<B> PushMessages for MessageReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn next_chunk(&mut self) -> Result<Option<pb::GradientChunk>, Status> {
        match self.next_message().await? {
            Some(message) => Ok(Some(wire_codec::decode_message(message)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use ps_proto::message_reader::MessageReader;
    use ps_proto::pb::TensorChunk;

    use super::*;

    fn weights(version: u64, payload_len: usize) -> pb::WeightChunk {
        let chunk = TensorChunk {
            tensor: "t".into(),
            length: payload_len as u64 / 4,
            payload: Bytes::from((0..payload_len).map(|i| i as u8).collect::<Vec<_>>()),
            ..Default::default()
        };
        pb::WeightChunk {
            version,
            chunk: Some(chunk),
            checkpoint: version.is_multiple_of(2),
            overflow_steps: version / 3,
        }
    }

    /// Every frame of a pull response whose stream yields `items`.
    async fn weight_frames(items: Vec<Result<pb::WeightChunk, Status>>) -> Vec<Frame<Bytes>> {
        let mut body = WeightFrames { chunks: Box::pin(tokio_stream::iter(items)), payload: None, ended: false };
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap());
        }
        assert!(body.is_end_stream());
        frames
    }

    #[tokio::test]
    async fn pull_frames_are_the_messages_with_payloads_in_place_then_the_status() {
        let sent = vec![weights(1, 1 << 20), weights(2, 0), weights(3, 12)];
        let payloads: Vec<usize> = sent.iter().map(|w| w.chunk.as_ref().unwrap().payload.as_ptr() as usize).collect();
        let frames = weight_frames(sent.iter().cloned().map(Ok).collect()).await;
        // Two frames per chunk with a payload, one for the empty one, then the trailers.
        assert_eq!(frames.len(), 2 + 1 + 2 + 1);
        let data: Vec<Bytes> = frames[..5].iter().map(|f| f.data_ref().unwrap().clone()).collect();
        assert_eq!(data[1].as_ptr() as usize, payloads[0], "the first payload went out where it lay");
        assert_eq!(data[4].as_ptr() as usize, payloads[2]);
        let wire: Vec<u8> = data.iter().flat_map(|d| d.to_vec()).collect();
        let joined = [Ok::<_, Infallible>(Frame::data(Bytes::from(wire)))];
        let mut reader = MessageReader::new(StreamBody::new(tokio_stream::iter(joined)), "pull");
        for expected in &sent {
            let message = reader.next_message().await.unwrap().unwrap();
            assert_eq!(&wire_codec::decode_message::<pb::WeightChunk>(message).unwrap(), expected);
        }
        assert!(reader.next_message().await.unwrap().is_none());
        let trailers = frames[5].trailers_ref().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    }

    #[tokio::test]
    async fn a_pull_that_fails_midway_ends_with_its_status_and_metadata() {
        let mut failed = Status::unavailable("the shard is shutting down");
        failed.metadata_mut().insert("ps-error", "retired".parse().unwrap());
        let frames = weight_frames(vec![Ok(weights(1, 8)), Err(failed), Ok(weights(2, 8))]).await;
        assert_eq!(frames.len(), 3, "nothing after the error: {frames:?}");
        let trailers = frames[2].trailers_ref().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), &(tonic::Code::Unavailable as i32).to_string());
        assert!(trailers.get("grpc-message").unwrap().to_str().unwrap().contains("shutting"));
        assert_eq!(trailers.get("ps-error").unwrap(), "retired");
    }
}
