//! Fan-out: many WatchModels streams on one load. Each watcher notes when it received the first
//! message of every step; the server's JSON log notes when it emitted the step (the step line is
//! logged right before the message is handed to the subscribers), so delivery latency is receipt
//! minus emit, on one machine's clock.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, anyhow, bail};
use fixtures::binary::Binary;
use proto::v1::{self as pb, model_event::Event, model_loader_client::ModelLoaderClient};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::server;

/// Streams per HTTP/2 connection: watchers are many clients, each with a few streams, as a UI's
/// browsers would be; one connection would hit the server's limit of concurrent streams.
pub const STREAMS_PER_CONNECTION: usize = 20;

/// What one round of fan-out saw.
#[derive(Debug, Default)]
pub struct Round {
    pub watchers: usize,
    /// Watchers that received all 8 steps.
    pub complete: usize,
    /// Receipt minus emit of every (watcher, step), in milliseconds.
    pub latencies_ms: Vec<f64>,
}

/// Opens `watchers` WatchModels streams on `id`, loads it once, and collects what they saw; then
/// unloads it. The server must log JSON (`--log-format json`).
pub async fn round(server: &Binary, id: &str, watchers: usize) -> anyhow::Result<Round> {
    let connections = watchers.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(Channel::from_shared(format!("http://{}", server.addr))?.connect().await?);
    }
    let subscribed = Arc::new(AtomicUsize::new(0));
    let all_subscribed = Arc::new(Notify::new());
    let mut tasks = Vec::with_capacity(watchers);
    for i in 0..watchers {
        let mut client = ModelLoaderClient::new(channels[i / STREAMS_PER_CONNECTION].clone());
        let (subscribed, all_subscribed, id) = (subscribed.clone(), all_subscribed.clone(), id.to_owned());
        tasks.push(tokio::spawn(async move {
            let request = pb::WatchModelsRequest { model_id: id };
            let response = client.watch_models(request).await;
            // The server subscribed before it answered: from here on this watcher misses nothing.
            if subscribed.fetch_add(1, Ordering::AcqRel) + 1 == watchers {
                all_subscribed.notify_one();
            }
            let mut stream = response?.into_inner();
            let mut received = [None::<SystemTime>; 8];
            while let Some(event) = stream.next().await {
                if let Some(Event::Progress(p)) = event?.event
                    && (1..=8).contains(&p.step)
                {
                    received[p.step as usize - 1].get_or_insert_with(SystemTime::now);
                    if p.step == 8 {
                        break;
                    }
                }
            }
            Ok::<_, tonic::Status>(received)
        }));
    }
    let waiting = all_subscribed.notified();
    if subscribed.load(Ordering::Acquire) < watchers {
        tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .map_err(|_| anyhow!("only {} of {watchers} watchers subscribed", subscribed.load(Ordering::Acquire)))?;
    }

    let log_mark = server.log().len();
    let client = client::Client::from_channel(channels[0].clone());
    server::load(&client, id).await?;
    let mut round = Round { watchers, ..Round::default() };
    let mut seen = Vec::with_capacity(watchers);
    for task in tasks {
        // A watcher that does not see step 8 within a minute counts as incomplete.
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Ok(received))) => seen.push(received),
            Ok(Ok(Err(status))) => bail!("a watcher's stream failed: {status}"),
            Ok(Err(join)) => bail!("a watcher panicked: {join}"),
            Err(_) => seen.push([None; 8]),
        }
    }
    let emitted = emit_times(&server.log()[log_mark..], id)?;
    for received in &seen {
        if received.iter().all(Option::is_some) {
            round.complete += 1;
        }
        for (step, at) in received.iter().enumerate() {
            if let Some(at) = at {
                let latency = match at.duration_since(emitted[step]) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                round.latencies_ms.push(latency * 1e3);
            }
        }
    }
    server::unload(&client, id).await?;
    Ok(round)
}

/// When the server logged each step of `id`'s load (the first time, in `lines`).
fn emit_times(lines: &[String], id: &str) -> anyhow::Result<[SystemTime; 8]> {
    let mut emitted = [None; 8];
    for line in lines {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(message) = record["message"].as_str() else { continue };
        let Some(step) = message
            .strip_prefix(id)
            .and_then(|rest| rest.trim_start().strip_prefix("step="))
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=8).contains(n))
        else {
            continue;
        };
        let at = record["timestamp"].as_str().context("a log record without a timestamp")?;
        let at = humantime::parse_rfc3339(at).with_context(|| format!("the log timestamp {at:?}"))?;
        emitted[step - 1].get_or_insert(at);
    }
    let mut out = [SystemTime::UNIX_EPOCH; 8];
    for (step, at) in emitted.into_iter().enumerate() {
        out[step] = at.ok_or_else(|| anyhow!("the server logged no step {} of {id}", step + 1))?;
    }
    Ok(out)
}
