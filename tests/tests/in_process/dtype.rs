//! dtype conversion in APPLY_OPTIMIZATIONS (the request's `dtype`, or the server's `--dtype`) and
//! the fp16 variant files: what is resident is checked against a reference conversion of the
//! fixture (and a few values against their bits worked out by hand); integers are never touched.

use std::{collections::BTreeMap, path::Path};

use half::{bf16, f16};
use model_manager::TargetDtype;
use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use tests::{TestServer, config, cpu_resources, fixture, fixture::TensorSpec, load, load_all};
use tonic::transport::Channel;

/// Values whose F16 and BF16 bits are known: rounding to nearest even, overflow to the largest
/// finite BF16, F16 subnormals and underflow to zero.
const KNOWN: [f32; 8] = [1.0, -2.5, 1.0 / 3.0, 65504.0, -0.0, 1e-8, 0.1, 3.0e-5];
const KNOWN_F16: [u16; 8] = [0x3c00, 0xc100, 0x3555, 0x7bff, 0x8000, 0x0000, 0x2e66, 0x01f7];
const KNOWN_BF16: [u16; 8] = [0x3f80, 0xc020, 0x3eab, 0x4780, 0x8000, 0x322c, 0x3dcd, 0x37fc];

fn known() -> TensorSpec {
    TensorSpec {
        name: "known".into(),
        dtype: Dtype::F32,
        shape: vec![2, 4],
        data: bytemuck::cast_slice(&KNOWN).to_vec(),
    }
}

/// F32 (known values and random ones), BF16 and I64 tensors.
fn mixed_tensors() -> Vec<TensorSpec> {
    vec![known(), TensorSpec::f32("w", &[64, 33], 7), TensorSpec::bf16("b", &[17], 8), TensorSpec::i64_range("ids", 10)]
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The tensor's values as f32 (exact for F32 and BF16).
fn values(t: &TensorSpec) -> Vec<f32> {
    match t.dtype {
        Dtype::F32 => bytemuck::cast_slice::<u8, f32>(&t.data).to_vec(),
        Dtype::BF16 => bytemuck::cast_slice::<u8, bf16>(&t.data).iter().map(|v| v.to_f32()).collect(),
        Dtype::F16 => bytemuck::cast_slice::<u8, f16>(&t.data).iter().map(|v| v.to_f32()).collect(),
        other => panic!("not a float: {other:?}"),
    }
}

/// The reference conversion: what ListTensors must show for `t` after a load with `target`.
fn reference(t: &TensorSpec, target: TargetDtype) -> (String, Vec<u64>, String) {
    let shape = t.shape.iter().map(|&d| d as u64).collect();
    if !matches!(t.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return (format!("{:?}", t.dtype), shape, t.sha256());
    }
    let v = values(t);
    let bytes: Vec<u8> = match target {
        TargetDtype::F32 => bytemuck::cast_slice(&v).to_vec(),
        TargetDtype::F16 => bytemuck::cast_slice(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        TargetDtype::BF16 => bytemuck::cast_slice(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
    };
    (target.to_string(), shape, sha(&bytes))
}

fn references(tensors: &[TensorSpec], target: TargetDtype) -> BTreeMap<String, (String, Vec<u64>, String)> {
    tensors.iter().map(|t| (t.name.clone(), reference(t, target))).collect()
}

fn with_dtype(id: &str, dtype: &str) -> pb::LoadModelRequest {
    pb::LoadModelRequest { dtype: Some(dtype.into()), ..load(id) }
}

async fn unload(client: &mut ModelLoaderClient<Channel>, id: &str) {
    client.unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false }).await.expect("UnloadModel");
}

fn detail_of(messages: &[pb::ModelLoadProgress], step: u32) -> Vec<&str> {
    messages.iter().filter(|m| m.step == step && !m.detail.is_empty()).map(|m| m.detail.as_str()).collect()
}

/// F32 → BF16 and F32 → F16 give the reference values (and the hand-worked bits); BF16 → F16
/// goes through the exact f32 value; integers keep their dtype and bytes; the accounting and
/// GetModel show the converted sizes.
#[tokio::test]
async fn narrowing_matches_a_reference_conversion() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tensors = mixed_tensors();
    fixture::single_file_model(&tmp.path().join("mixed"), &tensors).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    for (target, name, known_bits, converted) in
        [(TargetDtype::BF16, "bf16", KNOWN_BF16, 2), (TargetDtype::F16, "f16", KNOWN_F16, 3)]
    {
        let (messages, end) = load_all(&mut client, with_dtype("mixed", name)).await;
        end.unwrap_or_else(|s| panic!("loads as {name}: {s:?}"));
        assert_eq!(detail_of(&messages, 7), [format!("converted {converted} tensors to {target}")], "{messages:?}");
        let resident = tests::checksums(&mut client, "mixed").await;
        assert_eq!(resident, references(&tensors, target), "{name}: resident tensors vs the reference conversion");
        let bits: Vec<u8> = known_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(resident["known"].2, sha(&bits), "{name}: the known values' bits");
        assert_eq!(resident["ids"], (String::from("I64"), vec![10], tensors[3].sha256()), "integers untouched");

        let expected_bytes = (8 + 64 * 33 + 17) * 2 + 10 * 8;
        let status = tests::get_model(&mut client, "mixed").await;
        assert_eq!((status.dtype.as_str(), status.weight_bytes), (target.to_string().as_str(), expected_bytes));
        let booked = expected_bytes + status.metadata_bytes;
        assert_eq!(cpu_resources(&mut client).await.used_bytes, booked, "the budget holds the converted size");
        unload(&mut client, "mixed").await;
    }
    server.stop().await;
}

