//! `watch [ID]`: every status change and progress message, live. On a terminal the table of
//! models is redrawn in place; otherwise one plain line per change.

use std::{collections::BTreeMap, io::Write as _, time::Duration};

use client::{Client, WatchEvent, pb};
use futures::StreamExt as _;

use crate::{exit, render, terminal::Output};

/// At most this many redraws a second on a terminal: progress comes ~20 times a second a load.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// Runs `watch` until Ctrl-C (130) or the server ends the stream.
pub async fn run(client: &Client, model_id: Option<&str>, output: Output) -> Result<u8, client::Error> {
    let mut interrupts = crate::load::interrupts();
    let mut stream = client.watch(model_id).await?;
    let mut models: BTreeMap<String, pb::ModelStatus> = BTreeMap::new();
    let mut plain: BTreeMap<String, (u32, String)> = BTreeMap::new();
    let mut screen = Screen::default();
    let mut tick = tokio::time::interval(REDRAW_EVERY);
    let mut dirty = false;
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(event)) => {
                    match output {
                        Output::Json => crate::print_json(&to_proto(&event)),
                        Output::Plain => plain_line(&event, &mut plain),
                        Output::Live => dirty = true,
                    }
                    apply(&mut models, event);
                }
                Some(Err(e)) => return Err(e),
                None => {
                    if output == Output::Live {
                        screen.draw(&models, client.server());
                    }
                    eprintln!("the server ended the watch");
                    return Ok(exit::UNAVAILABLE);
                }
            },
            _ = tick.tick(), if dirty => {
                screen.draw(&models, client.server());
                dirty = false;
            }
            _ = interrupts.recv() => {
                if dirty {
                    screen.draw(&models, client.server());
                }
                return Ok(exit::INTERRUPTED);
            }
        }
    }
}

/// The event as the stream's message, for `--json`.
fn to_proto(event: &WatchEvent) -> pb::ModelEvent {
    let event = match event {
        WatchEvent::Status(status) => pb::model_event::Event::Status(status.clone()),
        WatchEvent::Progress(progress) => pb::model_event::Event::Progress(progress.raw().clone()),
    };
    pb::ModelEvent { event: Some(event) }
}

/// Keeps the latest status of each model, with its latest progress.
fn apply(models: &mut BTreeMap<String, pb::ModelStatus>, event: WatchEvent) {
    match event {
        WatchEvent::Status(status) => {
            models.insert(status.model_id.clone(), status);
        }
        WatchEvent::Progress(progress) => {
            let raw = progress.raw().clone();
            let status = models.entry(raw.model_id.clone()).or_insert_with(|| pb::ModelStatus {
                model_id: raw.model_id.clone(),
                state: pb::ModelState::Loading.into(),
                ..Default::default()
            });
            status.last_progress = Some(raw);
        }
    }
}

/// One line per status and per new step or detail (not per byte message).
fn plain_line(event: &WatchEvent, last: &mut BTreeMap<String, (u32, String)>) {
    match event {
        WatchEvent::Status(m) => {
            let mut line = format!("{} {}", m.model_id, render::state(m));
            for field in [&m.device, &m.dtype] {
                if !field.is_empty() {
                    line.push(' ');
                    line.push_str(field);
                }
            }
            if m.weight_bytes > 0 {
                line.push_str(&format!(" {}", render::size(m.weight_bytes)));
            }
            if !m.error.is_empty() {
                line.push_str(&format!(": {} [{}]", m.error, m.error_kind));
            }
            say!("{line}");
        }
        WatchEvent::Progress(progress) => {
            let p = progress.raw();
            let key = (p.step, p.detail.clone());
            let done = p.bytes_total > 0 && p.bytes_done == p.bytes_total;
            if last.get(&p.model_id) != Some(&key) || done {
                say!("{} {}{}", p.model_id, render::step_line(p), if done { " [bytes done]" } else { "" });
                last.insert(p.model_id.clone(), key);
            }
        }
    }
}

/// The lines drawn last, to draw over them.
#[derive(Default)]
struct Screen {
    lines: usize,
}

impl Screen {
    fn draw(&mut self, models: &BTreeMap<String, pb::ModelStatus>, server: &str) {
        let term = console::Term::stdout();
        let _ = term.clear_last_lines(self.lines);
        let shown: Vec<pb::ModelStatus> = models.values().cloned().collect();
        let mut lines = vec![format!("{} (Ctrl-C to stop)", console::style(format!("watching {server}")).bold())];
        lines.extend(render::models(&shown));
        let width = usize::from(term.size().1);
        for line in &lines {
            let _ = term.write_line(&console::truncate_str(line, width.max(20), "…"));
        }
        let _ = std::io::stdout().flush();
        self.lines = lines.len();
    }
}
