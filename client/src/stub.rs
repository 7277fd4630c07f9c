//! The stub every call to a shard goes through: the generated gRPC client,
//! and beneath it the channel with the shard's headers, for the one call this
//! crate frames by hand (pushes; see `ps_proto::push_frame`).

use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::StreamBody;
use ps_proto::cluster::ShardHeaders;
use ps_proto::pb;
use ps_proto::transport::MAX_MESSAGE_BYTES;
use ps_proto::wire_codec::HeldCodec;
use tonic::client::GrpcService;
use tonic::codec::{Codec, Streaming};
use tonic::service::interceptor::InterceptedService;
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
    /// `ps_proto::push_frame`, sent as they are: what the generated method
    /// does, without copying each message into tonic's send buffer.
    pub(crate) async fn push_frames(
        &mut self,
        frames: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<pb::PushGradientsResponse, Status> {
        let body = StreamBody::new(frames.map(|frame| Ok::<_, std::convert::Infallible>(Frame::data(frame))));
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(ps_proto::PUSH_GRADIENTS_PATH)
            .version(http::Version::HTTP_2)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(tonic::body::Body::new(body))
            .map_err(|e| Status::internal(format!("building the push request: {e}")))?;
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
        let decoder = HeldCodec::<pb::GradientChunk, pb::PushGradientsResponse>::default().decoder();
        let mut replies = Streaming::new_response(decoder, body, parts.status, None, Some(MAX_MESSAGE_BYTES));
        let reply =
            replies.message().await?.ok_or_else(|| Status::internal("the shard ended the push without a reply"))?;
        // A status in the trailers that is not OK is an error even after a reply.
        replies.trailers().await?;
        Ok(reply)
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
