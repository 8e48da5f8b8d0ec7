//! How a load's progress is drawn: live (a step line and one byte bar per byte-moving phase), as
//! plain lines, or as JSON. Shared by `load` and `watch`'s plain output.

use std::time::Duration;

use client::pb;
use console::style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{render, terminal::Output};

/// The step that downloads and then reads weights (the proto's step numbers are API).
const LOAD_WEIGHTS: u32 = 4;
/// The step that copies to a device.
const MOVE_TO_DEVICE: u32 = 6;

/// One run of byte progress: a step's download, its read, or a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    step: u32,
    /// Runs seen in this step before this one.
    index: u32,
    total: u64,
    done: u64,
}

/// Tells the byte runs of a load apart: step 4 sends the download (when the cache missed) and
/// then the read, each counting from 0 to its own total.
#[derive(Debug, Default)]
pub struct Runs {
    current: Option<Run>,
    /// Step 2 said the files are to be downloaded ("cache miss: …").
    downloads: bool,
}

/// What a progress message means for the byte runs.
#[derive(Debug, PartialEq, Eq)]
pub enum RunChange {
    /// No bytes moving (or the same run, further along).
    Same,
    /// A new run starts, labelled; the previous one (if any) has ended.
    Started(&'static str),
}

impl Runs {
    /// Follows one message.
    pub fn follow(&mut self, p: &pb::ModelLoadProgress) -> RunChange {
        if p.step == 2 && p.detail.starts_with("cache miss") {
            self.downloads = true;
        }
        if p.bytes_total == 0 {
            if self.current.as_ref().is_some_and(|r| r.step != p.step) {
                self.current = None;
            }
            return RunChange::Same;
        }
        let index = match &self.current {
            Some(run) if run.step == p.step && run.total == p.bytes_total && run.done <= p.bytes_done => {
                self.current.as_mut().expect("matched").done = p.bytes_done;
                return RunChange::Same;
            }
            Some(run) if run.step == p.step => run.index + 1,
            _ => 0,
        };
        self.current = Some(Run { step: p.step, index, total: p.bytes_total, done: p.bytes_done });
        RunChange::Started(match (p.step, index) {
            (LOAD_WEIGHTS, 0) if self.downloads => "download",
            (LOAD_WEIGHTS, _) => "read",
            (MOVE_TO_DEVICE, _) => "copy",
            _ => "bytes",
        })
    }
}

/// Draws one load's progress.
pub enum View {
    Json,
    Plain { runs: Runs, last: Option<(u32, String)> },
    Live(Live),
}

/// The live view: a step line under the byte bars of the runs so far.
pub struct Live {
    multi: MultiProgress,
    step: ProgressBar,
    bytes: Option<ProgressBar>,
    runs: Runs,
}

impl View {
    pub fn new(output: Output) -> Self {
        match output {
            Output::Json => View::Json,
            Output::Plain => View::Plain { runs: Runs::default(), last: None },
            Output::Live => View::Live(Live::new()),
        }
    }

    /// Shows one message.
    pub fn show(&mut self, p: &pb::ModelLoadProgress) {
        match self {
            View::Json => crate::print_json(p),
            View::Plain { runs, last } => {
                let change = runs.follow(p);
                let step = (p.step, p.detail.clone());
                if last.as_ref() != Some(&step) {
                    say!("{}", render::step_line(p));
                    *last = Some(step);
                }
                if let RunChange::Started(label) = change {
                    say!("  {label}: {}", render::size(p.bytes_total));
                }
                if p.bytes_total > 0 && p.bytes_done == p.bytes_total {
                    say!("  done: {} of {}", render::size(p.bytes_done), render::size(p.bytes_total));
                }
            }
            View::Live(live) => live.show(p),
        }
    }

