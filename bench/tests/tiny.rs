//! The benchmark harness at tiny sizes, so it cannot rot: it runs end to end (fixtures, every
//! loader, the real server binary, the Python peer, cancel, fan-out, memory, attach, the report
//! and the charts), and its correctness check holds: every loader read exactly the tensors in the files.

use std::path::Path;

use bench::{Options, report};
use clap::Parser;

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_at_tiny_sizes_and_every_loader_agrees() {
    let work = tempfile::tempdir().expect("temp dir");
    let out = work.path().join("out");
    let options = Options::parse_from([
        "model-loader-bench",
        "--dense-mib=256",
        "--shards=2",
        "--per-shard=3",
        "--small-tensors=40",
        "--runs=1",
        "--cancel-tries=3",
        "--watchers=30",
        "--fanout-loads=1",
        "--cycles=2",
        "--starts=1",
        &format!("--work={}", work.path().join("work").display()),
        &format!("--out={}", out.display()),
    ]);
    let report = bench::run(&options).await.expect("the benchmark runs");

    // Seven loaders on each of the two models, each checked against the files.
    assert_eq!(report.loaders.len(), 2 * report::LOADERS.len(), "{:#?}", report.loaders);
    assert!(report.loaders.iter().all(|r| r.seconds.len() == 1 && r.gb_per_s > 0.0), "{:#?}", report.loaders);
    // Five loaders on each model (the two limits are not loaders), and what Python attached to.
    assert_eq!(report.checks.len(), 2 * 5 + 1, "{:#?}", report.checks);
    assert!(report.checks.iter().all(|c| c.same_tensors), "{:#?}", report.checks);
    assert_eq!(report.models[1].tensors, 40);

    assert_eq!(report.cancel.tries, 3);
    assert!(report.cancel.released_ms.iter().zip(&report.cancel.stream_end_ms).all(|(r, e)| *r > 0.0 && *e > 0.0));
    assert!(report.fanout.all_received, "{:?}", report.fanout);
    assert_eq!(report.fanout.samples, 30 * 8);
    assert_eq!(report.memory.after_unload_rss_bytes.len(), 2);
    assert!(report.memory.idle_rss_bytes > 0 && report.memory.start_to_serving_ms_median > 0.0);
    let attach = &report.attach;
    assert_eq!((attach.anonymous_s.len(), attach.ready_s.len(), attach.attach_s.len()), (1, 1, 1), "{attach:?}");
    assert!(attach.ready_ratio > 0.0 && attach.speedup > 0.0 && !attach.fastest_reload.is_empty(), "{attach:?}");

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    assert_eq!(results["loaders"].as_array().map(Vec::len), Some(14));
    assert!(results["targets"].as_array().is_some_and(|t| t.len() >= 12));
    let table = std::fs::read_to_string(out.join("README.md")).expect("README.md");
    for loader in report::LOADERS {
        assert!(table.contains(&format!("| {loader} |")), "{loader} is in the table:\n{table}");
    }
    assert!(table.contains("## Attach: `dense`"), "{table}");
    assert!(is_png(&out.join("throughput.png")) && is_png(&out.join("fanout.png")));
}

/// The GPU mode runs only on a GPU machine; its report is drawn in every build: the committed
/// run's results redraw into the same table, with every target evaluated.
#[test]
fn the_committed_gpu_run_redraws() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks/gpu");
    let out = tempfile::tempdir().expect("temp dir");
    std::fs::copy(committed.join("results.json"), out.path().join("results.json")).expect("results.json");
    let report: bench::gpu_report::GpuReport =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).expect("read")).expect("parse");
    bench::gpu_report::write(out.path(), &report).expect("write");
    let redrawn = std::fs::read_to_string(out.path().join("README.md")).expect("README.md");
    assert_eq!(redrawn, std::fs::read_to_string(committed.join("README.md")).expect("committed README.md"));
    assert_eq!(report.targets.len(), 9);
    assert!(is_png(&out.path().join("throughput.png")));
}
