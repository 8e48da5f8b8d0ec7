//! Generated gRPC code for `modelloader.v1`: messages, the client and the server stubs, and the
//! encoded file descriptor set that reflection serves.
//!
//! Generated code, and the one codec it uses; conversions to domain types happen in the server.

#![allow(clippy::all, clippy::too_many_lines, missing_docs)]

/// `modelloader.v1`: the messages and the `ModelLoader` service.
pub mod v1 {
    tonic::include_proto!("modelloader.v1");
}

/// The encoded `FileDescriptorSet` of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("model_loader_descriptor");

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
