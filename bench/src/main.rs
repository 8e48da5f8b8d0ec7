//! `model-loader-bench`: see the `bench` crate. `just bench` builds it in release and runs it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = bench::Options::parse();
    if let Some(dir) = &options.gpu_render {
        let report: bench::gpu_report::GpuReport = serde_json::from_slice(&std::fs::read(dir.join("results.json"))?)?;
        return bench::gpu_report::write(dir, &report);
    }
    if options.adapter {
        println!("{}", bench::adapter_only(&options).await?);
        return Ok(());
    }
    if options.vllm {
        println!("{}", bench::vllm_only(&options).await?);
        return Ok(());
    }
    if options.attach_only {
        println!("{}", bench::attach_only(&options).await?);
        return Ok(());
    }
    let targets = if options.object {
        bench::object::run(&options).await?.targets
    } else if options.gpu || options.gpu_candle_peer || options.gpu_attach || options.gpu_multi {
        gpu(&options).await?
    } else {
        bench::run(&options).await?.targets
    };
    for target in &targets {
        eprintln!(
            "[bench] {:<55} {:>12} (goal {}){}",
            target.name,
            target.measured,
            target.target,
            if target.met { "" } else { "  MISSED" }
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
async fn gpu(options: &bench::Options) -> anyhow::Result<Vec<bench::report::Target>> {
    if options.gpu_candle_peer {
        bench::gpu::candle_peer_main(&options.peer_files, options.gpu_runs)?;
        return Ok(Vec::new());
    }
    if options.gpu_attach {
        bench::gpu_attach::run(options).await?;
        return Ok(Vec::new());
    }
    if options.gpu_multi {
        let report = bench::gpu_multi::run(options).await?;
        let goal = bench::gpu_multi::REPLICA_GOAL;
        let ratio = report.replica_ratio;
        eprintln!("[bench] replicas on {} GPUs: {ratio:.2}× one GPU's load (goal ≤ {goal}×)", report.gpus);
        return Ok(Vec::new());
    }
    Ok(bench::gpu::run(options).await?.targets)
}

#[cfg(not(feature = "cuda"))]
async fn gpu(_: &bench::Options) -> anyhow::Result<Vec<bench::report::Target>> {
    anyhow::bail!("--gpu needs a build with the `cuda` feature: `just build-cuda --bench`")
}
