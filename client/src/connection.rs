//! The client of a cluster: its connections ([`Shards`]) and the
//! cluster-wide calls: register a model, open one, checkpoint, status, shutdown.

use std::collections::HashMap;
use std::ops::Deref;
use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::pb::{self, Encoding};
use ps_proto::{chunk, layout};

use crate::Tensors;
use crate::config::ClientConfig;
use crate::error::{ClientError, ProtocolError};
use crate::layout::Layout;
use crate::model::{ModelHandle, check_len};
use crate::shards::Shards;
use crate::spec::{Init, ModelSpec};
use crate::status::ShardStatus;

/// A client of every shard of a cluster: its connections, and the calls
/// that concern the whole cluster. It dereferences to its [`Shards`].
#[derive(Clone)]
pub struct PsClient {
    shards: Shards,
}

impl Deref for PsClient {
    type Target = Shards;

    fn deref(&self) -> &Shards {
        &self.shards
    }
}

impl PsClient {
    /// Sets up (lazy) connections to every shard; nothing is sent yet.
    pub fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        Ok(Self { shards: Shards::connect(config)? })
    }

    /// Registers a model on every shard. `values` must hold the initial values
    /// of every tensor whose init rule is [`Init::Provided`]. Registering an
    /// identical spec again succeeds and returns the existing model.
    pub async fn register(&self, spec: &ModelSpec, values: &Tensors) -> Result<ModelHandle, ClientError> {
        let wire = pb::ModelSpec::from(spec);
        let mut provided: HashMap<usize, &[f32]> = HashMap::new();
        for (index, tensor) in spec.tensors.iter().enumerate() {
            if tensor.init == Init::Provided {
                let data = values.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
                check_len(&tensor.name, layout::num_elements(&tensor.shape), data)?;
                provided.insert(index, data);
            }
        }
        // PROVIDED values go straight to the shard that owns each block, so the
        // layout is asked for first (only the servers know which optimizers need whole tensors).
        let plan = if provided.is_empty() { Vec::new() } else { self.plan_layout(&wire).await?.blocks };
        let mut per_shard: Vec<Vec<pb::RegisterModelRequest>> = (0..self.num_shards())
            .map(|_| {
                vec![pb::RegisterModelRequest { item: Some(pb::register_model_request::Item::Spec(wire.clone())) }]
            })
            .collect();
        for block in &plan {
            let Some(data) = provided.get(&block.tensor) else { continue };
            let name = &spec.tensors[block.tensor].name;
            let range = block.offset as usize..(block.offset + block.length) as usize;
            let (Some(values), Some(messages)) = (data.get(range), per_shard.get_mut(block.shard as usize)) else {
                return Err(ProtocolError::PastEnd { tensor: name.clone(), block: block.block }.into());
            };
            messages.extend(
                chunk::encode_block(name, block.block, values, Encoding::F32, 0.0).map(|chunk| {
                    pb::RegisterModelRequest { item: Some(pb::register_model_request::Item::Values(chunk)) }
                }),
            );
        }
        let calls = per_shard.into_iter().enumerate().map(|(shard, messages)| {
            self.retry_admin(shard, move |mut stub| {
                let messages = messages.clone();
                async move { stub.register_model(tokio_stream::iter(messages)).await.map(|r| r.into_inner()) }
            })
        });
        let replies = try_join_all(calls).await?;
        let layout = replies.into_iter().next().and_then(|r| r.layout).ok_or(ClientError::NoLayout)?;
        ModelHandle::new(self.shards.clone(), layout.try_into()?)
    }

    /// The layout the servers would give `spec`, without registering it.
    async fn plan_layout(&self, wire: &pb::ModelSpec) -> Result<Layout, ClientError> {
        let request = pb::PlanLayoutRequest { spec: Some(wire.clone()) };
        let reply = self
            .retry(0, |mut stub| {
                let request = request.clone();
                async move { stub.plan_layout(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        let layout = Layout::try_from(reply)?;
        if layout.tensors.iter().map(|t| &t.name).ne(wire.tensors.iter().map(|t| &t.name)) {
            return Err(ProtocolError::LayoutOrder(wire.name.clone()).into());
        }
        Ok(layout)
    }

    /// Opens a registered model by name.
    pub async fn model(&self, name: &str) -> Result<ModelHandle, ClientError> {
        ModelHandle::open(self.shards.clone(), name).await
    }

    /// Asks shard 0 for a checkpoint of `model` on every shard at one version;
    /// with `wait`, waits up to `timeout` until shard 0 has written its part.
    pub async fn checkpoint(
        &self,
        model: &str,
        wait: bool,
        timeout: Duration,
    ) -> Result<pb::CheckpointResponse, ClientError> {
        let request = pb::CheckpointRequest {
            model: model.to_string(),
            wait,
            timeout_ms: timeout.as_millis() as u64,
            version: None,
            ahead: false,
        };
        self.retry_admin(0, move |mut stub| {
            let request = request.clone();
            async move { stub.checkpoint(request).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Status of every shard, in shard order (`model` empty: all models).
    pub async fn status(&self, model: &str) -> Result<Vec<ShardStatus>, ClientError> {
        try_join_all((0..self.num_shards()).map(|shard| self.shard_status(shard, model))).await
    }

    /// Status of one shard (`model` empty: all its models).
    pub async fn shard_status(&self, shard: usize, model: &str) -> Result<ShardStatus, ClientError> {
        if shard >= self.num_shards() {
            return Err(ClientError::NoSuchShard { shard, shards: self.num_shards() });
        }
        let request = pb::GetStatusRequest { model: model.to_string() };
        self.retry(shard, move |mut stub| {
            let request = request.clone();
            async move { stub.get_status(request).await.map(|r| r.into_inner().into()) }
        })
        .await
    }

    /// Asks one shard to stop as on SIGTERM (a last checkpoint, then exit); needs the admin token.
    pub async fn shutdown(&self, shard: usize) -> Result<(), ClientError> {
        let mut stub = self.admin_stub(shard).ok_or(ClientError::NoShards)?;
        stub.shutdown(pb::ShutdownRequest {}).await.map_err(|status| ClientError::Rpc { shard, status })?;
        Ok(())
    }
}