/// BF16 → F32 widens exactly; F32 tensors are left as they are; the budget reserved the load's
/// peak: the widened size plus the BF16 bytes read before step 7 converts them (and the tensors'
/// metadata).
#[tokio::test]
async fn widening_is_exact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tensors = mixed_tensors();
    let fixture = fixture::single_file_model(&tmp.path().join("mixed"), &tensors).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let (messages, end) = load_all(&mut client, with_dtype("mixed", "f32")).await;
    end.expect("loads as f32");
    assert_eq!(detail_of(&messages, 7), ["converted 1 tensors to F32"]);
    let resident = tests::checksums(&mut client, "mixed").await;
    assert_eq!(resident, references(&tensors, TargetDtype::F32));
    assert_eq!(resident["known"].2, tensors[0].sha256(), "F32 stays byte for byte");
    let expected_bytes = (8 + 64 * 33 + 17) * 4 + 10 * 8;
    let peak = expected_bytes + 17 * 2 + fixture.metadata_bytes();
    assert!(
        messages.iter().any(|m| m.step == 3 && m.detail.contains(&format!("{peak} bytes reserved on cpu"))),
        "step 3 reserves the peak: {messages:?}"
    );
    assert_eq!(tests::get_model(&mut client, "mixed").await.weight_bytes, expected_bytes);
    server.stop().await;
}

/// The server's default dtype applies when a request names none; a request's own dtype wins.
#[tokio::test]
async fn the_server_default_dtype_applies() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tensors = mixed_tensors();
    fixture::single_file_model(&tmp.path().join("mixed"), &tensors).expect("fixture");
    let mut cfg = config(tmp.path());
    cfg.manager.loader.default_dtype = Some(TargetDtype::BF16);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    load_all(&mut client, load("mixed")).await.1.expect("loads");
    assert_eq!(tests::checksums(&mut client, "mixed").await, references(&tensors, TargetDtype::BF16));
    unload(&mut client, "mixed").await;
    load_all(&mut client, with_dtype("mixed", "f16")).await.1.expect("loads");
    assert_eq!(tests::checksums(&mut client, "mixed").await, references(&tensors, TargetDtype::F16));
    server.stop().await;
}

