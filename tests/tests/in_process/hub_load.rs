//! Loading from the Hugging Face Hub (the test hub): downloads with byte progress into the HF
//! cache, cache hits, every hub failure mapped to its code, cancellation and single flight.

use std::path::Path;

use proto::v1 as pb;
use tests::{
    TestServer, config, cpu_resources, end_of, fixture,
    hub::{Fault, HubRepo, HubRequest, TestHub},
    load, load_all, open_load, read_until, state_of,
};
use tonic::Code;

const REPO: &str = "org/sharded";
const SHARDS: [&str; 3] =
    ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"];

/// A sharded fixture repo, served by a fresh test hub, and a server whose HF cache is empty.
async fn setup(tmp: &Path) -> (TestHub, TestServer, fixture::Expected) {
    let expected =
        fixture::sharded_model(&tmp.join("repo"), &fixture::f32_tensors("layers", 6, 64 * 1024), 3).expect("fixture");
    let hub = TestHub::start([HubRepo::from_dir(REPO, &tmp.join("repo")).expect("repo")]).await;
    let mut cfg = config(&tmp.join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    cfg.manager.loader.sources.hub.stall_timeout = std::time::Duration::from_secs(2);
    let server = TestServer::start(cfg).await;
    (hub, server, expected)
}

fn blobs(tmp: &Path) -> Vec<String> {
    let dir = tmp.join("cache/models--org--sharded/blobs");
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names
}

/// The LFS blobs (named by their sha256) whose bytes hash to something else.
fn mismatched_blobs(tmp: &Path) -> Vec<String> {
    let dir = tmp.join("cache/models--org--sharded/blobs");
    blobs(tmp)
        .into_iter()
        .filter(|b| b.len() == 64)
        .filter(|b| &tests::hub::sha256_hex(&std::fs::read(dir.join(b)).expect("blob")) != b)
        .collect()
}

/// A fresh cache: LoadModel downloads the sharded repo with byte progress inside step 4, loads it
/// (source HUB, the commit as revision, checksums equal to the fixture's); after an unload, a
/// second load is a cache hit that GETs no weight file.
#[tokio::test]
async fn downloads_then_hits_the_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, expected) = setup(tmp.path()).await;
    let mut client = server.client().await;

    let (messages, end) = load_all(&mut client, load(REPO)).await;
    end.expect("loads from the hub");
    let steps: Vec<u32> = messages.iter().map(|m| m.step).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]) && steps.first() == Some(&1) && steps.last() == Some(&8));
    assert!(messages.iter().any(|m| m.step == 2 && m.detail.starts_with("cache miss: ")), "{messages:?}");
    let download: Vec<_> =
        messages.iter().filter(|m| m.step == 4 && m.bytes_total > 0 && m.detail.ends_with(".safetensors")).collect();
    assert!(download.len() >= 2, "byte progress during the download: {messages:?}");
    let status = client.get_model(pb::GetModelRequest { model_id: REPO.into() }).await.expect("get").into_inner();
    assert_eq!(status.source(), pb::ModelSource::Hub);
    assert_eq!(status.revision, hub.repo(REPO).commit());
    assert_eq!(tests::checksums(&mut client, REPO).await, expected.tensors);
    for shard in SHARDS {
        assert_eq!(hub.get_count(REPO, shard), 1, "{shard} downloaded once");
    }

    client.unload_model(pb::UnloadModelRequest { model_id: REPO.into(), force: false }).await.expect("unload");
    let (messages, end) = load_all(&mut client, load(REPO)).await;
    end.expect("loads from the cache");
    let commit = hub.repo(REPO).commit().to_owned();
    assert!(messages.iter().any(|m| m.detail == format!("cache hit: snapshot {commit}")), "{messages:?}");
    for shard in SHARDS {
        assert_eq!(hub.get_count(REPO, shard), 1, "{shard}: no second GET on a cache hit");
    }
    let status = client.get_model(pb::GetModelRequest { model_id: REPO.into() }).await.expect("get").into_inner();
    assert_eq!(status.source(), pb::ModelSource::Cache);
    server.stop().await;
}

