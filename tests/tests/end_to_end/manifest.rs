//! The workspace's manifests say true things: the declared `rust-version` builds every locked
//! dependency, and the Dockerfile builds with that version.

use std::{path::Path, process::Command};

use serde_json::Value;

/// A `rust-version` as numbers, `"1.95"` → `[1, 95, 0]`.
fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> =
        text.split('.').map(|p| p.parse().unwrap_or_else(|_| panic!("a rust-version: {text:?}"))).collect();
    parts.resize(3, 0);
    parts
}

/// `rust-version` in Cargo.toml is at least the highest `rust-version` of the locked dependencies
/// (with every feature, the `cuda` build's too), as `cargo metadata` reads them, and the Dockerfile's
/// `RUST_VERSION` is the same version.
#[test]
fn declared_rust_version_builds_the_locked_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--all-features"])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let members: Vec<&str> =
        metadata["workspace_members"].as_array().expect("members").iter().filter_map(Value::as_str).collect();
    let packages = metadata["packages"].as_array().expect("packages");
    let rust_version = |p: &Value| p["rust_version"].as_str().map(version);

    let declared: Vec<Vec<u64>> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .map(|p| rust_version(p).unwrap_or_else(|| panic!("{} declares no rust-version", p["name"])))
        .collect();
    let ours = declared.first().expect("workspace members").clone();
    assert!(declared.iter().all(|v| *v == ours), "every member inherits one rust-version: {declared:?}");

    let (needed, by) = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| !members.contains(&id)))
        .filter_map(|p| {
            Some((
                rust_version(p)?,
                format!("{} {}", p["name"].as_str().unwrap_or("?"), p["version"].as_str().unwrap_or("?")),
            ))
        })
        .max()
        .expect("dependencies with a rust-version");
    assert!(ours >= needed, "rust-version {ours:?} is below {needed:?}, which {by} needs");

    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let arg = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("the Dockerfile sets ARG RUST_VERSION=");
    assert_eq!(version(arg.trim()), ours, "the Dockerfile's RUST_VERSION is the declared rust-version");
}