/// FP8 weights (F8_E4M3) load as stored: ListTensors names them `F8_E4M3` with the file's bytes'
/// sha256, the budget counts a byte an element, and a load with a target dtype converts their F32
/// scales but never the FP8 tensors.
#[tokio::test]
async fn fp8_tensors_load_as_stored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tensors = vec![
        TensorSpec::f8_e4m3("layer.weight", &[32, 48], 3),
        TensorSpec::f32("layer.weight_scale", &[1], 4),
        TensorSpec::bf16("norm", &[48], 5),
    ];
    let expected = fixture::single_file_model(&tmp.path().join("fp8"), &tensors).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    load_all(&mut client, load("fp8")).await.1.expect("an FP8 model loads");
    let resident = tests::checksums(&mut client, "fp8").await;
    assert_eq!(resident, expected.tensors);
    assert_eq!(resident["layer.weight"].0, "F8_E4M3");
    let metadata = expected.metadata_bytes();
    assert_eq!(
        cpu_resources(&mut client).await.used_bytes,
        32 * 48 + 4 + 48 * 2 + metadata,
        "one byte per FP8 element"
    );
    unload(&mut client, "fp8").await;

    let (messages, end) = load_all(&mut client, with_dtype("fp8", "bf16")).await;
    end.expect("loads with a target dtype");
    assert_eq!(detail_of(&messages, 7), ["converted 1 tensors to BF16"], "{messages:?}");
    let resident = tests::checksums(&mut client, "fp8").await;
    assert_eq!(resident["layer.weight"], expected.tensors["layer.weight"], "FP8 is never converted");
    assert_eq!(resident, references(&tensors, TargetDtype::BF16));
    assert_eq!(cpu_resources(&mut client).await.used_bytes, 32 * 48 + 2 + 48 * 2 + metadata);
    server.stop().await;
}

/// A dtype candle cannot hold (F8_E5M2) fails the load with FAILED_PRECONDITION naming the dtype,
/// the tensor and the file, before any byte is read; the server keeps nothing of it.
#[tokio::test]
async fn a_dtype_candle_cannot_hold_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut odd = TensorSpec::f8_e4m3("odd", &[4, 4], 6);
    odd.dtype = Dtype::F8_E5M2;
    fixture::single_file_model(&tmp.path().join("e5m2"), &[TensorSpec::f32("w", &[4], 1), odd]).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;
    let (messages, end) = load_all(&mut client, load("e5m2")).await;
    let status = end.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    for part in ["F8_E5M2", "odd", "model.safetensors"] {
        assert!(status.message().contains(part), "the message names {part}: {status:?}");
    }
    assert!(messages.iter().all(|m| m.step <= 3), "refused while planning: {messages:?}");
    assert_eq!(cpu_resources(&mut client).await.used_bytes, 0);
    server.stop().await;
}

/// Writes a model whose `model.fp16.safetensors` holds F16 values different from the F32 file's
/// (so which file was read shows in the checksums), and returns both tensor lists.
fn model_with_fp16_variant(dir: &Path) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let full =
        vec![TensorSpec::f32("a", &[256, 64], 1), TensorSpec::f32("b", &[1000], 2), TensorSpec::i64_range("ids", 5)];
    let variant: Vec<TensorSpec> = full
        .iter()
        .map(|t| match t.dtype {
            Dtype::F32 => {
                let halves: Vec<f16> = values(t).iter().map(|&x| f16::from_f32(2.0 * x + 1.0)).collect();
                TensorSpec { dtype: Dtype::F16, data: bytemuck::cast_slice(&halves).to_vec(), ..t.clone() }
            }
            _ => t.clone(),
        })
        .collect();
    fixture::single_file_model(dir, &full).expect("fixture");
    fixture::write_safetensors(&dir.join("model.fp16.safetensors"), &variant).expect("variant");
    (full, variant)
}