/// Step 3 knows the exact bytes before step 4 moves any byte of weights: each weight file's header
/// is read ahead with one ranged GET, every one of them before the first download of a weight
/// file; step 3 reserves exactly the tensors' bytes (not the files'), held through step 4; the
/// download's byte progress counts the weight files (the configs came whole in step 3).
#[tokio::test]
async fn plans_from_headers_read_ahead_then_downloads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, expected) = setup(tmp.path()).await;
    let mut client = server.client().await;
    let size = |shard: &str| std::fs::metadata(tmp.path().join("repo").join(shard)).expect("shard").len();
    // About two seconds: long enough to look at step 4, short enough to finish.
    hub.set_fault(REPO, SHARDS[0], Fault::Slow { bytes_per_sec: size(SHARDS[0]) / 2 });
    let mut stream = open_load(&mut client, load(REPO)).await;
    read_until(&mut stream, "step 3", |m| m.step == 3).await;
    let planning = std::time::Instant::now();
    let before = read_until(&mut stream, "step 4", |m| m.step == 4).await;
    eprintln!("step 3 with the headers of 3 shards read ahead: {:.1} ms", planning.elapsed().as_secs_f64() * 1e3);
    let reserved = format!("{} bytes reserved on cpu", expected.booked());
    assert!(before.iter().any(|m| m.step == 3 && m.detail.ends_with(&reserved)), "{reserved}: {before:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, expected.booked()), "reserved through step 4: {cpu:?}");
    let (rest, end) = end_of(stream).await;
    end.expect("loads from the hub");

    let requests = hub.requests();
    let weight_get =
        |r: &HubRequest| r.method == "GET" && r.path.contains("/_lfs/") && r.path.ends_with(".safetensors");
    let last_read =
        requests.iter().rposition(|r| weight_get(r) && r.range.as_deref().is_some_and(|r| r.starts_with("bytes=0-")));
    let first_download = requests.iter().position(|r| weight_get(r) && r.range.is_none());
    assert!(last_read.is_some() && last_read < first_download, "{requests:#?}");
    for shard in SHARDS {
        let stats = hub.stats(REPO, shard);
        assert_eq!((stats.range_reads, stats.gets), (1, 1), "{shard}: one header read, one download");
    }
    let download = rest.iter().find(|m| m.step == 4 && m.bytes_total > 0).expect("download progress");
    assert_eq!(download.bytes_total, SHARDS.iter().map(|s| size(s)).sum::<u64>(), "{download:?}");
    assert_eq!(tests::checksums(&mut client, REPO).await, expected.tensors);
    server.stop().await;
}

/// Each injected hub fault maps to its gRPC code, leaves the model FAILED with a reason and nothing
/// in the cache that a later load would trust; once the fault is cleared the load succeeds.
#[tokio::test]
async fn hub_faults_map_to_codes_and_recover() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, expected) = setup(tmp.path()).await;
    let mut client = server.client().await;
    let shard = SHARDS[1];
    for (fault, code) in [
        (Fault::Status(404), Code::NotFound),
        (Fault::Status(401), Code::Unauthenticated),
        (Fault::Status(403), Code::PermissionDenied),
        (Fault::Status(500), Code::Unavailable),
        (Fault::BodyStatus(503), Code::Unavailable),
        (Fault::DropMidBody, Code::Unavailable),
        (Fault::Stall, Code::Unavailable),
        (Fault::WrongBytes, Code::DataLoss),
    ] {
        hub.set_fault(REPO, shard, fault);
        let (_, end) = load_all(&mut client, load(REPO)).await;
        let status = end.expect_err("the fault fails the load");
        assert_eq!(status.code(), code, "{fault:?}: {status:?}");
        let model = client.get_model(pb::GetModelRequest { model_id: REPO.into() }).await.expect("get").into_inner();
        assert_eq!(model.state(), pb::ModelState::Failed, "{fault:?}");
        assert!(!model.error.is_empty());
        let untrusted = mismatched_blobs(tmp.path());
        assert!(untrusted.is_empty(), "{fault:?}: blobs whose bytes do not match their sha256 name: {untrusted:?}");
        let cpu = cpu_resources(&mut client).await;
        assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0), "{fault:?}");
    }
    hub.clear_faults();
    load_all(&mut client, load(REPO)).await.1.expect("loads once the hub is healthy");
    assert_eq!(cpu_resources(&mut client).await.used_bytes, expected.booked());
    server.stop().await;
}

