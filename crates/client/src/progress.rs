//! Typed progress of a load.

use std::fmt;

use crate::pb;

/// The phase of a step, one per `ModelLoadPhase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Unspecified,
    Initialization,
    Loading,
    Device,
    Optimization,
    Finalization,
}

impl Phase {
    /// The phase as logs and people spell it (`loading`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Unspecified => "unspecified",
            Phase::Initialization => "initialization",
            Phase::Loading => "loading",
            Phase::Device => "device",
            Phase::Optimization => "optimization",
            Phase::Finalization => "finalization",
        }
    }
}

impl From<pb::ModelLoadPhase> for Phase {
    fn from(phase: pb::ModelLoadPhase) -> Self {
        match phase {
            pb::ModelLoadPhase::Unspecified => Phase::Unspecified,
            pb::ModelLoadPhase::Initialization => Phase::Initialization,
            pb::ModelLoadPhase::Loading => Phase::Loading,
            pb::ModelLoadPhase::Device => Phase::Device,
            pb::ModelLoadPhase::Optimization => Phase::Optimization,
            pb::ModelLoadPhase::Finalization => Phase::Finalization,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One progress message of a load, typed; [`Progress::raw`] keeps the message as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub model_id: String,
    pub step: u32,
    pub total: u32,
    pub phase: Phase,
    pub message: String,
    pub detail: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    raw: pb::ModelLoadProgress,
}

impl Progress {
    /// The message as the server sent it (for JSON output).
    pub fn raw(&self) -> &pb::ModelLoadProgress {
        &self.raw
    }
}

impl From<pb::ModelLoadProgress> for Progress {
    fn from(raw: pb::ModelLoadProgress) -> Self {
        Self {
            model_id: raw.model_id.clone(),
            step: raw.step,
            total: raw.total,
            // An unknown value (a newer server) reads as unspecified.
            phase: pb::ModelLoadPhase::try_from(raw.phase).map_or(Phase::Unspecified, Phase::from),
            message: raw.message.clone(),
            detail: raw.detail.clone(),
            bytes_done: raw.bytes_done,
            bytes_total: raw.bytes_total,
            raw,
        }
    }
}