    /// Stops drawing (before a prompt); [`View::resume`] draws again.
    pub fn pause(&mut self) {
        if let View::Live(live) = self {
            // Off the screen, so that the prompt is not drawn over; drawn again below it.
            let _ = live.multi.clear();
            live.multi.set_draw_target(ProgressDrawTarget::hidden());
        }
    }

    pub fn resume(&mut self) {
        if let View::Live(live) = self {
            live.multi.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// Leaves the last state on screen and stops drawing.
    pub fn finish(&mut self) {
        if let View::Live(live) = self {
            if let Some(bar) = live.bytes.take() {
                bar.abandon();
            }
            live.step.disable_steady_tick();
            live.step.abandon();
        }
    }
}

impl Live {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let step = multi.add(ProgressBar::new_spinner());
        step.set_style(ProgressStyle::with_template("{spinner:.cyan} {msg}").expect("a valid template"));
        step.enable_steady_tick(Duration::from_millis(120));
        Self { multi, step, bytes: None, runs: Runs::default() }
    }

    fn show(&mut self, p: &pb::ModelLoadProgress) {
        self.step.set_message(format!("{}", style(render::step_line(p)).bold()));
        match self.runs.follow(p) {
            RunChange::Started(label) => {
                if let Some(done) = self.bytes.take() {
                    done.abandon();
                }
                let bar = self.multi.insert_before(&self.step, ProgressBar::new(p.bytes_total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {prefix:8} [{bar:30.green}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("#>."),
                );
                bar.set_prefix(label);
                self.bytes = Some(bar);
            }
            RunChange::Same => {}
        }
        if let Some(bar) = &self.bytes
            && p.bytes_total > 0
            && !bar.is_finished()
        {
            bar.set_position(p.bytes_done);
            if p.bytes_done >= p.bytes_total {
                // Frozen as it ended, with the run's average rate (indicatif's is a recent
                // estimate, which decays while later steps go on).
                let seconds = bar.elapsed().as_secs_f64().max(1e-3);
                // Display only: a rate to three digits.
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let rate = (p.bytes_total as f64 / seconds) as u64;
                bar.set_style(
                    ProgressStyle::with_template("  {prefix:8} [{bar:30.green}] {bytes}/{total_bytes} {msg}")
                        .expect("a valid template")
                        .progress_chars("#>."),
                );
                bar.abandon_with_message(format!("{}/s in {:.2}s", render::size(rate), seconds));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(step: u32, detail: &str, done: u64, total: u64) -> pb::ModelLoadProgress {
        pb::ModelLoadProgress {
            step,
            total: 8,
            detail: detail.into(),
            bytes_done: done,
            bytes_total: total,
            ..Default::default()
        }
    }

    /// After a cache miss, step 4's first byte run is the download and the next the read; a
    /// model found on disk has only a read.
    #[test]
    fn runs_tell_the_download_from_the_read() {
        let mut runs = Runs::default();
        assert_eq!(runs.follow(&msg(2, "cache miss: 3 files, 900 bytes to download", 0, 0)), RunChange::Same);
        assert_eq!(runs.follow(&msg(4, "a", 0, 900)), RunChange::Started("download"));
        assert_eq!(runs.follow(&msg(4, "a", 450, 900)), RunChange::Same);
        assert_eq!(runs.follow(&msg(4, "b", 900, 900)), RunChange::Same);
        assert_eq!(runs.follow(&msg(4, "a", 0, 800)), RunChange::Started("read"));
        assert_eq!(runs.follow(&msg(4, "a", 800, 800)), RunChange::Same);
        assert_eq!(runs.follow(&msg(5, "", 0, 0)), RunChange::Same);

        let mut local = Runs::default();
        local.follow(&msg(2, "found in the model root: demo", 0, 0));
        assert_eq!(local.follow(&msg(4, "x", 10, 800)), RunChange::Started("read"));
        // The same total again from 0 is a new run, not a step back.
        assert_eq!(local.follow(&msg(4, "x", 0, 800)), RunChange::Started("read"));
    }
}