/// An unknown repo is NOT_FOUND and an unknown revision is NOT_FOUND, without touching the cache.
#[tokio::test]
async fn unknown_repo_and_revision_are_not_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_hub, server, _) = setup(tmp.path()).await;
    let mut client = server.client().await;
    let (_, end) = load_all(&mut client, load("org/missing")).await;
    assert_eq!(end.expect_err("unknown repo").code(), Code::NotFound);
    let request = pb::LoadModelRequest { revision: Some("no-such-branch".into()), ..load(REPO) };
    let (_, end) = load_all(&mut client, request).await;
    assert_eq!(end.expect_err("unknown revision").code(), Code::NotFound);
    assert_eq!(state_of(&mut client, REPO).await, pb::ModelState::Failed);
    assert!(blobs(tmp.path()).is_empty(), "nothing was downloaded: {:?}", blobs(tmp.path()));
    server.stop().await;
}

/// A load downloads its files at once, not one after another: two slow shards are seen streaming
/// at the same time (each has sent some of its bytes and not all); the byte progress is summed
/// over every file, rises, and ends at the total; the model loads intact.
#[tokio::test]
async fn shards_download_concurrently() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, expected) = setup(tmp.path()).await;
    let mut client = server.client().await;
    let size = |shard: &str| std::fs::metadata(tmp.path().join("repo").join(shard)).expect("shard").len();
    let slow = [SHARDS[0], SHARDS[1]];
    for shard in slow {
        // About two seconds a shard: long enough to be caught in flight, short enough to finish.
        hub.set_fault(REPO, shard, Fault::Slow { bytes_per_sec: size(shard) / 2 });
    }
    let loading = tokio::spawn(async move { load_all(&mut client, load(REPO)).await });
    hub.wait_until("two shards streaming at once", |hub| {
        slow.iter().all(|shard| (1..size(shard)).contains(&hub.stats(REPO, shard).bytes_sent))
    })
    .await;
    let (messages, end) = loading.await.expect("the load task");
    end.expect("loads from the hub");
    let downloads: Vec<_> = messages.iter().filter(|m| m.step == 4 && m.bytes_total > 0).collect();
    let repo_bytes: u64 = hub.repo(REPO).files().values().map(|data| data.len() as u64).sum();
    let total = downloads.first().expect("download progress").bytes_total;
    assert!(downloads.iter().take_while(|m| m.bytes_total == total).count() >= 3, "{downloads:?}");
    let download: Vec<u64> = downloads.iter().take_while(|m| m.bytes_total == total).map(|m| m.bytes_done).collect();
    assert!(download.windows(2).all(|w| w[0] <= w[1]), "byte progress rises: {download:?}");
    assert_eq!(download.last(), Some(&total), "and ends at the total");
    assert!(total >= SHARDS.iter().map(|s| size(s)).sum::<u64>() && total <= repo_bytes, "{total} of {repo_bytes}");
    assert_eq!(tests::checksums(&mut server.client().await, REPO).await, expected.tensors);
    server.stop().await;
}

/// Two concurrent loads of one model download every file exactly once.
#[tokio::test]
async fn concurrent_loads_download_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    let (a, b) = tokio::join!(async { load_all(&mut server.client().await, load(REPO)).await }, async {
        load_all(&mut server.client().await, load(REPO)).await
    },);
    a.1.expect("first");
    b.1.expect("second");
    for shard in SHARDS {
        assert_eq!(hub.get_count(REPO, shard), 1, "{shard}");
    }
    server.stop().await;
}

/// CancelLoad in the middle of a slow download ends the stream with CANCELLED promptly; the next
/// LoadModel finishes the download.
#[tokio::test]
async fn cancel_during_a_slow_download() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    let mut client = server.client().await;
    hub.set_fault(REPO, SHARDS[0], Fault::Slow { bytes_per_sec: 64 * 1024 });
    let mut stream = client.load_model(load(REPO)).await.expect("load").into_inner();
    loop {
        let m = tokio::time::timeout(tests::WAIT, tokio_stream::StreamExt::next(&mut stream))
            .await
            .expect("moves")
            .expect("open")
            .expect("ok");
        if m.step == 4 && m.bytes_done > 0 {
            break;
        }
    }
    let started = std::time::Instant::now();
    client.cancel_load(pb::CancelLoadRequest { model_id: REPO.into() }).await.expect("cancel");
    let mut end = Ok(());
    while let Some(item) =
        tokio::time::timeout(tests::WAIT, tokio_stream::StreamExt::next(&mut stream)).await.expect("moves")
    {
        if let Err(status) = item {
            end = Err(status);
            break;
        }
    }
    eprintln!("CancelLoad during a download to the end of the stream: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    assert_eq!(end.expect_err("cancelled").code(), Code::Cancelled);
    assert_eq!(state_of(&mut client, REPO).await, pb::ModelState::Unloaded);
    hub.clear_faults();
    load_all(&mut client, load(REPO)).await.1.expect("the next load completes the download");
    server.stop().await;
}

