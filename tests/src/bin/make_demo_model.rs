//! Regenerates the bundled demo model: `cargo run -p tests --bin make-demo-model [DIR]`
//! (default `models/demo/tiny-sd`). The output is deterministic, byte for byte.

fn main() -> anyhow::Result<()> {
    let dir =
        std::env::args().nth(1).map_or_else(|| tests::fixture::repo_models_dir().join("demo/tiny-sd"), Into::into);
    let expected = tests::fixture::demo_tiny_sd(&dir)?;
    println!("wrote {} tensors, {} bytes, to {}", expected.tensors.len(), expected.bytes(), dir.display());
    Ok(())
}
