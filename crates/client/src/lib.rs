//! The typed Rust client of the model-loader gRPC API: connects (http or https with rustls, a CA
//! file, a client certificate, a bearer token, timeouts), calls every RPC, turns a load's stream
//! into typed progress ending in one outcome, and every failure into an [`Error`] with the gRPC
//! code and a stable kind.
//!
//! Collaborators: `proto` (the generated messages and stubs). Used by the CLI, the benchmark and
//! the tests. It never depends on the server or the test crate, and never reaches past gRPC.

mod connect;
mod error;
mod stream;

use std::time::Duration;

use tonic::{service::interceptor::InterceptedService, transport::Channel};

pub use connect::ConnectOptions;
pub use error::{Error, KIND_KEY};
pub use proto::v1 as pb;
pub use stream::{LoadStream, LoadUpdate, Phase, Progress, WatchEvent, WatchStream};

use connect::Bearer;
use pb::model_loader_client::ModelLoaderClient;

/// Answers up to this size are accepted: a ListTensors of a large model outgrows tonic's 4 MiB.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A connection to one server; cheap to clone (clones share the connection).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ModelLoaderClient<InterceptedService<Channel, Bearer>>,
    server: String,
    request_timeout: Option<Duration>,
    page_size: u32,
}

/// What to load: a model id and, optionally, a revision, a device (or several GPUs, with their
/// placement and an explicit device map) and a dtype.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadRequest {
    pub model_id: String,
    pub revision: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    /// `split` or `replicate`, for several GPUs.
    pub placement: Option<String>,
    /// Module prefixes to devices, for a split load.
    pub device_map: Vec<(String, String)>,
}

impl LoadRequest {
    /// The model with the server's defaults for the rest.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self { model_id: model_id.into(), ..Self::default() }
    }
}

impl Client {
    /// Connects now: an unreachable server is an error here (kind `unreachable`), not at the
    /// first call.
    pub async fn connect(options: &ConnectOptions) -> Result<Client, Error> {
        let bearer = options.bearer()?;
        let channel = options.channel().await?;
        let mut client = Self::with(channel, bearer, options.server().to_owned());
        client.request_timeout = options.unary_timeout();
        Ok(client)
    }

    /// A client over a channel made elsewhere (tests), without a token or timeouts.
    pub fn from_channel(channel: Channel) -> Client {
        Self::with(channel, Bearer(None), String::new())
    }

    fn with(channel: Channel, bearer: Bearer, server: String) -> Client {
        let inner = ModelLoaderClient::with_interceptor(channel, bearer).max_decoding_message_size(MAX_MESSAGE_BYTES);
        Client { inner, server, request_timeout: None, page_size: 0 }
    }

    /// ListModels' page size that [`Client::list`] asks for (0, the default: the server's).
    pub fn list_page_size(mut self, size: u32) -> Self {
        self.page_size = size;
        self
    }

