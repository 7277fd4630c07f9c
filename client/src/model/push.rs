//! Pushes: one step's gradients, checked against the layout, cut into whole
//! blocks per shard and streamed in each group's encoding (over the local
//! channel where a shard is on this host); the recovery of a lost lease; and
//! the global-norm clipping the spec asks for.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::future::{join_all, try_join_all};
use ps_proto::transport::PUSH_STREAM_BYTES;
use ps_proto::{codec, errors, frame, pb};

use super::{Gradients, LocalFailure, ModelHandle, PushOptions, PushRequest, PushSummary, StepOutcome, check_len};
use crate::Tensors;
use crate::error::ClientError;
use crate::spec::Encoding;

impl ModelHandle {
    /// Pushes one step's gradients (every tensor, full length) to all shards
    /// at once, each tensor in its group's preferred encoding; sign1 sends the
    /// signs with the tensor's mean absolute value as the scale. Transient
    /// failures are retried; the server ignores blocks it already counted, so
    /// a retry is safe.
    pub async fn push(&self, worker: &str, step: u64, grads: &Tensors) -> Result<PushSummary, ClientError> {
        self.push_gradients(worker, step, Gradients::Lent(grads), &PushOptions::default()).await
    }

    /// Pushes as [`ModelHandle::push`] does, with [`PushOptions`]: tensors
    /// without a gradient this step, and the step's learning-rate scale.
    pub async fn push_with(
        &self,
        worker: &str,
        step: u64,
        grads: &Tensors,
        options: &PushOptions,
    ) -> Result<PushSummary, ClientError> {
        self.push_gradients(worker, step, Gradients::Lent(grads), options).await
    }

    /// Pushes as [`ModelHandle::push`] does, but the tensors named in
    /// `no_gradient` (and absent from `grads`) have no gradient this step: a
    /// frozen parameter, or one the step did not use. They go as
    /// `ENCODING_NO_GRADIENT`: the step's mean counts them as zeros, and a
    /// block no worker of the step had a gradient for keeps its weights and
    /// optimizer state, as torch.optim leaves a parameter whose `grad` is None.
    pub async fn push_partial(
        &self,
        worker: &str,
        step: u64,
        grads: &Tensors,
        no_gradient: &BTreeSet<String>,
    ) -> Result<PushSummary, ClientError> {
        self.push_with(worker, step, grads, &PushOptions { no_gradient: no_gradient.clone(), ..Default::default() })
            .await
    }

    /// Pushes as [`ModelHandle::push`] does, taking the gradients: over gRPC,
    /// tensors sent as f32 go to the socket from where they lie instead of
    /// being copied into each message first. For a trainer that makes fresh
    /// gradients every step; they are freed when the push is done (unless the
    /// caller keeps a clone of the `Arc`).
    pub async fn push_owned(
        &self,
        worker: &str,
        step: u64,
        grads: impl Into<Arc<Tensors>>,
    ) -> Result<PushSummary, ClientError> {
        self.push_gradients(worker, step, Gradients::Owned(&grads.into()), &PushOptions::default()).await
    }

    /// The push behind [`ModelHandle::push`] and [`ModelHandle::push_owned`].
    pub(super) async fn push_gradients(
        &self,
        worker: &str,
        step: u64,
        gradients: Gradients<'_>,
        options: &PushOptions,
    ) -> Result<PushSummary, ClientError> {
        let no_gradient = &options.no_gradient;
        let grads = gradients.tensors();
        for name in grads.keys().chain(no_gradient) {
            if !self.index.contains_key(name) {
                return Err(ClientError::UnknownTensor(name.clone()));
            }
        }
        if let Some(both) = no_gradient.iter().find(|name| grads.contains_key(*name)) {
            return Err(ClientError::GradientAndNoGradient(both.clone()));
        }
        let mut scales = Vec::with_capacity(self.tensors.len());
        for tensor in self.tensors.iter() {
            if options.overflow || no_gradient.contains(&tensor.name) {
                scales.push(0.0);
                continue;
            }
            let data = grads.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
            check_len(&tensor.name, tensor.len as u64, data)?;
            scales.push(if tensor.encoding == Encoding::Sign1 { codec::mean_abs(data) } else { 0.0 });
        }
        let push = PushRequest {
            worker,
            step,
            gradients,
            scales: &scales,
            no_gradient,
            overflow: options.overflow,
            lr_scale: options.lr_scale,
        };
        // Every shard's push runs to its end even when another shard refuses
        // its part: a shard that takes it must get all of it. Cut short, a push
        // that one shard refuses at once (its step went ahead) would never
        // reach a shard still waiting for it, and the worker would resync
        // there again and again.
        let outcomes = join_all(self.shards_with_blocks().into_iter().map(|shard| self.push_shard(shard, &push))).await;
        let mut replies = Vec::with_capacity(outcomes.len());
        let mut refused: Option<ClientError> = None;
        for outcome in outcomes {
            match outcome {
                Ok(reply) => replies.push(reply),
                // A rollback decides what comes next, whatever the other shards said.
                Err(error)
                    if refused
                        .as_ref()
                        .is_none_or(|first| first.rollback().is_none() && error.rollback().is_some()) =>
                {
                    refused = Some(error);
                }
                Err(_) => {}
            }
        }
        if let Some(error) = refused {
            return Err(error);
        }
        Ok(replies.iter().flat_map(|(replies, _)| replies).fold(
            PushSummary { bytes: replies.iter().map(|(_, bytes)| bytes).sum(), ..Default::default() },
            |sum, r| PushSummary {
                accepted: sum.accepted + r.blocks_accepted,
                duplicate: sum.duplicate + r.blocks_duplicate,
                updated: sum.updated + r.blocks_updated,
                bytes: sum.bytes,
            },
        ))
    }

