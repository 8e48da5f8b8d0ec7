//! CancelLoad on the CPU path stops the reads between chunks, measured in bytes this process read
//! (`rchar`): one test at a time in a binary of their own, so no other test's reads blur the count.

use proto::v1 as pb;
use tests::{
    TestServer, WAIT, config, cpu_resources_when, fixture, load, open_load, rchar, read_until, rest_of, state_of,
};
use tonic::Code;

/// A load cancelled as soon as step 4 reports bytes reads well under half the model's files.
///
/// The model (768 MiB in 3 shards of 4 F32 tensors) is read in 2 MiB chunks per reader thread,
/// cancellation checked before each: the bytes this process read from the start of the load to
/// the end of its stream (CANCELLED) must be under half of the files, and at least what the load
/// reported as read (so the reads are the kind `rchar` counts, and the bound is not vacuous).
/// Then the model is UNLOADED and the CPU holds and reserves nothing.
#[tokio::test]
async fn a_cancel_in_step_4_stops_the_reads_between_chunks() {
    let _alone = super::ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("big");
    let expected = fixture::large_sharded_model(&dir, 768, 3, 4).expect("fixture");
    let file_bytes: u64 = std::fs::read_dir(&dir)
        .expect("the model folder")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "safetensors"))
        .map(|path| std::fs::metadata(path).expect("metadata").len())
        .sum();
    assert!(file_bytes > expected.bytes(), "the files hold the weights and their headers");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let read_before = rchar();
    let mut stream = open_load(&mut client, load("big")).await;
    let mut messages = read_until(&mut stream, "big: step 4 bytes", |m| {
        assert!(m.step <= 4, "the load went past step 4: {m:?}");
        m.step == 4 && m.bytes_done > 0
    })
    .await;
    let first = messages.last().expect("a message").clone();
    assert!(first.bytes_done < first.bytes_total, "the load finished step 4 before the test could cancel: {first:?}");
    let cancel = tokio::time::timeout(WAIT, client.cancel_load(pb::CancelLoadRequest { model_id: "big".into() }))
        .await
        .expect("CancelLoad answers")
        .expect("CancelLoad");
    assert!(cancel.into_inner().was_loading, "the load was in flight");
    let (rest, end) = rest_of(&mut stream).await;
    let read = rchar() - read_before;
    messages.extend(rest);
    let status = end.expect_err("the stream ends with the cancel");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(messages.iter().all(|m| m.step <= 4), "nothing past step 4: {messages:?}");

    let reported = messages.iter().map(|m| m.bytes_done).max().unwrap_or(0);
    eprintln!(
        "cancelled at {} of {} bytes reported; {read} bytes read of {file_bytes} in the files ({:.1}%)",
        first.bytes_done,
        first.bytes_total,
        100.0 * read as f64 / file_bytes as f64
    );
    assert!(read >= reported, "rchar counts the load's reads: {read} bytes read, {reported} reported");
    assert!(read < file_bytes / 2, "a cancelled load stops reading: {read} of {file_bytes} bytes read");

    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Unloaded);
    cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    server.stop().await;
}