    /// The server's URL (empty for [`Client::from_channel`]).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A unary call under the request timeout, if any.
    async fn unary<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        let response = match self.request_timeout {
            Some(after) => tokio::time::timeout(after, call).await.map_err(|_| Error::timeout(what, after))?,
            None => call.await,
        };
        Ok(response?.into_inner())
    }

    /// Starts (or joins) a load: typed progress, then one [`LoadUpdate::Finished`].
    pub async fn load(&self, request: LoadRequest) -> Result<LoadStream, Error> {
        let LoadRequest { model_id, revision, device, dtype, placement, device_map } = request;
        let device_map = device_map.into_iter().collect();
        let request = pb::LoadModelRequest { model_id, revision, device, dtype, placement, device_map };
        let stream = self.inner.clone().load_model(request).await?.into_inner();
        Ok(LoadStream::new(stream))
    }

    /// Watches one model (or all, for `None`): a snapshot, then every change.
    pub async fn watch(&self, model_id: Option<&str>) -> Result<WatchStream, Error> {
        let request = pb::WatchModelsRequest { model_id: model_id.unwrap_or_default().to_owned() };
        let stream = self.inner.clone().watch_models(request).await?.into_inner();
        Ok(WatchStream::new(stream))
    }

    /// Cancels a load in flight; true if one was.
    pub async fn cancel(&self, model_id: &str) -> Result<bool, Error> {
        let request = pb::CancelLoadRequest { model_id: model_id.to_owned() };
        Ok(self.unary("CancelLoad", self.inner.clone().cancel_load(request)).await?.was_loading)
    }

    /// Unloads a model (`force`: even with attached clients); true if it was loaded.
    pub async fn unload(&self, model_id: &str, force: bool) -> Result<bool, Error> {
        let request = pb::UnloadModelRequest { model_id: model_id.to_owned(), force };
        Ok(self.unary("UnloadModel", self.inner.clone().unload_model(request)).await?.was_loaded)
    }

    /// One model's status.
    pub async fn get(&self, model_id: &str) -> Result<pb::ModelStatus, Error> {
        let request = pb::GetModelRequest { model_id: model_id.to_owned() };
        self.unary("GetModel", self.inner.clone().get_model(request)).await
    }

    /// Every known model, following ListModels' pages to the end.
    pub async fn list(&self) -> Result<Vec<pb::ModelStatus>, Error> {
        let mut models = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListModelsRequest { page_size: self.page_size, page_token };
            let page = self.unary("ListModels", self.inner.clone().list_models(request)).await?;
            models.extend(page.models);
            if page.next_page_token.is_empty() {
                return Ok(models);
            }
            page_token = page.next_page_token;
        }
    }

    /// Per device: capacity, budget, used and reserved bytes, and each model's bytes.
    pub async fn resources(&self) -> Result<pb::GetResourcesResponse, Error> {
        self.unary("GetResources", self.inner.clone().get_resources(pb::GetResourcesRequest {})).await
    }

    /// The tensors of a LOADED model, with a sha256 of each when `checksums`. Checksums read every
    /// byte of the model, so that call has no request timeout.
    pub async fn tensors(&self, model_id: &str, checksums: bool) -> Result<Vec<pb::TensorInfo>, Error> {
        let request = pb::ListTensorsRequest { model_id: model_id.to_owned(), with_checksums: checksums };
        let mut inner = self.inner.clone();
        let call = inner.list_tensors(request);
        let response = if checksums { call.await?.into_inner() } else { self.unary("ListTensors", call).await? };
        Ok(response.tensors)
    }

    /// The small files of a LOADED model (configs, tokenizer): path, size and sha256, sorted by
    /// path, without their bytes.
    pub async fn files(&self, model_id: &str) -> Result<Vec<pb::ModelFile>, Error> {
        let request = pb::GetModelFilesRequest { model_id: model_id.to_owned() };
        Ok(self.unary("GetModelFiles", self.inner.clone().get_model_files(request)).await?.files)
    }

    /// One small file's bytes, from its chunks, each checked to follow the last. The whole read
    /// is one call under the request timeout (a file is at most 64 MiB).
    pub async fn read_file(&self, model_id: &str, path: &str) -> Result<Vec<u8>, Error> {
        let request = pb::ReadModelFileRequest { model_id: model_id.to_owned(), path: path.to_owned() };
        let mut inner = self.inner.clone();
        let read = async move {
            let mut stream = inner.read_model_file(request).await?.into_inner();
            let mut content = Vec::new();
            while let Some(chunk) = stream.message().await? {
                if chunk.offset != content.len() as u64 {
                    let message = format!("{path}: a chunk at {} where {} was next", chunk.offset, content.len());
                    return Err(Error::new(tonic::Code::DataLoss, "protocol", message));
                }
                content.extend(chunk.data);
            }
            Ok(content)
        };
        match self.request_timeout {
            Some(after) => {
                tokio::time::timeout(after, read).await.map_err(|_| Error::timeout("ReadModelFile", after))?
            }
            None => read.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unary call that gets no answer ends at the request timeout with kind `timeout`; a
    /// stream is never cut by it.
    #[tokio::test]
    async fn a_silent_server_times_out_unary_calls() {
        // Accepts connections and reads whatever comes, but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                let (mut reader, writer) = socket.into_split();
                held.push(writer);
                tokio::spawn(async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await });
            }
        });
        let after = Duration::from_millis(300);
        let options = ConnectOptions::new(addr.to_string()).request_timeout(Some(after));
        let bound = Duration::from_secs(30);
        let client =
            tokio::time::timeout(bound, Client::connect(&options)).await.expect("connect ends").expect("a TCP peer");
        let e =
            tokio::time::timeout(bound, client.get("demo")).await.expect("the timeout fires").expect_err("no answer");
        assert_eq!((e.code(), e.kind()), (tonic::Code::DeadlineExceeded, "timeout"), "{e}");
        assert!(e.to_string().starts_with("GetModel: no answer within"), "{e}");
        // A watch waits as long as it takes: still pending well past the request timeout.
        let watch = tokio::time::timeout(after * 3, client.watch(None)).await;
        assert!(watch.is_err(), "a stream is not cut by the request timeout");
    }
}
