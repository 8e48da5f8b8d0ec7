//! The tests' local Hugging Face Hub as a process, for suites outside Rust (the dashboard's
//! browser tests): `test-hub [--slow BYTES_PER_SEC] ID=DIR...` serves each folder as the repo
//! `ID`, prints its URL (what `HF_ENDPOINT` is set to) on the first line of stdout, and runs until
//! killed. With `--slow`, every weights file streams at that rate, so a load stays in step 4 long
//! enough to be watched and cancelled whatever the machine's disk.

use anyhow::{Context, bail};
use tests::hub::{Fault, HubRepo, TestHub};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut slow, mut repos) = (None, Vec::new());
    while let Some(arg) = args.next() {
        if arg == "--slow" {
            let rate = args.next().context("--slow needs bytes per second")?;
            slow = Some(rate.parse::<u64>().with_context(|| format!("--slow {rate}"))?);
        } else if let Some((id, dir)) = arg.split_once('=') {
            repos.push(HubRepo::from_dir(id, dir.as_ref()).with_context(|| format!("repo {id} from {dir}"))?);
        } else {
            bail!("usage: test-hub [--slow BYTES_PER_SEC] ID=DIR...");
        }
    }
    let weights: Vec<(String, String)> = repos
        .iter()
        .flat_map(|r| {
            let id = r.id.clone();
            r.files().keys().filter(|f| f.ends_with(".safetensors")).map(move |f| (id.clone(), f.clone()))
        })
        .collect();
    let hub = TestHub::start(repos).await;
    if let Some(bytes_per_sec) = slow {
        for (repo, file) in &weights {
            hub.set_fault(repo, file, Fault::Slow { bytes_per_sec });
        }
    }
    println!("{}", hub.url());
    std::future::pending::<()>().await;
    Ok(())
}