/// CancelLoad while step 2 waits on a hub that does not answer (its stall timeout far longer
/// than the test) ends the load CANCELLED at once, and the model is UNLOADED; once the hub
/// answers again, the next load succeeds.
#[tokio::test]
async fn cancel_while_the_hub_resolves() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected =
        fixture::sharded_model(&tmp.path().join("repo"), &fixture::f32_tensors("layers", 2, 1024), 2).expect("fixture");
    let hub = TestHub::start([HubRepo::from_dir(REPO, &tmp.path().join("repo")).expect("repo")]).await;
    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.path().join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    cfg.manager.loader.sources.hub.stall_timeout = std::time::Duration::from_secs(600);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    hub.hold_api();
    let mut stream = open_load(&mut client, load(REPO)).await;
    hub.wait_until("the resolve is held", |h| h.held_api() >= 1).await;
    client.cancel_load(pb::CancelLoadRequest { model_id: REPO.into() }).await.expect("cancel");
    let (_, end) = tests::rest_of(&mut stream).await;
    assert_eq!(end.expect_err("cancelled").code(), Code::Cancelled);
    assert_eq!(state_of(&mut client, REPO).await, pb::ModelState::Unloaded);
    assert_eq!(cpu_resources(&mut client).await.reserved_bytes, 0);

    hub.answer_api();
    load_all(&mut client, load(REPO)).await.1.expect("the hub answers again");
    assert_eq!(tests::checksums(&mut client, REPO).await, expected.tensors);
    server.stop().await;
}

/// With the hub unreachable, a revision already in the cache still loads (from the cache); one that
/// is not cached is UNAVAILABLE.
#[tokio::test]
async fn unreachable_hub_falls_back_to_the_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    let mut client = server.client().await;
    load_all(&mut client, load(REPO)).await.1.expect("first load downloads");
    client.unload_model(pb::UnloadModelRequest { model_id: REPO.into(), force: false }).await.expect("unload");
    let hub_url = hub.url().to_owned();
    drop(hub);

    let (messages, end) = load_all(&mut client, load(REPO)).await;
    end.expect("loads from the cache while the hub is down");
    assert!(messages.iter().any(|m| m.step == 2 && m.detail.starts_with("hub unreachable")), "{messages:?}");
    let (_, end) = load_all(&mut client, load("org/never-cached")).await;
    let status = end.expect_err("not cached");
    assert_eq!(status.code(), Code::Unavailable);
    // The message names the URL it tried once, and why it failed.
    let message = status.message();
    assert_eq!(message.matches(&format!("{hub_url}/api/models/org/never-cached")).count(), 1, "{message}");
    assert!(message.to_lowercase().contains("connect"), "{message}");
    server.stop().await;
}

/// A repo's tag and commit resolve like its branch: GetModel shows the commit the tag names.
#[tokio::test]
async fn tags_and_commits_resolve_to_commits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    let commit = hub.repo(REPO).commit().to_owned();
    hub.put_repo(hub.repo(REPO).with_ref("v1", &commit));
    let mut client = server.client().await;
    for revision in ["v1", commit.as_str()] {
        let request = pb::LoadModelRequest { revision: Some(revision.into()), ..load(REPO) };
        load_all(&mut client, request).await.1.unwrap_or_else(|e| panic!("{revision}: {e}"));
        let status = client.get_model(pb::GetModelRequest { model_id: REPO.into() }).await.expect("get").into_inner();
        assert_eq!(status.revision, commit, "{revision}");
        client.unload_model(pb::UnloadModelRequest { model_id: REPO.into(), force: false }).await.expect("unload");
    }
    server.stop().await;
}

