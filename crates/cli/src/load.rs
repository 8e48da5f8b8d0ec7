//! `load`: follow one load to its end, drawing its steps and bytes. Ctrl-C asks whether to cancel
//! the load or leave it running (a load never depends on its caller); a second Ctrl-C leaves.

use std::io::Write as _;

use client::{Client, LoadRequest, LoadUpdate};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::{exit, progress::View, terminal::Output};

/// What the person answered at the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Cancel,
    Leave,
    Unclear,
}

impl Answer {
    fn parse(line: &str) -> Self {
        match line.trim().to_lowercase().as_str() {
            "c" | "cancel" => Answer::Cancel,
            "l" | "leave" => Answer::Leave,
            _ => Answer::Unclear,
        }
    }
}

const PROMPT: &str = "cancel the load (c) or leave it running (l)? ";

/// Where the command is after a Ctrl-C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Following,
    Asking,
    Cancelling,
}

/// Runs `load` and returns the exit code.
pub async fn run(client: &Client, request: LoadRequest, output: Output) -> Result<u8, client::Error> {
    let model_id = request.model_id.clone();
    let mut interrupts = interrupts();
    let mut stream = client.load(request).await?;
    let mut view = View::new(output);
    let mut phase = Phase::Following;
    let mut answers: Option<mpsc::Receiver<Option<String>>> = None;
    loop {
        tokio::select! {
            update = stream.next() => match update {
                Some(LoadUpdate::Progress(progress)) => view.show(progress.raw()),
                Some(LoadUpdate::Finished(result)) => {
                    view.finish();
                    return finished(&model_id, result, phase, output);
                }
                None => {
                    view.finish();
                    return Err(client::Error::from(tonic::Status::unknown("the load's stream ended without an outcome")));
                }
            },
            _ = interrupts.recv() => {
                if phase != Phase::Following {
                    view.finish();
                    eprintln!("\nleft: the load of {model_id} goes on");
                    return Ok(exit::INTERRUPTED);
                }
                view.pause();
                eprint!("\n{PROMPT}");
                let _ = std::io::stderr().flush();
                answers = Some(read_answers());
                phase = Phase::Asking;
            }
            line = next_answer(&mut answers) => match line.as_deref().map(Answer::parse) {
                Some(Answer::Cancel) => {
                    answers = None;
                    phase = Phase::Cancelling;
                    let was_loading = client.cancel(&model_id).await?;
                    eprintln!("cancelling the load of {model_id}{}", if was_loading { "" } else { " (it had ended)" });
                    view.resume();
                }
                Some(Answer::Unclear) => {
                    eprint!("{PROMPT}");
                    let _ = std::io::stderr().flush();
                }
                Some(Answer::Leave) | None => {
                    view.finish();
                    eprintln!("left running: follow it with `model-loader watch {model_id}`");
                    return Ok(exit::INTERRUPTED);
                }
            },
        }
    }
}

/// The exit code and the last line of a load that ended.
fn finished(
    model_id: &str,
    result: Result<(), client::Error>,
    phase: Phase,
    output: Output,
) -> Result<u8, client::Error> {
    match result {
        Ok(()) => {
            if output != Output::Json {
                say!("{model_id}: LOADED");
            }
            Ok(exit::OK)
        }
        Err(e) if e.code() == tonic::Code::Cancelled && phase == Phase::Cancelling => {
            if output != Output::Json {
                say!("{model_id}: CANCELLED ({})", e.message());
            }
            Ok(exit::CANCELLED)
        }
        Err(e) => Err(e),
    }
}

/// Ctrl-C (SIGINT) from now on, one stream for the whole command so that none is missed
/// between two waits.
pub(crate) fn interrupts() -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT can be handled")
}

/// Reads answers from stdin on a thread of its own (a read of a terminal cannot be given up; the
/// process ends with it); `None` at the end of input.
fn read_answers() -> mpsc::Receiver<Option<String>> {
    let (send, receive) = mpsc::channel(1);
    std::thread::spawn(move || {
        loop {
            let mut line = String::new();
            let read = std::io::stdin().read_line(&mut line);
            let end = !matches!(read, Ok(n) if n > 0);
            if send.blocking_send((!end).then_some(line)).is_err() || end {
                return;
            }
        }
    });
    receive
}

/// The next answer, or never while no question is asked.
async fn next_answer(answers: &mut Option<mpsc::Receiver<Option<String>>>) -> Option<String> {
    match answers {
        Some(receiver) => receiver.recv().await.flatten(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prompt takes `c`/`cancel` and `l`/`leave`, in any case, and asks again otherwise.
    #[test]
    fn answers() {
        assert_eq!(Answer::parse("c\n"), Answer::Cancel);
        assert_eq!(Answer::parse(" Cancel "), Answer::Cancel);
        assert_eq!(Answer::parse("l\n"), Answer::Leave);
        assert_eq!(Answer::parse("LEAVE"), Answer::Leave);
        assert_eq!(Answer::parse("x"), Answer::Unclear);
        assert_eq!(Answer::parse(""), Answer::Unclear);
    }
}
