//! Model files changed under a loaded model with the attach socket on (SPEC §9: resident bytes
//! never change), against the real binary under bearer tokens (ListTensors with a `read` token),
//! this process (root here, or at least the files' owner) as the attached client: a file
//! truncated, rewritten in place by `cp`, or written and truncated through a client's reopened
//! descriptor never kills the server nor changes what is loaded; an immutable file is mapped as
//! it is, and once it changes anyway the next attach or checksum answers DATA_LOSS naming it and
//! the model is FAILED, its memory back.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::FileExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::Command,
};

use attach::{AttachRequest, AttachResponse, wire};
use prost::Message;
use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use sha2::{Digest, Sha256};
use tests::{WAIT, binary::Binary, fixture};
use tonic::{
    Code, Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

const MODEL: &str = "m";

type Client = ModelLoaderClient<InterceptedService<Channel, Bearer>>;

/// Sends a bearer token with every call.
#[derive(Clone)]
struct Bearer(AsciiMetadataValue);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// The server under tokens with the attach socket, a client of each role, and the model's file.
struct Served {
    _server: Binary,
    admin: Client,
    reader: Client,
    socket: PathBuf,
    file: PathBuf,
    /// Tensor name → sha256 of the bytes loaded.
    want: BTreeMap<String, String>,
}

/// A model of four F32 tensors (1 MiB) in `tmp`, served with `--attach-socket` and
/// `--auth-token-file` and loaded with the admin token.
async fn serve(tmp: &Path) -> Served {
    let models = tmp.join("models");
    let expected =
        fixture::single_file_model(&models.join(MODEL), &fixture::f32_tensors("layer", 4, 64 * 1024)).expect("fixture");
    let tokens = tmp.join("tokens");
    std::fs::write(&tokens, "admin:admin-token\nread:read-token\n").expect("tokens");
    let socket = tmp.join("attach.sock");
    let path = |p: &Path| p.to_str().expect("UTF-8").to_owned();
    let args = [
        "--model-root".into(),
        path(&models),
        "--offline".into(),
        "--attach-socket".into(),
        path(&socket),
        "--auth-token-file".into(),
        path(&tokens),
    ];
    let server = Binary::start(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    let client = |token: &str| {
        let channel =
            Channel::from_shared(format!("http://{}", server.addr)).expect("uri").timeout(WAIT).connect_lazy();
        let bearer = Bearer(format!("Bearer {token}").parse().expect("ASCII"));
        ModelLoaderClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20)
    };
    let (mut admin, reader) = (client("admin-token"), client("read-token"));
    load(&mut admin).await.expect("loads");
    let want = expected.tensors.iter().map(|(name, (_, _, sha))| (name.clone(), sha.clone())).collect();
    Served { _server: server, admin, reader, socket, file: models.join(MODEL).join("model.safetensors"), want }
}

/// Loads the model to its end.
async fn load(admin: &mut Client) -> Result<(), Status> {
    let request = pb::LoadModelRequest { model_id: MODEL.into(), ..Default::default() };
    let mut stream = admin.load_model(request).await?.into_inner();
    while tokio::time::timeout(WAIT, stream.message()).await.expect("the load goes on")?.is_some() {}
    Ok(())
}

/// ListTensors with checksums: tensor name → sha256.
async fn checksums(reader: &mut Client) -> Result<BTreeMap<String, String>, Status> {
    let request = pb::ListTensorsRequest { model_id: MODEL.into(), with_checksums: true };
    let tensors = tokio::time::timeout(WAIT, reader.list_tensors(request)).await.expect("answers")?.into_inner();
    Ok(tensors.tensors.into_iter().map(|t| (t.name, t.sha256)).collect())
}

async fn status(reader: &mut Client) -> pb::ModelStatus {
    let request = pb::GetModelRequest { model_id: MODEL.into() };
    reader.get_model(request).await.expect("the server answers GetModel").into_inner()
}

/// A client attached at the wire level: its connection (the lease), the answer, and the
/// descriptors it received, kept as they came (never mapped here: a client's own fault is not
/// what these tests are about).
struct Raw {
    stream: UnixStream,
    response: AttachResponse,
    fds: Vec<OwnedFd>,
}

async fn attach(socket: &Path) -> Raw {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&socket).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let request = AttachRequest { model_id: MODEL.into(), ..Default::default() };
        wire::write_frame(&stream, &wire::encode(&request), &[]).expect("send");
        let (body, fds) = wire::read_frame(&stream, wire::MAX_RESPONSE_BYTES).expect("an answer");
        Raw { stream, response: AttachResponse::decode(body.as_slice()).expect("an AttachResponse"), fds }
    })
    .await
    .expect("attach task")
}