/// A gated repo is PERMISSION_DENIED; offline, a model the cache lacks is NOT_FOUND saying so,
/// without a request to the hub.
#[tokio::test]
async fn gated_repos_and_offline_misses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    hub.set_access(REPO, tests::hub::Access::Gated);
    let (_, end) = load_all(&mut server.client().await, load(REPO)).await;
    assert_eq!(end.expect_err("gated").code(), Code::PermissionDenied);
    server.stop().await;

    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.hf_cache = Some(tmp.path().join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    let server = TestServer::start(cfg).await;
    let requests_before = hub.requests().len();
    let (_, end) = load_all(&mut server.client().await, load(REPO)).await;
    let status = end.expect_err("offline miss");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("offline"), "{}", status.message());
    assert_eq!(hub.requests().len(), requests_before, "offline, the hub is never asked");
    server.stop().await;
}

/// Two different models download at the same time: with both downloads slowed, the hub streams
/// a body of each at once; once the hub is fast again both loads finish.
#[tokio::test]
async fn two_models_download_in_parallel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    fixture::single_file_model(&tmp.path().join("other"), &fixture::f32_tensors("w", 2, 64 * 1024)).expect("fixture");
    hub.put_repo(HubRepo::from_dir("org/other", &tmp.path().join("other")).expect("repo"));
    let slow = Fault::Slow { bytes_per_sec: 512 * 1024 };
    hub.set_fault(REPO, SHARDS[0], slow);
    hub.set_fault("org/other", "model.safetensors", slow);

    let first = tokio::spawn({
        let channel = server.channel();
        async move { load_all(&mut pb::model_loader_client::ModelLoaderClient::new(channel), load(REPO)).await }
    });
    let second = tokio::spawn({
        let channel = server.channel();
        async move { load_all(&mut pb::model_loader_client::ModelLoaderClient::new(channel), load("org/other")).await }
    });
    hub.wait_until("two bodies streamed at once", |hub| hub.active_bodies() >= 2).await;
    hub.clear_faults();
    for (name, load) in [("org/sharded", first), ("org/other", second)] {
        load.await.expect("no panic").1.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    server.stop().await;
}

/// Every file under `dir`, as paths relative to it (symlinks listed, not followed).
fn tree_of(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            found.push(path.strip_prefix(dir).expect("inside").display().to_string());
        }
    }
    found.sort();
    found
}

/// A hub listing that names a path outside the snapshot folder (absolute, `..`, `.`, empty
/// segments, a backslash, a NUL) is refused with PERMISSION_DENIED before anything touches the
/// disk: no file is written at that path, nothing lands in the cache, and the server stays
/// healthy (the good repo still loads from the hub).
#[tokio::test]
async fn hub_paths_that_leave_the_snapshot_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (hub, server, _) = setup(tmp.path()).await;
    let mut client = server.client().await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let absolute = outside.join("PWNED.json").display().to_string();
    let good = tests::hub::read_dir_files(&tmp.path().join("repo")).expect("files");
    let bad_paths = [
        absolute.clone(),
        "../PWNED_up.json".to_owned(),
        "unet/../../PWNED_up2.json".to_owned(),
        "./config.json".to_owned(),
        "unet//config.json".to_owned(),
        "a\\PWNED.json".to_owned(),
        "PWNED\0.json".to_owned(),
    ];
    for (i, bad) in bad_paths.iter().enumerate() {
        let id = format!("org/hostile-{i}");
        let mut files = good.clone();
        files.insert(bad.clone(), b"{}".to_vec().into());
        hub.put_repo(HubRepo { id: id.clone(), ..HubRepo::new(&id, files) });
        let (_, end) = load_all(&mut client, load(&id)).await;
        let status = end.expect_err("a hostile listing is refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{bad:?}: {status:?}");
        assert!(status.message().contains("refusing"), "{bad:?}: {status:?}");
    }
    assert!(!Path::new(&absolute).exists(), "nothing written at the absolute path");
    assert_eq!(tree_of(&outside), Vec::<String>::new());
    let cached = tree_of(&tmp.path().join("cache"));
    assert!(cached.iter().all(|p| !p.contains("PWNED") && !p.contains("blobs/")), "nothing cached: {cached:?}");
    assert!(!tmp.path().join("PWNED_up.json").exists() && !tmp.path().join("cache/PWNED_up.json").exists());
    let (_, end) = load_all(&mut client, load(REPO)).await;
    end.expect("the good repo still loads");
    server.stop().await;
}
