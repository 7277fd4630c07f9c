//! Registration and layouts: `RegisterModel` (the spec checked and every
//! byte the model will take counted before anything is allocated, initial
//! values reassembled), `GetLayout` and `PlanLayout`.

use prost::Message;
use ps_proto::pb;
use tonic::{Request, Status, Streaming};

use super::assemble::{self, Assembler, Purpose};
use super::convert;
use super::service::ParameterService;
use super::streams::{StreamClock, held_bytes};
use crate::error::ServerError;
use crate::spec::ModelSpec;
use crate::store::{Model, blocking};

impl ParameterService {
    pub(super) async fn register(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<pb::RegisterModelResponse, Status> {
        let _slot = self.bounds.streams.open("RegisterModel")?;
        let limits = &self.bounds.limits;
        let clock = StreamClock::start("RegisterModel", limits);
        let mut stream = request.into_inner();
        let spec = match clock.next(&mut stream).await?.and_then(|m| m.item) {
            Some(pb::register_model_request::Item::Spec(spec)) => {
                let bytes = spec.encoded_len();
                if bytes > limits.max_spec_bytes {
                    return Err(ServerError::LimitExceeded {
                        what: format!(
                            "the model spec takes {bytes} bytes, over the limit of {}",
                            limits.max_spec_bytes
                        ),
                        flag: "--max-spec-bytes",
                    }
                    .into());
                }
                ModelSpec::try_from(spec)?
            }
            _ => return Err(ServerError::SpecNotFirst.into()),
        };
        if let Some(model) = self.registry.existing(&spec)? {
            tracing::info!(model = model.name(), "model already registered with the same spec");
            return Ok(pb::RegisterModelResponse {
                created: false,
                layout: Some(convert::model_layout(&self.registry.identity(), &model)),
            });
        }
        if self.registry.cluster.pending().is_some() {
            let reason =
                "the shards are changing their shard list (online reshard); register once they are done".into();
            return Err(ServerError::Resharding { model: spec.name.clone(), version: 0, reason }.into());
        }
        // Everything the model will take is checked before any of it is allocated.
        let footprint = limits.check_model(&spec, self.registry.num_shards())?;
        self.durability.refuse_fork(&spec.name).await?;
        let reservation = self.bounds.models.reserve(limits, &spec.name, footprint)?;
        let (shard, shards, lease) = (self.registry.identity().index, self.registry.num_shards(), self.registry.lease);
        let plan = self.durability.plan();
        let identity = (*self.registry.identity()).clone();
        let model = blocking(move || {
            check_layout_fits(&identity, &spec)?;
            Ok::<_, ServerError>(Model::new(spec, shard, shards, lease).with_checkpoints(1, plan))
        })
        .await??;
        let mut assembler = Assembler::new(&model, Purpose::Weights);
        let mut staging = self.bounds.registration_staging(footprint);
        while let Some(message) = clock.next(&mut stream).await? {
            match message.item {
                Some(pb::register_model_request::Item::Values(chunk)) => {
                    staging.take(held_bytes(&chunk))?;
                    assembler.add(chunk)?
                }
                _ => return Err(ServerError::SpecRepeated.into()),
            }
        }
        let staged = assembler.finish()?;
        let model = blocking(move || {
            let values = assemble::decode(&model, staged)?;
            model.install_initial_values(values)?;
            Ok::<_, ServerError>(model)
        })
        .await??;
        drop(staging);
        let (created, model) = self.registry.insert(model)?;
        if created {
            reservation.keep();
        }
        if created && model.checkpoints.enabled() {
            // Version 0 is the point every rollback can go back to.
            let first = model.clone();
            blocking(move || first.schedule_checkpoint(0, false)).await??;
        }
        tracing::info!(
            model = model.name(),
            created,
            mode = model.spec.options.mode.as_str(),
            tensors = model.spec.tensors.len(),
            blocks = model.local_blocks().len(),
            "model registered"
        );
        let layout = convert::model_layout(&self.registry.identity(), &model);
        Ok(pb::RegisterModelResponse { created, layout: Some(layout) })
    }

    /// The layout of a registered model.
    pub(super) fn layout_of(&self, request: &pb::GetLayoutRequest) -> Result<pb::Layout, ServerError> {
        let model = self.registry.get(&request.model)?;
        Ok(convert::model_layout(&self.registry.identity(), &model))
    }

    /// The layout a spec would get, without registering it.
    pub(super) async fn plan(&self, request: pb::PlanLayoutRequest) -> Result<pb::Layout, ServerError> {
        let service = self.clone();
        let plan = move || {
            let wire = request.spec.ok_or(ServerError::InvalidSpec("PlanLayout needs a spec".into()))?;
            let spec = ModelSpec::try_from(wire)?;
            service.bounds.limits.check_model(&spec, service.registry.num_shards())?;
            let identity = &*service.registry.identity();
            Ok::<_, ServerError>(convert::layout(identity, &spec, &spec.plan(service.registry.num_shards())))
        };
        // Validation and placement are linear in the tensors and blocks: not on the reactor.
        blocking(plan).await?
    }
}

/// Refuses a model whose layout would not fit in one reply: the registration
/// would succeed, and every GetLayout of it fail.
fn check_layout_fits(identity: &crate::store::ShardIdentity, spec: &ModelSpec) -> Result<(), ServerError> {
    let bytes = convert::layout(identity, spec, &spec.plan(identity.addresses.len() as u32)).encoded_len();
    if bytes > ps_proto::transport::MAX_MESSAGE_BYTES {
        return Err(ServerError::LimitExceeded {
            what: format!(
                "the layout of model '{}' would take {bytes} bytes, more than one gRPC message holds ({}); \
                 use fewer blocks (a larger max_block_elements) or shorter tensor names",
                spec.name,
                ps_proto::transport::MAX_MESSAGE_BYTES
            ),
            flag: "--max-model-blocks",
        });
    }
    Ok(())
}
