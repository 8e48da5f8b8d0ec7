//! Attach on the CPU: loads ready for attach against loads into anonymous memory, run by run in
//! the same rounds on two servers: files that can change are read into a sealed memfd, and the
//! same files made immutable (`chattr +i`, where the filesystem allows) are mapped as they are.
//! Then the time from `attach()` to usable tensors in a Python process (clients/python), whose
//! tensors are checked against the files.

use std::{collections::HashMap, path::Path, process::Command};

use anyhow::Context;
use fixtures::fixture::Expected;
use serde::Deserialize;

use crate::{models::Model, peers::json_of, server, stats::median};

/// What the attach section measured.
pub struct AttachRuns {
    /// LoadModel into anonymous memory (no attach socket), seconds.
    pub anonymous_s: Vec<f64>,
    /// LoadModel ready for attach (with the attach socket: files that can change are read into a
    /// sealed memfd), seconds.
    pub ready_s: Vec<f64>,
    /// LoadModel ready for attach of the same files made immutable (mapped, nothing read),
    /// seconds; empty where the filesystem refuses the attribute.
    pub mapped_s: Vec<f64>,
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
    let (to_plain, to_exportable) = (server::connect(plain.addr).await?, server::connect(exportable.addr).await?);
    let (mut anonymous_s, mut ready_s, mut mapped_s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs {
        // Alternate which goes first, so neither always follows the other's unload.
        for k in 0..2 {
            let (client, times) =
                if (k + round) % 2 == 0 { (&to_plain, &mut anonymous_s) } else { (&to_exportable, &mut ready_s) };
            times.push(server::load(client, &model.id).await?.total.as_secs_f64());
            server::unload(client, &model.id).await?;
        }
        if !immutable(&model.files, true) {
            continue;
        }
        let mapped = server::load(&to_exportable, &model.id).await;
        let unloaded = server::unload(&to_exportable, &model.id).await;
        immutable(&model.files, false);
        mapped_s.push(mapped?.total.as_secs_f64());
        unloaded?;
    }
    drop(plain);
    server::load(&to_exportable, &model.id).await?;
    let peer: AttachPeer = json_of(
        Command::new("python3").arg(script).arg("--runs").arg(runs.to_string()).arg(&socket).arg(&model.id),
        "the attach script",
    )
    .context("(`pip install ./clients/python` installs what it needs)")?;
    server::unload(&to_exportable, &model.id).await?;
    Ok(AttachRuns {
        anonymous_s,
        ready_s,
        mapped_s,
        attach_s: peer.seconds,
        tensors: Expected::observed(peer.tensors.into_iter().collect()),
    })
}

/// Sets (`on`) or lifts the immutable attribute of `files` with `chattr`; false, said once on
/// stderr, where it cannot.
fn immutable(files: &[std::path::PathBuf], on: bool) -> bool {
    let flag = if on { "+i" } else { "-i" };
    match Command::new("chattr").arg(flag).args(files).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("[bench] chattr {flag}: {}", String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("[bench] chattr {flag}: {e}");
            false
        }
    }
}

/// The attach section of the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Attach {
    pub model: String,
    pub bytes: u64,
    pub anonymous_s: Vec<f64>,
    pub ready_s: Vec<f64>,
    pub mapped_s: Vec<f64>,
    pub attach_s: Vec<f64>,
    pub anonymous_s_median: f64,
    pub ready_s_median: f64,
    /// 0 where no immutable file could be mapped.
    pub mapped_s_median: f64,
    pub attach_ms_median: f64,
    /// Speed of a load ready for attach (a memfd) over a load into anonymous memory.
    pub ready_ratio: f64,
    /// Speed of a load of immutable files ready for attach (mapped) over a load into anonymous
    /// memory.
    pub mapped_ratio: f64,
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
        let mapped_s_median = if runs.mapped_s.is_empty() { 0.0 } else { median(&runs.mapped_s) };
        let over = |s: f64| if s > 0.0 { anonymous_s_median / s } else { 0.0 };
        let attach_s_median = median(&runs.attach_s);
        let fastest = peers.iter().filter(|(_, s)| *s > 0.0).min_by(|a, b| a.1.total_cmp(&b.1));
        let (fastest_reload, fastest_reload_s) = fastest.map_or((String::new(), 0.0), |(n, s)| ((*n).to_owned(), *s));
        Self {
            model: model.id.clone(),
            bytes: model.bytes,
            anonymous_s: runs.anonymous_s.clone(),
            ready_s: runs.ready_s.clone(),
            mapped_s: runs.mapped_s.clone(),
            attach_s: runs.attach_s.clone(),
            anonymous_s_median,
            ready_s_median,
            mapped_s_median,
            attach_ms_median: attach_s_median * 1e3,
            ready_ratio: over(ready_s_median),
            mapped_ratio: over(mapped_s_median),
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
            "| LoadModel ready for attach: read into a sealed memfd (files that can change) | {:.3} s | {:.2} GB/s ({:.2}×) |\n",
            self.ready_s_median,
            gbps(self.ready_s_median),
            self.ready_ratio
        );
        if self.mapped_s_median > 0.0 {
            md += &format!(
                "| LoadModel ready for attach: immutable files mapped, nothing read | {:.3} s | {:.2} GB/s ({:.2}×) |\n",
                self.mapped_s_median,
                gbps(self.mapped_s_median),
                self.mapped_ratio
            );
        } else {
            md += "| LoadModel ready for attach: immutable files mapped | not measured: `chattr +i` refused | |\n";
        }
        let against = match self.fastest_reload.as_str() {
            "" => "no peer ran".to_owned(),
            peer => format!("{:.0}× faster than {peer} ({:.3} s)", self.speedup, self.fastest_reload_s),
        };
        md += &format!(
            "| `attach()` to usable numpy tensors (Python client) | {:.2} ms | {against} |\n\n",
            self.attach_ms_median
        );
        md
    }
}
