//! Generates the tonic/prost code, its serde impls (the canonical JSON mapping) and the descriptor
//! set (for reflection) from the workspace proto.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("modelloader/v1/model_loader.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    // A vendored protoc, so building needs no system protobuf compiler.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let descriptor = PathBuf::from(env::var("OUT_DIR")?).join("model_loader_descriptor.bin");
    // Our codec: a request that does not decode is the caller's fault (see `codec` in src/lib.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::RequestCodec")
        .file_descriptor_set_path(&descriptor)
        .compile_with_config(config, &[file], std::slice::from_ref(&root))?;
    // serde impls in the proto's canonical JSON mapping (as grpcurl prints), from the same
    // descriptors: a hand-written mapping would drift from the proto.
    pbjson_build::Builder::new().register_descriptors(&std::fs::read(&descriptor)?)?.build(&[".modelloader.v1"])?;

    // Triton's v2 protocol (package `inference`, vendored unchanged under proto/triton): the
    // methods the server does not answer are UNIMPLEMENTED by default.
    let triton = root.join("triton");
    let service = triton.join("grpc_service.proto");
    for file in [&service, &triton.join("model_config.proto")] {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .codec_path("crate::codec::RequestCodec")
        .generate_default_stubs(true)
        .file_descriptor_set_path(PathBuf::from(env::var("OUT_DIR")?).join("inference_descriptor.bin"))
        .compile_with_config(config, &[service], &[triton])?;
    Ok(())
}
