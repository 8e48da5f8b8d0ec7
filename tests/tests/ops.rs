//! Operations: the real binary's JSON logs, its Prometheus metrics, and readiness with preloads.

use serde_json::Value;
use tests::{binary::Binary, connect, fixture, load, load_all};

/// Starts the real binary on the bundled models with `args`.
async fn start(args: &[&str]) -> Binary {
    let models = fixture::repo_models_dir();
    let root = models.to_str().expect("a UTF-8 path");
    let mut all = vec!["--model-root", root];
    all.extend_from_slice(args);
    Binary::start(&all, &[]).await
}

/// With `--log-format json` every line is one JSON object, and every line of a load carries the
/// model id and the step as top-level fields (the step line stays the message).
#[tokio::test]
async fn json_logs_carry_the_model_and_the_step() {
    let server = start(&["--log-format", "json"]).await;
    let mut client = connect(server.addr).await;
    let (_, end) = load_all(&mut client, load("demo/tiny-sd")).await;
    end.expect("the demo loads");
    // The load's last line is logged before its stream ends.
    let lines = server.log();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let first = records.iter().position(|r| r["message"].as_str().is_some_and(|m| m.contains("step=1/8")));
    let last = records.iter().rposition(|r| r["message"].as_str().is_some_and(|m| m.contains("step=8/8")));
    let (Some(first), Some(last)) = (first, last) else { panic!("no step lines in the log:\n{}", lines.join("\n")) };
    let load_lines = &records[first..=last];
    assert!(load_lines.len() >= 8, "{load_lines:#?}");
    for record in load_lines {
        assert_eq!(record["model_id"], "demo/tiny-sd", "{record}");
        assert!(record["step"].as_u64().is_some_and(|s| (1..=8).contains(&s)), "{record}");
        assert!(record["timestamp"].is_string() && record["level"].is_string(), "{record}");
    }
    for n in 1..=8u64 {
        let line = load_lines
            .iter()
            .find(|r| r["message"].as_str().is_some_and(|m| m.starts_with(&format!("demo/tiny-sd step={n}/8 "))))
            .unwrap_or_else(|| panic!("no step line {n}"));
        assert_eq!(line["step"], n, "{line}");
    }
}