/// An F16 load reads `model.fp16.safetensors` (half the bytes, nothing to convert); a load with
/// no dtype reads the F32 file; a BF16 load, which has no variant, converts the F32 file.
#[tokio::test]
async fn the_fp16_variant_is_read_when_f16_is_asked_for() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (full, variant) = model_with_fp16_variant(&tmp.path().join("sd"));
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;
    let tensor_bytes = |ts: &[TensorSpec]| ts.iter().map(|t| t.data.len() as u64).sum::<u64>();

    let (messages, end) = load_all(&mut client, with_dtype("sd", "f16")).await;
    end.expect("loads the variant");
    assert!(
        detail_of(&messages, 3).iter().any(|d| d.contains("fp16 variant")),
        "step 3 names the variant: {messages:?}"
    );
    let read = messages.iter().filter(|m| m.step == 4).map(|m| m.bytes_total).max();
    assert_eq!(read, Some(tensor_bytes(&variant)), "step 4 reads the variant's bytes, half the F32 file's");
    assert!(tensor_bytes(&variant) < tensor_bytes(&full) * 6 / 10);
    assert_eq!(detail_of(&messages, 7), ["no dtype conversion"]);
    let expected: BTreeMap<_, _> = variant
        .iter()
        .map(|t| (t.name.clone(), (format!("{:?}", t.dtype), t.shape.iter().map(|&d| d as u64).collect(), t.sha256())))
        .collect();
    assert_eq!(tests::checksums(&mut client, "sd").await, expected, "the variant file's tensors");
    unload(&mut client, "sd").await;

    load_all(&mut client, load("sd")).await.1.expect("loads the full file");
    assert_eq!(
        tests::checksums(&mut client, "sd").await,
        references(&full, TargetDtype::F32),
        "no dtype: the F32 file"
    );
    unload(&mut client, "sd").await;

    let (messages, end) = load_all(&mut client, with_dtype("sd", "bf16")).await;
    end.expect("converts the F32 file");
    assert!(!detail_of(&messages, 3).iter().any(|d| d.contains("variant")), "{messages:?}");
    assert_eq!(tests::checksums(&mut client, "sd").await, references(&full, TargetDtype::BF16));
    server.stop().await;
}

/// With the attach socket on, a load converted to BF16 lands in a sealed memfd: what ListTensors
/// shows and what an attached client maps are the reference conversion, integers as stored.
#[tokio::test]
async fn conversion_for_attach_lands_in_a_memfd_with_the_reference_values() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tensors = mixed_tensors();
    fixture::single_file_model(&tmp.path().join("mixed"), &tensors).expect("fixture");
    let socket = tmp.path().join("attach.sock");
    let server = TestServer::start(tests::with_attach(config(tmp.path()), &socket)).await;
    let mut client = server.client().await;

    let (messages, end) = load_all(&mut client, with_dtype("mixed", "bf16")).await;
    end.expect("loads as bf16");
    assert_eq!(detail_of(&messages, 7), ["converted 2 tensors to BF16"]);
    let want = references(&tensors, TargetDtype::BF16);
    assert_eq!(tests::checksums(&mut client, "mixed").await, want);
    let request = attach::AttachRequest { model_id: "mixed".into(), ..Default::default() };
    let attached = tokio::task::spawn_blocking(move || attach::Attached::attach(&socket, &request, tests::WAIT))
        .await
        .expect("attach task")
        .expect("attaches");
    let got: BTreeMap<String, (String, Vec<u64>, String)> = attached
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), (t.dtype.clone(), t.shape.clone(), sha(attached.bytes(t).expect("host bytes")))))
        .collect();
    assert_eq!(got, want);
    assert_eq!(attached.buffers().len(), 1, "one memfd for every tensor, converted or not");
    drop(attached);
    server.stop().await;
}