impl Raw {
    fn kinds(&self) -> Vec<pb::BufferKind> {
        self.response.buffers.iter().map(pb::AttachedBuffer::kind).collect()
    }

    /// Each tensor's sha256, read through its buffer's descriptor.
    fn digests(&self) -> BTreeMap<String, String> {
        assert_eq!(self.response.code, 0, "attached: {}", self.response.message);
        let read = |t: &pb::AttachedTensor| {
            let file = File::from(self.fds[t.buffer as usize].try_clone().expect("dup"));
            let mut bytes = vec![0; t.size_bytes as usize];
            file.read_exact_at(&mut bytes, t.offset).expect("the client reads its buffer");
            hex::encode(Sha256::digest(&bytes))
        };
        self.response.tensors.iter().map(|t| (t.name.clone(), read(t))).collect()
    }

    /// Whether the server closed the connection (the lease revoked) within [`WAIT`].
    fn closed_by_server(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(std::io::Read::read(&mut &self.stream, &mut byte), Ok(0))
    }
}

/// The file's bytes with its last 4 KiB (tensor data, past the header) inverted: the same size.
fn rewritten(file: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(file).expect("read");
    let n = bytes.len();
    bytes[n - 4096..].iter_mut().for_each(|b| *b = !*b);
    bytes
}

/// ListTensors with checksums after a model file was truncated: the server lives and answers
/// the bytes loaded (a sealed memfd's snapshot), still LOADED; the attached client's bytes too.
#[tokio::test]
async fn a_truncated_file_cannot_crash_the_server() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut served = serve(tmp.path()).await;
    let client = attach(&served.socket).await;
    File::options().write(true).open(&served.file).expect("open").set_len(1000).expect("truncate");

    let answer = checksums(&mut served.reader).await;
    assert_eq!(answer.as_ref().ok(), Some(&served.want), "the server lives and answers the bytes loaded: {answer:?}");
    assert_eq!(status(&mut served.reader).await.state(), pb::ModelState::Loaded);
    assert_eq!(client.digests(), served.want);
    assert_eq!(client.kinds(), [pb::BufferKind::HostMemfd], "a file that can change is never handed out");
}

/// `cp` over a model file (same size, other bytes): the server's checksums and the attached
/// client's bytes stay the ones loaded; the model stays LOADED.
#[tokio::test]
async fn a_file_rewritten_in_place_changes_nothing_loaded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut served = serve(tmp.path()).await;
    let client = attach(&served.socket).await;
    let other = tmp.path().join("other.safetensors");
    std::fs::write(&other, rewritten(&served.file)).expect("write");
    // As cp does: the same file truncated, then written.
    std::fs::copy(&other, &served.file).expect("cp");

    assert_eq!(checksums(&mut served.reader).await.expect("checksums"), served.want, "the bytes loaded");
    assert_eq!(client.digests(), served.want, "the client's bytes are the ones loaded");
    assert_eq!(status(&mut served.reader).await.state(), pb::ModelState::Loaded);
}

