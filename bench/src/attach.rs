//! Attach on the CPU: loads ready for attach (local files loaded as stored are mapped as they
//! are) against loads into anonymous memory, run by run in the same rounds on two servers, and the time from `attach()` to usable
//! tensors in a Python process (clients/python), whose tensors are checked against the files.

use std::{collections::HashMap, path::Path, process::Command};

use anyhow::Context;
use serde::Deserialize;
use tests::fixture::Expected;

use crate::{models::Model, peers::json_of, server, stats::median};

/// What the attach section measured.
pub struct AttachRuns {
    /// LoadModel into anonymous memory (no attach socket), seconds.
    pub anonymous_s: Vec<f64>,
    /// LoadModel ready for attach (with the attach socket: local files are mapped), seconds.
    pub ready_s: Vec<f64>,
    /// `attach()` to a dict of numpy views, seconds.
    pub attach_s: Vec<f64>,
    /// What the Python client mapped.
    pub tensors: Expected,
}

/// What the attach script prints.
#[derive(Debug, Deserialize)]
struct AttachPeer {
    seconds: Vec<f64>,
    tensors: HashMap<String, (String, Vec<u64>, String)>,
}

/// Runs the attach section on `model` (its files warm): `runs` rounds of one load on each server,
/// then `runs` attaches to the model loaded for attach.
pub async fn run(
    exe: &Path,
    root: &Path,
    work: &Path,
    script: &Path,
    model: &Model,
    runs: usize,
) -> anyhow::Result<AttachRuns> {
    let socket = std::path::absolute(work.join("attach.sock"))?;
    let plain = server::start(exe, root, &[]).await;
    let exportable = server::start(exe, root, &["--attach-socket", socket.to_str().context("a UTF-8 path")?]).await;
    let (mut to_plain, mut to_exportable) = (tests::connect(plain.addr).await, tests::connect(exportable.addr).await);
    let (mut anonymous_s, mut ready_s) = (Vec::new(), Vec::new());
    for round in 0..runs {
        // Alternate which goes first, so neither always follows the other's unload.
        for k in 0..2 {
            let (client, times) = if (k + round) % 2 == 0 {
                (&mut to_plain, &mut anonymous_s)
            } else {
                (&mut to_exportable, &mut ready_s)
            };
            times.push(server::load(client, &model.id).await?.total.as_secs_f64());
            server::unload(client, &model.id).await?;
        }
    }
    drop(plain);
    server::load(&mut to_exportable, &model.id).await?;
    let peer: AttachPeer = json_of(
        Command::new("python3").arg(script).arg("--runs").arg(runs.to_string()).arg(&socket).arg(&model.id),
        "the attach script",
    )
    .context("(`pip install ./clients/python` installs what it needs)")?;
    server::unload(&mut to_exportable, &model.id).await?;
    Ok(AttachRuns {
        anonymous_s,
        ready_s,
        attach_s: peer.seconds,
        tensors: Expected::observed(peer.tensors.into_iter().collect()),
    })
}

/// The attach section of the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Attach {
    pub model: String,
    pub bytes: u64,
    pub anonymous_s: Vec<f64>,
    pub ready_s: Vec<f64>,
    pub attach_s: Vec<f64>,
    pub anonymous_s_median: f64,
    pub ready_s_median: f64,
    pub attach_ms_median: f64,
    /// Speed of a load ready for attach over a load into anonymous memory.
    pub ready_ratio: f64,
    /// The peer whose warm load of the same files was fastest in this run, and its median.
    pub fastest_reload: String,
    pub fastest_reload_s: f64,
    /// That reload's time over attach's.
    pub speedup: f64,
}

impl Attach {
    /// From the runs, against the peers' `(name, median seconds)` on the same model.
    pub fn from_runs(model: &Model, runs: &AttachRuns, peers: &[(&str, f64)]) -> Self {
        let (anonymous_s_median, ready_s_median) = (median(&runs.anonymous_s), median(&runs.ready_s));
        let attach_s_median = median(&runs.attach_s);
        let fastest = peers.iter().filter(|(_, s)| *s > 0.0).min_by(|a, b| a.1.total_cmp(&b.1));
        let (fastest_reload, fastest_reload_s) = fastest.map_or((String::new(), 0.0), |(n, s)| ((*n).to_owned(), *s));
        Self {
            model: model.id.clone(),
            bytes: model.bytes,
            anonymous_s: runs.anonymous_s.clone(),
            ready_s: runs.ready_s.clone(),
            attach_s: runs.attach_s.clone(),
            anonymous_s_median,
            ready_s_median,
            attach_ms_median: attach_s_median * 1e3,
            ready_ratio: if ready_s_median > 0.0 { anonymous_s_median / ready_s_median } else { 0.0 },
            speedup: if attach_s_median > 0.0 { fastest_reload_s / attach_s_median } else { 0.0 },
            fastest_reload,
            fastest_reload_s,
        }
    }

    /// Its section of the Markdown page.
    pub fn markdown(&self) -> String {
        let gbps = |s: f64| if s > 0.0 { self.bytes as f64 / s / 1e9 } else { 0.0 };
        let mut md = format!(
            "## Attach: `{}` ({:.2} GB) from another process\n\n| figure | median | |\n|---|---:|---:|\n",
            self.model,
            self.bytes as f64 / 1e9
        );
        md += &format!(
            "| LoadModel into anonymous memory (no attach socket) | {:.3} s | {:.2} GB/s |\n",
            self.anonymous_s_median,
            gbps(self.anonymous_s_median)
        );
        md += &format!(
            "| LoadModel ready for attach (local files as stored: mapped, nothing read) | {:.3} s | {:.2} GB/s ({:.2}×) |\n",
            self.ready_s_median,
            gbps(self.ready_s_median),
            self.ready_ratio
        );
        md += &format!(
            "| `attach()` to usable numpy tensors (Python client) | {:.2} ms | {:.0}× faster than {} ({:.3} s) |\n\n",
            self.attach_ms_median, self.speedup, self.fastest_reload, self.fastest_reload_s
        );
        md
    }
}
