//! Conversions at the edge: proto requests into validated domain types (INVALID_ARGUMENT when
//! they are not), domain values into proto messages.

use model_manager::{
    LoadRequest, ModelId, ModelSource, ModelStatus, Revision, TargetDtype,
    pipeline_manager::{ModelFile, TensorInfo},
    resource_manager::{DeviceId, DeviceRequest, DeviceUsage, Layout, TargetRequest},
    state_manager::{ModelState, StateEvent},
    steps::{ModelLoadPhase, ModelLoadProgress},
};
use proto::v1 as pb;
use tonic::Status;

fn invalid(e: impl ToString) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn model_id(id: &str) -> Result<ModelId, Status> {
    ModelId::parse(id).map_err(invalid)
}

pub fn load_request(r: pb::LoadModelRequest) -> Result<LoadRequest, Status> {
    Ok(LoadRequest {
        model_id: model_id(&r.model_id)?,
        revision: match r.revision.as_deref() {
            None | Some("") => Revision::default(),
            Some(rev) => Revision::parse(rev).map_err(invalid)?,
        },
        device: match r.device.as_deref() {
            None | Some("") => None,
            Some(d) => Some(d.parse::<TargetRequest>().map_err(invalid)?),
        },
        placement: match r.placement.as_deref() {
            None | Some("") => None,
            Some(p) => Some(p.parse::<Layout>().map_err(invalid)?),
        },
        device_map: device_map(r.device_map)?,
        dtype: match r.dtype.as_deref() {
            None | Some("") => None,
            Some(d) => Some(d.parse::<TargetDtype>().map_err(invalid)?),
        },
    })
}

/// The most entries a device map may have: one per module of the largest models (a 100-layer
/// model has a few hundred), a bound on what a request makes the server hold.
const MAX_DEVICE_MAP_ENTRIES: usize = 4096;

/// A request's device map, its devices parsed, in prefix order (errors name the same entry
/// every time).
fn device_map(map: std::collections::HashMap<String, String>) -> Result<Vec<(String, DeviceId)>, Status> {
    if map.len() > MAX_DEVICE_MAP_ENTRIES {
        return Err(invalid(format!("device_map has {} entries, more than {MAX_DEVICE_MAP_ENTRIES}", map.len())));
    }
    let mut entries = map
        .into_iter()
        .map(|(prefix, device)| {
            let device = device.parse::<DeviceRequest>().map_err(|e| {
                let shown: String = prefix.chars().take(64).collect();
                invalid(format!("device_map[{shown:?}]: {e}"))
            })?;
            Ok((prefix, device.id()))
        })
        .collect::<Result<Vec<_>, Status>>()?;
    entries.sort();
    Ok(entries)
}

pub fn progress(p: ModelLoadProgress) -> pb::ModelLoadProgress {
    pb::ModelLoadProgress {
        step: p.step.number(),
        total: p.total(),
        phase: phase(p.phase()) as i32,
        message: p.message().to_owned(),
        model_id: p.model_id,
        detail: p.detail,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
    }
}

fn phase(p: ModelLoadPhase) -> pb::ModelLoadPhase {
    match p {
        ModelLoadPhase::Initialization => pb::ModelLoadPhase::Initialization,
        ModelLoadPhase::Loading => pb::ModelLoadPhase::Loading,
        ModelLoadPhase::Device => pb::ModelLoadPhase::Device,
        ModelLoadPhase::Optimization => pb::ModelLoadPhase::Optimization,
        ModelLoadPhase::Finalization => pb::ModelLoadPhase::Finalization,
    }
}

pub fn status(s: ModelStatus) -> pb::ModelStatus {
    let state = match s.state {
        ModelState::Unloaded => pb::ModelState::Unloaded,
        ModelState::Loading => pb::ModelState::Loading,
        ModelState::Loaded => pb::ModelState::Loaded,
        ModelState::Unloading => pb::ModelState::Unloading,
        ModelState::Failed => pb::ModelState::Failed,
    };
    let source = match s.facts.source {
        None => pb::ModelSource::Unspecified,
        Some(ModelSource::Local) => pb::ModelSource::Local,
        Some(ModelSource::Cache) => pb::ModelSource::Cache,
        Some(ModelSource::Hub) => pb::ModelSource::Hub,
        Some(ModelSource::ObjectStore) => pb::ModelSource::ObjectStore,
    };
    pb::ModelStatus {
        model_id: s.model_id.to_string(),
        state: state as i32,
        last_progress: s.last_progress.map(progress),
        device: s.facts.target.map(|t| t.to_string()).unwrap_or_default(),
        dtype: s.facts.dtype,
        revision: s.facts.revision,
        weight_bytes: s.facts.weight_bytes,
        metadata_bytes: s.facts.metadata_bytes,
        sample_size: s.facts.sample_size,
        error: s.error.unwrap_or_default(),
        error_kind: s.error_kind.unwrap_or_default().to_owned(),
        last_used_unix_ms: s.last_used_unix_ms,
        source: source as i32,
        unload_reason: s.unload_reason.unwrap_or_default(),
        attached_clients: u32::try_from(s.attached_clients).unwrap_or(u32::MAX),
    }
}

pub fn event(e: StateEvent) -> pb::ModelEvent {
    pb::ModelEvent {
        event: Some(match e {
            StateEvent::Status(s) => pb::model_event::Event::Status(status(s)),
            StateEvent::Progress(p) => pb::model_event::Event::Progress(progress(p)),
        }),
    }
}

pub fn device(d: DeviceUsage) -> pb::DeviceResources {
    pb::DeviceResources {
        name: d.device.to_string(),
        total_bytes: d.total_bytes,
        used_bytes: d.used_bytes,
        reserved_bytes: d.reserved_bytes,
        budget_bytes: d.budget_bytes,
        available_bytes: d.available_bytes,
        peak_bytes: d.peak_bytes,
        models: d
            .models
            .into_iter()
            .map(|(model_id, bytes)| pb::ModelResources { model_id: model_id.to_string(), bytes })
            .collect(),
    }
}

pub fn tensor(t: TensorInfo) -> pb::TensorInfo {
    pb::TensorInfo {
        name: t.name,
        dtype: t.dtype.to_owned(),
        shape: t.shape,
        size_bytes: t.size_bytes,
        sha256: t.sha256.unwrap_or_default(),
        device: t.device.to_string(),
    }
}

/// A small file as GetModelFiles and the attach socket list it; with its bytes where asked.
pub fn model_file(f: &ModelFile, with_content: bool) -> pb::ModelFile {
    pb::ModelFile {
        path: f.path.clone(),
        size_bytes: f.size_bytes(),
        sha256: f.sha256.clone(),
        content: if with_content { f.content.to_vec() } else { Vec::new() },
    }
}
