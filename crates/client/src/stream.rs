//! Typed progress and the two streams: one load's, and the watch's.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt, stream::BoxStream};

use crate::{Error, pb};

/// The phase a load step belongs to: one per proto `ModelLoadPhase` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// A phase this client does not know (a newer server), or none.
    Unspecified,
    Initialization,
    Loading,
    Device,
    Optimization,
    Finalization,
}

impl From<pb::ModelLoadPhase> for Phase {
    fn from(phase: pb::ModelLoadPhase) -> Self {
        match phase {
            pb::ModelLoadPhase::Unspecified => Self::Unspecified,
            pb::ModelLoadPhase::Initialization => Self::Initialization,
            pb::ModelLoadPhase::Loading => Self::Loading,
            pb::ModelLoadPhase::Device => Self::Device,
            pb::ModelLoadPhase::Optimization => Self::Optimization,
            pb::ModelLoadPhase::Finalization => Self::Finalization,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unspecified",
            Self::Initialization => "initialization",
            Self::Loading => "loading",
            Self::Device => "device",
            Self::Optimization => "optimization",
            Self::Finalization => "finalization",
        })
    }
}

/// Typed progress of one load: a step, or byte progress inside a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub model_id: String,
    /// 1..=total.
    pub step: u32,
    pub total: u32,
    pub phase: Phase,
    /// The step's fixed message ("Loading model weights...").
    pub message: String,
    /// What is happening inside the step; may be empty.
    pub detail: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    raw: pb::ModelLoadProgress,
}

impl Progress {
    /// The message as the server sent it (for `--json`: the proto's JSON mapping).
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
            phase: raw.phase().into(),
            message: raw.message.clone(),
            detail: raw.detail.clone(),
            bytes_done: raw.bytes_done,
            bytes_total: raw.bytes_total,
            raw,
        }
    }
}

/// An item of a load's stream: progress, then exactly one `Finished`, the last item.
#[derive(Debug, Clone)]
pub enum LoadUpdate {
    Progress(Progress),
    /// The outcome: `Ok` when the model is LOADED, else the load's error (its kind says why).
    Finished(Result<(), Error>),
}

/// The stream of one load (or of a load in flight it joined). The load does not depend on it:
/// dropping it leaves the load running.
pub struct LoadStream {
    inner: tonic::Streaming<pb::ModelLoadProgress>,
    done: bool,
}

impl LoadStream {
    pub(crate) fn new(inner: tonic::Streaming<pb::ModelLoadProgress>) -> Self {
        Self { inner, done: false }
    }

    /// Drains the stream: the last progress when the load succeeded, else its error.
    pub async fn finish(mut self) -> Result<Progress, Error> {
        let mut last = None;
        while let Some(update) = self.next().await {
            match update {
                LoadUpdate::Progress(p) => last = Some(p),
                LoadUpdate::Finished(Err(e)) => return Err(e),
                LoadUpdate::Finished(Ok(())) => break,
            }
        }
        last.ok_or_else(|| Error::new(tonic::Code::Unknown, "unknown", "the load's stream ended without progress"))
    }
}

impl Stream for LoadStream {
    type Item = LoadUpdate;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LoadUpdate>> {
        if self.done {
            return Poll::Ready(None);
        }
        let update = match std::task::ready!(self.inner.poll_next_unpin(cx)) {
            Some(Ok(progress)) => return Poll::Ready(Some(LoadUpdate::Progress(progress.into()))),
            Some(Err(status)) => LoadUpdate::Finished(Err(status.into())),
            None => LoadUpdate::Finished(Ok(())),
        };
        self.done = true;
        Poll::Ready(Some(update))
    }
}

/// An event of WatchModels: a model's status, or a progress message of a load.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    Status(pb::ModelStatus),
    Progress(Progress),
}

/// The stream of WatchModels: a snapshot of the statuses, then every change. It ends only with
/// an error (the server shutting down is `unavailable`).
pub struct WatchStream {
    inner: BoxStream<'static, Result<WatchEvent, Error>>,
}

impl WatchStream {
    pub(crate) fn new(inner: tonic::Streaming<pb::ModelEvent>) -> Self {
        let inner = inner
            .filter_map(|item| async move {
                match item {
                    // An event of a kind this client does not know (a newer server) is skipped.
                    Ok(pb::ModelEvent { event: None }) => None,
                    Ok(pb::ModelEvent { event: Some(pb::model_event::Event::Status(s)) }) => {
                        Some(Ok(WatchEvent::Status(s)))
                    }
                    Ok(pb::ModelEvent { event: Some(pb::model_event::Event::Progress(p)) }) => {
                        Some(Ok(WatchEvent::Progress(p.into())))
                    }
                    Err(status) => Some(Err(status.into())),
                }
            })
            .boxed();
        Self { inner }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}