/// An attached client (root, or the file's owner) that reopens its descriptor read-write through
/// `/proc/self/fd/N` can neither write nor truncate what it was given; the server lives, its
/// checksums and the client's bytes are the ones loaded.
#[tokio::test]
async fn a_client_cannot_write_or_shrink_what_it_attached_to() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut served = serve(tmp.path()).await;
    let client = attach(&served.socket).await;
    let (mut written, mut truncated) = (Vec::new(), Vec::new());
    for fd in &client.fds {
        let Ok(reopened) = File::options().read(true).write(true).open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        else {
            continue;
        };
        written.push(reopened.write_at(b"changed", 4096).is_ok());
        truncated.push(reopened.set_len(1000).is_ok());
    }

    let answer = checksums(&mut served.reader).await;
    assert_eq!(answer.as_ref().ok(), Some(&served.want), "the server lives and answers the bytes loaded: {answer:?}");
    assert!(!written.contains(&true), "a write through a reopened descriptor went through");
    assert!(!truncated.contains(&true), "a truncation through a reopened descriptor went through");
    assert_eq!(client.digests(), served.want);
    assert_eq!(status(&mut served.reader).await.state(), pb::ModelState::Loaded);
}

/// Runs `chattr` on `file`; false (and says why) where it cannot.
fn chattr(flag: &str, file: &Path) -> bool {
    match Command::new("chattr").arg(flag).arg(file).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("chattr {flag} is refused here: {}", String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("chattr cannot run here: {e}");
            false
        }
    }
}

/// Lifts the immutable attribute on drop, so the temporary folder can go.
struct Lift<'a>(&'a Path);

impl Drop for Lift<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

/// An immutable file is mapped as it is (HOST_FILE). Once root lifts the attribute and
/// rewrites it, the next attach answers DATA_LOSS naming the file and the model is FAILED, its
/// memory back, the client attached before it closed; after an immutable reload, a truncation
/// makes the next checksum answer DATA_LOSS the same way. The server lives throughout.
#[tokio::test]
async fn an_immutable_file_is_mapped_and_a_change_fails_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut served = serve(tmp.path()).await;
    let file = served.file.clone();
    if !chattr("+i", &file) {
        eprintln!("checking only that a file that can change is not mapped");
        assert_eq!(attach(&served.socket).await.kinds(), [pb::BufferKind::HostMemfd]);
        return;
    }
    let _lift = Lift(&file);
    let unload = pb::UnloadModelRequest { model_id: MODEL.into(), force: true };
    served.admin.unload_model(unload.clone()).await.expect("unload");
    load(&mut served.admin).await.expect("loads the immutable file");
    let before = attach(&served.socket).await;
    assert_eq!(before.kinds(), [pb::BufferKind::HostFile], "an immutable file is mapped");
    assert_eq!(before.digests(), served.want);
    assert_eq!(checksums(&mut served.reader).await.expect("checksums"), served.want);

    assert!(chattr("-i", &file), "root lifts the attribute");
    std::fs::write(&file, rewritten(&file)).expect("rewrite");
    let refused = attach(&served.socket).await.response;
    assert_eq!(refused.code, Code::DataLoss as i32, "{refused:?}");
    assert!(refused.message.contains("model.safetensors"), "names the file: {}", refused.message);
    let failed = status(&mut served.reader).await;
    assert_eq!((failed.state(), failed.weight_bytes), (pb::ModelState::Failed, 0), "{failed:?}");
    assert!(failed.error.contains("model.safetensors"), "{failed:?}");
    let closed = tokio::task::spawn_blocking(move || before.closed_by_server()).await.expect("task");
    assert!(closed, "the client attached before is let go");
    let mut last = None;
    tests::eventually!(
        last.insert(served.reader.get_resources(pb::GetResourcesRequest {}).await.expect("resources").into_inner())
            .devices
            .iter()
            .all(|d| d.used_bytes == 0),
        "its memory never came back: {last:?}"
    );

    assert!(chattr("+i", &file));
    load(&mut served.admin).await.expect("loads again");
    assert!(chattr("-i", &file));
    File::options().write(true).open(&file).expect("open").set_len(1000).expect("truncate");
    let refused = checksums(&mut served.reader).await.expect_err("the file changed");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(refused.message().contains("model.safetensors"), "names the file: {refused:?}");
    assert_eq!(status(&mut served.reader).await.state(), pb::ModelState::Failed);
}
