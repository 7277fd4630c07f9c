//! The local channel, client side: finding out whether a shard runs on this
//! host (the `.proto` header "Local channel" gives the rules), then calling it
//! over its Unix socket and moving gradients and weights through memory
//! segments instead of TCP. Anything that fails here sends the client back to
//! TCP, which always works.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use ps_proto::cluster::ShardHeaders;
use ps_proto::local as wire;
use ps_proto::pb::{self, segment_reply, segment_request};
use tonic::transport::Channel;

/// How a client uses the local channel of shards on its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalMode {
    /// TCP (or TLS) only.
    Off,
    /// gRPC over the shard's Unix socket; bulk bytes still go through HTTP/2.
    Socket,
    /// The Unix socket, and gradients and weights through memory segments (the default).
    #[default]
    Segments,
}

impl FromStr for LocalMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "socket" => Ok(Self::Socket),
            "segments" => Ok(Self::Segments),
            other => Err(format!("'{other}' is not a local mode (off, socket, segments)")),
        }
    }
}

impl std::fmt::Display for LocalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Socket => "socket",
            Self::Segments => "segments",
        })
    }
}

/// The longest wait for a reply on the segment socket.
const SEGMENT_SOCKET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

type Stub = crate::stub::ShardStub;

/// A shard this client reaches on its own host.
pub(crate) struct LocalShard {
    /// Calls over the Unix socket with the worker token.
    pub grpc: Stub,
    /// The same with the admin token.
    pub admin: Stub,
    /// Whether bulk bytes go through segments.
    pub segments: bool,
    socket: std::sync::Mutex<UnixStream>,
    authorization: String,
}

/// Why a shard is not used through its local channel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotLocal {
    #[error("the shard serves no local channel")]
    NotServed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
    #[error("another process answers at {0} (not this shard)")]
    OtherInstance(String),
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
}

fn stub(channel: Channel, headers: ShardHeaders) -> Stub {
    Stub::new(channel, headers)
}

impl LocalShard {
    /// Connects to the local channel `advertised` by a shard (from its status
    /// over TCP) and checks both sockets lead to that same shard process.
    pub async fn connect(
        advertised: Option<pb::LocalChannel>,
        headers: ShardHeaders,
        admin_headers: ShardHeaders,
        token: Option<&str>,
        mode: LocalMode,
    ) -> Result<Self, NotLocal> {
        let advertised = advertised.ok_or(NotLocal::NotServed)?;
        let authorization = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
        let path = PathBuf::from(&advertised.segment_socket);
        let hello_auth = authorization.clone();
        let (socket, instance) = tokio::task::spawn_blocking(move || {
            let socket = UnixStream::connect(&path)?;
            // A shard that stops answering must not hang a push or pull for ever.
            socket.set_read_timeout(Some(SEGMENT_SOCKET_TIMEOUT))?;
            socket.set_write_timeout(Some(SEGMENT_SOCKET_TIMEOUT))?;
            let request = pb::SegmentRequest {
                authorization: hello_auth,
                item: Some(segment_request::Item::Hello(pb::SegmentHello::default())),
            };
            let (reply, _) = wire::call(&socket, &request, None)?;
            Ok::<_, NotLocal>((socket, reply))
        })
        .await
        .map_err(|e| NotLocal::Io(std::io::Error::other(e)))??;
        match instance.item {
            Some(segment_reply::Item::Hello(hello)) if hello.instance == advertised.instance => {}
            Some(segment_reply::Item::Error(error)) => return Err(NotLocal::Refused(error.message)),
            _ => return Err(NotLocal::OtherInstance(advertised.segment_socket)),
        }
        let channel = wire::unix_channel(PathBuf::from(&advertised.grpc_socket));
        let mut grpc = stub(channel.clone(), headers);
        let status = grpc.get_status(pb::GetStatusRequest::default()).await?.into_inner();
        if status.local.map(|l| l.instance) != Some(advertised.instance) {
            return Err(NotLocal::OtherInstance(advertised.grpc_socket));
        }
        Ok(Self {
            grpc,
            admin: stub(channel, admin_headers),
            segments: mode == LocalMode::Segments,
            socket: std::sync::Mutex::new(socket),
            authorization,
        })
    }

    fn call(
        &self,
        item: segment_request::Item,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(segment_reply::Item, Option<File>), NotLocal> {
        let socket = self.socket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let request = pb::SegmentRequest { authorization: self.authorization.clone(), item: Some(item) };
        let (reply, fd) = wire::call(&socket, &request, fd)?;
        match reply.item {
            Some(segment_reply::Item::Error(error)) => Err(NotLocal::Refused(error.message)),
            Some(item) => Ok((item, fd.map(File::from))),
            None => Err(NotLocal::Refused("an empty reply on the segment socket".into())),
        }
    }

    /// A new push segment of `bytes`, attached on this shard.
    pub fn attach(&self, bytes: u64) -> Result<PushSegment, NotLocal> {
        let file = wire::create_segment("ps-push", bytes)?;
        match self.call(segment_request::Item::Attach(pb::AttachSegment {}), Some(file.as_fd()))? {
            (segment_reply::Item::Attached(attached), _) => Ok(PushSegment { file, id: attached.segment, bytes }),
            _ => Err(NotLocal::Refused("attach got another reply".into())),
        }
    }

    /// The (read-only) weights segment of `model`.
    pub fn open_weights(&self, model: &str) -> Result<WeightsFile, NotLocal> {
        match self.call(segment_request::Item::OpenWeights(pb::OpenWeights { model: model.to_string() }), None)? {
            (segment_reply::Item::Weights(weights), Some(file)) => Ok(WeightsFile { id: weights.segment, file }),
            _ => Err(NotLocal::Refused("open_weights came back without a segment".into())),
        }
    }
}

/// A segment this client writes its gradients into for one shard.
pub(crate) struct PushSegment {
    pub file: File,
    pub id: String,
    pub bytes: u64,
}

/// A model's weights segment, as a shard published it.
pub(crate) struct WeightsFile {
    pub id: String,
    pub file: File,
}

/// Where a shard stands for this client: not asked yet, local, or over TCP.
#[derive(Clone, Default)]
pub(crate) enum Reach {
    #[default]
    Unknown,
    Local(Arc<LocalShard>),
    Remote,
}
