//! Generated gRPC code for `modelloader.v1`: messages (with serde impls in the proto's canonical
//! JSON mapping), the client and the server stubs, and the encoded file descriptor set that
//! reflection serves; and the same (without serde) for Triton's `inference` package, the KServe
//! v2 protocol the server also speaks.
//!
//! Generated code, and the one codec it uses; conversions to domain types happen in the server.

#![allow(clippy::all, clippy::too_many_lines, missing_docs)]

/// `modelloader.v1`: the messages and the `ModelLoader` service.
pub mod v1 {
    tonic::include_proto!("modelloader.v1");
    // serde impls in the proto's canonical JSON mapping: camelCase fields, enums by name, 64-bit
    // integers as strings, default values left out (as grpcurl prints).
    include!(concat!(env!("OUT_DIR"), "/modelloader.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("model_loader_descriptor");

/// `inference`: the KServe v2 / Triton protocol (`GRPCInferenceService`), generated from Triton's
/// own `grpc_service.proto` and `model_config.proto`, vendored unchanged under `proto/triton`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// The encoded `FileDescriptorSet` of the `inference` protos, for server reflection.
pub const INFERENCE_FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");

/// The codec of the `ModelLoader` service.
pub mod codec {
    use prost::Message;
    use tonic::{
        Status,
        codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    };
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// prost's codec, except that bytes that do not decode are INVALID_ARGUMENT: tonic-prost
    /// answers INTERNAL, which tells a client sending garbage that the server is at fault.
    #[derive(Debug, Clone)]
    pub struct RequestCodec<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for RequestCodec<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    impl<T, U> Codec for RequestCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = InvalidArgumentDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::default().encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            InvalidArgumentDecoder(ProstDecoder::default())
        }
    }

    /// [`ProstDecoder`] with decode errors as INVALID_ARGUMENT.
    #[derive(Debug)]
    pub struct InvalidArgumentDecoder<U>(ProstDecoder<U>);

    impl<U: Message + Default> Decoder for InvalidArgumentDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|status| {
                Status::invalid_argument(format!("the request does not decode: {}", status.message()))
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1 as pb;

    /// A status serialises as grpcurl prints it: camelCase names, enums by name, uint64 as
    /// strings, default values left out.
    #[test]
    fn json_is_the_canonical_mapping() {
        let status = pb::ModelStatus {
            model_id: "demo".into(),
            state: pb::ModelState::Loaded.into(),
            weight_bytes: 1024,
            error_kind: String::new(),
            last_used_unix_ms: 1_700_000_000_000,
            last_progress: Some(pb::ModelLoadProgress {
                step: 8,
                total: 8,
                phase: pb::ModelLoadPhase::Finalization.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&status).expect("a status serialises");
        assert_eq!(
            json,
            r#"{"modelId":"demo","state":"MODEL_STATE_LOADED","lastProgress":{"step":8,"total":8,"phase":"MODEL_LOAD_PHASE_FINALIZATION"},"weightBytes":"1024","lastUsedUnixMs":"1700000000000"}"#
        );
        let back: pb::ModelStatus = serde_json::from_str(&json).expect("and reads back");
        assert_eq!(back, status);
    }
}
