//! End-to-end tests: the real `model-loader` binary driven by the real grpcurl, Python clients,
//! curl speaking gRPC-web, the deployment check, and real object stores (SeaweedFS, Azurite,
//! WebDAV): one module per area, one binary. `just test` builds the binaries they start first.

mod attach_bad_input;
mod attach_files;
mod attach_python;
mod cli;
mod deploy;
mod e2e;
mod grafana;
mod hub_protocol;
mod hub_python;
mod manifest;
mod model_files;
mod object_store;
mod ops;
mod security;
mod shutdown;
mod traces;
mod web;

/// A model root with one small model, `small`.
fn small_model_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("root");
    tests::fixture::single_file_model(&root.path().join("small"), &tests::fixture::f32_tensors("w", 2, 64))
        .expect("fixture");
    root
}

/// A path as a command-line argument.
fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