    /// Pushes one shard's blocks: through a memory segment when the shard is on
    /// this host, otherwise (or when the local channel fails) over gRPC.
    async fn push_shard(
        &self,
        shard: usize,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), ClientError> {
        if let Some(local) = self.shards.local_shard(shard).await.filter(|local| local.segments) {
            match self.push_local(shard, &local, push).await {
                Ok(done) => return Ok(done),
                Err(LocalFailure::Channel(why)) => self.shards.leave_local(shard, &why),
                Err(LocalFailure::Server(error)) => return Err(error),
            }
        }
        self.push_grpc(shard, push).await
    }

    async fn push_grpc(
        &self,
        shard: usize,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), ClientError> {
        // Streams of whole blocks, each within the shards' per-stream limit.
        let mut streams: Vec<PushStream> = Vec::new();
        for (at, block) in self.blocks_on(shard) {
            let block_bytes = codec::payload_len(push.encoding(&self.tensors[at]), block.length);
            match streams.last() {
                Some(last) if last.bytes + block_bytes <= PUSH_STREAM_BYTES as u64 => {}
                _ => streams.push(PushStream::default()),
            }
            let stream = streams.last_mut().expect("a stream was just ensured");
            stream.bytes += block_bytes;
            stream.blocks.push((at, block));
        }
        let bytes_total = streams.iter().map(|s| s.bytes).sum();
        let calls = streams.iter().map(|stream| {
            self.shards.retry(shard, move |mut stub| async move {
                // Chunks are framed (`frame`: one copy, from the caller's
                // floats, or none for f32 gradients handed over) as the stream
                // takes them, so the first is on the wire while the rest are
                // still floats, and no copy of the whole push is ever held. A
                // retry frames them again.
                let (sender, receiver) = tokio::sync::mpsc::channel(PUSH_CHUNKS_AHEAD);
                let call = stub.frames(tokio_stream::wrappers::ReceiverStream::new(receiver));
                let feed = self.feed_push(stream, push, sender);
                tokio::pin!(call, feed);
                // A call that ends first (the server refused the push part-way)
                // ends the feeding with it, whether or not its stream was dropped.
                tokio::select! {
                    reply = &mut call => reply,
                    () = &mut feed => call.await,
                }
            })
        });
        Ok((try_join_all(calls).await?, bytes_total))
    }

