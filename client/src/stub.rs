//! The stub every call to a shard goes through: the generated gRPC client,
//! and beneath it the channel with the shard's headers, for the two calls this
//! crate frames by hand: pushes are sent as `ps_proto::frame` writes them, and
//! pulls are read with `ps_proto::message_reader`, so a chunk's payload is
//! decoded where h2 put it instead of being copied into tonic's buffer first.

use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::StreamBody;
use ps_proto::cluster::ShardHeaders;
use ps_proto::message_reader::MessageReader;
use ps_proto::pb;
use ps_proto::transport::MAX_MESSAGE_BYTES;
use ps_proto::wire_codec;
use tonic::client::GrpcService;
use tonic::service::interceptor::{InterceptedService, ResponseBody};
use tonic::transport::Channel;
use tonic::{Code, Status};

type HeadedChannel = InterceptedService<Channel, ShardHeaders>;
type Generated = pb::parameter_server_client::ParameterServerClient<HeadedChannel>;

/// A shard's generated stub (through `Deref`) and the channel beneath it.
#[derive(Clone)]
pub(crate) struct ShardStub {
    generated: Generated,
    channel: HeadedChannel,
}

impl ShardStub {
    /// A stub on `channel` that sends `headers` with every call.
    pub(crate) fn new(channel: Channel, headers: ShardHeaders) -> Self {
        let channel = InterceptedService::new(channel, headers);
        let generated = Generated::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self { generated, channel }
    }

    /// `PushGradients` with messages already framed (gRPC prefix included) by
    /// `ps_proto::frame`, sent as they are: what the generated method
    /// does, without copying each message into tonic's send buffer.
    pub(crate) async fn frames(
        &mut self,
        frames: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<pb::PushGradientsResponse, Status> {
        let body = StreamBody::new(frames.map(|frame| Ok::<_, std::convert::Infallible>(Frame::data(frame))));
        let mut replies = self.call(ps_proto::PUSH_GRADIENTS_PATH, tonic::body::Body::new(body), "push").await?;
        let reply =
            replies.message().await?.ok_or_else(|| Status::internal("the shard ended the push without a reply"))?;
        // A status in the trailers that is not OK is an error even after a reply.
        if replies.message::<pb::PushGradientsResponse>().await?.is_some() {
            return Err(Status::internal("the shard sent more than one reply to a push"));
        }
        Ok(reply)
    }

    /// `PullWeights`, its chunks read as they arrive (see the module docs).
    pub(crate) async fn pull_weights_by_hand(&mut self, request: &pb::PullWeightsRequest) -> Result<Replies, Status> {
        let body = http_body_util::Full::new(ps_proto::frame::prefixed(request));
        self.call(ps_proto::PULL_WEIGHTS_PATH, tonic::body::Body::new(body), "pull").await
    }

    /// Sends one call to `path` with `body` (gRPC messages, prefixes included)
    /// and returns its replies, or the status of a call refused before any reply.
    async fn call(
        &mut self,
        path: &'static str,
        body: tonic::body::Body,
        what: &'static str,
    ) -> Result<Replies, Status> {
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .version(http::Version::HTTP_2)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(body)
            .map_err(|e| Status::internal(format!("building the {what} request: {e}")))?;
        std::future::poll_fn(|cx| GrpcService::poll_ready(&mut self.channel, cx))
            .await
            .map_err(|e| Status::from_error(e.into()))?;
        let response = GrpcService::call(&mut self.channel, request).await.map_err(|e| Status::from_error(e.into()))?;
        let (parts, body) = response.into_parts();
        // A refusal before any reply comes as headers only.
        if let Some(status) = Status::from_header_map(&parts.headers)
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        if parts.status != http::StatusCode::OK {
            return Err(Status::unknown(format!("the shard answered the {what} with HTTP status {}", parts.status)));
        }
        Ok(Replies { reader: MessageReader::new(body, what), what })
    }
}

/// The messages of one reply stream, then the status in its trailers.
pub(crate) struct Replies {
    reader: MessageReader<ResponseBody<tonic::body::Body>>,
    what: &'static str,
}

impl Replies {
    /// The next message; `None` once the stream ended with an OK status, the
    /// status as an error if it ended with another one.
    pub(crate) async fn message<U: prost::Message + Default>(&mut self) -> Result<Option<U>, Status> {
        if let Some(message) = self.reader.next_message().await? {
            return wire_codec::decode_message(message).map(Some);
        }
        match self.reader.trailers().and_then(Status::from_header_map) {
            Some(status) if status.code() == Code::Ok => Ok(None),
            Some(status) => Err(status),
            None => Err(Status::unknown(format!("the {} stream ended without a gRPC status", self.what))),
        }
    }
}

impl Deref for ShardStub {
    type Target = Generated;

    fn deref(&self) -> &Generated {
        &self.generated
    }
}

impl DerefMut for ShardStub {
    fn deref_mut(&mut self) -> &mut Generated {
        &mut self.generated
    }
}