    /// Frames one push stream's blocks chunk by chunk into `sender`; stops
    /// early when the call ended (the server answered or the stream broke).
    async fn feed_push(
        &self,
        stream: &PushStream<'_>,
        push: &PushRequest<'_>,
        sender: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        let header = frame::PushHeader {
            model: self.name(),
            worker: push.worker,
            step: push.step,
            epoch: self.epoch(),
            lr_scale: push.lr_scale,
        };
        for &(at, block) in &stream.blocks {
            let tensor = &self.tensors[at];
            let range = block.offset as usize..(block.offset + block.length) as usize;
            let encoding = push.encoding(tensor);
            let frames: Box<dyn Iterator<Item = bytes::Bytes> + Send + '_> = match push.gradients {
                _ if encoding.carries_no_values() => Box::new(std::iter::once(frame::without_values_frame(
                    header,
                    &tensor.name,
                    block.block,
                    range.len(),
                    encoding,
                ))),
                // f32 on the wire is the memory layout here: the values go out as they lie.
                Gradients::Owned(grads) if encoding == pb::Encoding::F32 && cfg!(target_endian = "little") => {
                    let values = bytes::Bytes::from_owner(PushedValues {
                        grads: grads.clone(),
                        tensor: tensor.name.clone(),
                        range,
                    });
                    Box::new(frame::f32_block_pieces(header, &tensor.name, block.block, values))
                }
                _ => {
                    let values = &push.gradients.tensors()[&tensor.name][range];
                    Box::new(frame::block_frames(header, &tensor.name, block.block, values, encoding, push.scales[at]))
                }
            };
            for frame in frames {
                if sender.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Pushes one step as [`ModelHandle::push`] does, and recovers from a lost
    /// lease: a worker the shards no longer count joins again and the push is
    /// retried once; a step that was applied without it comes back as
    /// [`StepOutcome::Resync`] with the version to continue from (pull it, then
    /// push that step). The worker's compression state is the caller's and is
    /// kept as it is.
    pub async fn push_step(&self, worker: &str, step: u64, grads: &Tensors) -> Result<StepOutcome, ClientError> {
        self.push_step_gradients(worker, step, Gradients::Lent(grads), &PushOptions::default()).await
    }

    /// [`ModelHandle::push_step`] with [`PushOptions`].
    pub async fn push_step_with(
        &self,
        worker: &str,
        step: u64,
        grads: &Tensors,
        options: &PushOptions,
    ) -> Result<StepOutcome, ClientError> {
        self.push_step_gradients(worker, step, Gradients::Lent(grads), options).await
    }

    /// [`ModelHandle::push_step`] with tensors that have no gradient this step
    /// (see [`ModelHandle::push_partial`]).
    pub async fn push_step_partial(
        &self,
        worker: &str,
        step: u64,
        grads: &Tensors,
        no_gradient: &BTreeSet<String>,
    ) -> Result<StepOutcome, ClientError> {
        self.push_step_with(
            worker,
            step,
            grads,
            &PushOptions { no_gradient: no_gradient.clone(), ..Default::default() },
        )
        .await
    }

    /// [`ModelHandle::push_step`], taking the gradients as [`ModelHandle::push_owned`] does.
    pub async fn push_step_owned(
        &self,
        worker: &str,
        step: u64,
        grads: impl Into<Arc<Tensors>>,
    ) -> Result<StepOutcome, ClientError> {
        self.push_step_gradients(worker, step, Gradients::Owned(&grads.into()), &PushOptions::default()).await
    }

    /// The step behind [`ModelHandle::push_step`] and [`ModelHandle::push_step_owned`].
    async fn push_step_gradients(
        &self,
        worker: &str,
        step: u64,
        gradients: Gradients<'_>,
        options: &PushOptions,
    ) -> Result<StepOutcome, ClientError> {
        let mut rejoined = false;
        loop {
            match self.push_gradients(worker, step, gradients, options).await {
                Ok(summary) => return Ok(StepOutcome::Pushed(summary)),
                Err(error) if error.kind() == Some(errors::UNKNOWN_WORKER) && !rejoined => {
                    tracing::warn!(
                        worker,
                        step,
                        "no longer a member of '{}' (lease expired?); joining again",
                        self.name()
                    );
                    self.join(worker).await?;
                    rejoined = true;
                }
                Err(error) if error.kind() == Some(errors::STALE_STEP) => {
                    // join is idempotent for a member and reports where the model is now.
                    let version = self.join(worker).await?.version;
                    tracing::warn!(
                        worker,
                        step,
                        version,
                        "step {step} was applied without this worker; resuming at version {version}"
                    );
                    return Ok(StepOutcome::Resync { version });
                }
                Err(error) => match self.resume_after_rollback(worker, &error).await? {
                    Some(version) => return Ok(StepOutcome::RolledBack { version }),
                    None => return Err(error),
                },
            }
        }
    }

    /// Scales `grads` so that their L2 norm over all tensors is at most the
    /// model's `max_grad_norm` (when it is set); returns the norm before.
    /// Call it on the raw gradient, before any compression: the shards never
    /// hold a whole gradient, so this is where the global norm is known.
    /// Buffers' values (groups with `buffers`) are left out.
    pub fn clip_to_max_norm(&self, grads: &mut Tensors) -> f64 {
        let buffers: std::collections::HashSet<&str> = self
            .layout
            .tensors
            .iter()
            .filter(|t| self.layout.groups.iter().any(|g| g.name == t.group && g.buffers))
            .map(|t| t.name.as_str())
            .collect();
        let gradients = |name: &String| !buffers.contains(name.as_str());
        let norm = grads
            .iter()
            .filter(|(name, _)| gradients(name))
            .flat_map(|(_, g)| g)
            .map(|g| f64::from(*g) * f64::from(*g))
            .sum::<f64>()
            .sqrt();
        if self.layout.max_grad_norm > 0.0 && norm > self.layout.max_grad_norm {
            let scale = (self.layout.max_grad_norm / (norm + 1e-6)) as f32;
            grads.iter_mut().filter(|(name, _)| gradients(name)).flat_map(|(_, g)| g).for_each(|g| *g *= scale);
        }
        norm
    }
}

/// The blocks of one push stream (with their tensor's index) and their payload bytes.
#[derive(Default)]
struct PushStream<'a> {
    blocks: Vec<(usize, &'a crate::layout::BlockPlan)>,
    bytes: u64,
}

/// Encoded chunks a push stream keeps ready ahead of the one being sent.
const PUSH_CHUNKS_AHEAD: usize = 2;

/// One block of a push's own gradients as bytes, alive as long as a frame that sends them.
struct PushedValues {
    grads: Arc<Tensors>,
    tensor: String,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for PushedValues {
    fn as_ref(&self) -> &[u8] {
        // The push checked every tensor's name and length before it framed any.
        let values = self.grads.get(&self.tensor).and_then(|values| values.get(self.range.clone()));
        bytemuck::cast_slice(values.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientConfig;
    use crate::shards::Shards;

    fn handle(max_grad_norm: f64) -> ModelHandle {
        let shards = Shards::connect(ClientConfig::new(vec!["127.0.0.1:1".into()])).unwrap();
        let layout = pb::Layout {
            model: "m".into(),
            shards: vec!["127.0.0.1:1".into()],
            tensors: vec![pb::TensorLayout { name: "w".into(), shape: vec![2], group: "g".into() }],
            max_grad_norm,
            ..Default::default()
        };
        ModelHandle::new(shards, layout.try_into().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn clipping_scales_the_whole_gradient_to_the_model_norm() {
        let mut grads: Tensors = [("w".to_string(), vec![3.0f32, 4.0])].into_iter().collect();
        assert_eq!(handle(1.0).clip_to_max_norm(&mut grads), 5.0);
        assert!((grads["w"][0] - 0.6).abs() < 1e-6 && (grads["w"][1] - 0.8).abs() < 1e-6);
        let mut small: Tensors = [("w".to_string(), vec![0.3f32, 0.4])].into_iter().collect();
        handle(1.0).clip_to_max_norm(&mut small);
        assert_eq!(small["w"], vec![0.3, 0.4], "a gradient under the limit is left alone");
        let mut unlimited: Tensors = [("w".to_string(), vec![30.0f32, 40.0])].into_iter().collect();
        handle(0.0).clip_to_max_norm(&mut unlimited);
        assert_eq!(unlimited["w"], vec![30.0, 40.0]);
    }

    #[tokio::test]
    async fn clipping_leaves_buffers_out() {
        let shards = Shards::connect(ClientConfig::new(vec!["127.0.0.1:1".into()])).unwrap();
        let tensor =
            |name: &str, group: &str| pb::TensorLayout { name: name.into(), shape: vec![2], group: group.into() };
        let group = |name: &str, buffers| pb::GroupLayout { name: name.into(), buffers, ..Default::default() };
        let layout = pb::Layout {
            model: "m".into(),
            shards: vec!["127.0.0.1:1".into()],
            tensors: vec![tensor("w", "weights"), tensor("bn.running_var", "buffers")],
            groups: vec![group("buffers", true), group("weights", false)],
            max_grad_norm: 1.0,
            ..Default::default()
        };
        let handle = ModelHandle::new(shards, layout.try_into().unwrap()).unwrap();
        let mut grads: Tensors =
            [("w".to_string(), vec![3.0f32, 4.0]), ("bn.running_var".to_string(), vec![100.0, 200.0])].into();
        assert_eq!(handle.clip_to_max_norm(&mut grads), 5.0, "the norm is the gradient's alone");
        assert_eq!(grads["bn.running_var"], vec![100.0, 200.0], "values are not scaled");
        assert!((grads["w"][0] - 0.6).abs() < 1e-6);
    }
}
