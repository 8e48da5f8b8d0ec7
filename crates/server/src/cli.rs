//! The command line: every flag is also an environment variable `MODEL_LOADER_<FLAG>`; the
//! Hugging Face ones also honour the usual `HF_*` variables. Parsed once into a [`ServerConfig`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{attach::AttachConfig, connections::ConnectionLimits, tls::TlsFiles, traces::OtlpConfig, web::CorsOrigin};

use clap::{Parser, ValueEnum, builder::PossibleValuesParser, builder::TypedValueParser as _};
use model_manager::{
    DEFAULT_EVENT_CAPACITY, EvictPolicy, HubConfig, ManagerConfig, ObjectConfig, SourceConfig, TargetDtype,
    resource_manager::{Layout, MemoryBudget, TargetRequest},
};

/// Where the server listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The bundled demo models, relative to the working directory (the repository root for
/// `cargo run`).
pub const DEFAULT_MODEL_ROOT: &str = "models";
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
pub const DEFAULT_HF_TIMEOUT: &str = "60s";

/// model-loader: a gRPC service that loads safetensors models onto a device, keeps them
/// resident, and streams every load's eight steps to its clients.
#[derive(Debug, Parser)]
#[command(name = "model-loader", version)]
pub struct Cli {
    /// Address to serve gRPC on.
    #[arg(long, env = "MODEL_LOADER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Folder of local models, one folder per model id (`name` or `org/name`).
    #[arg(long, env = "MODEL_LOADER_MODEL_ROOT", default_value = DEFAULT_MODEL_ROOT)]
    pub model_root: PathBuf,

    /// The Hugging Face hub cache [default: $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else
    /// $HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long, env = "MODEL_LOADER_HF_CACHE")]
    pub hf_cache: Option<PathBuf>,

    /// The Hugging Face Hub's base URL [default: $HF_ENDPOINT, else https://huggingface.co].
    #[arg(long, env = "MODEL_LOADER_HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,

    /// Token for the hub, sent as `Authorization: Bearer` [default: $HF_TOKEN]. Never logged.
    #[arg(long, env = "MODEL_LOADER_HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// How long the hub may send nothing (no answer, no byte) before a load fails with UNAVAILABLE.
    #[arg(long, env = "MODEL_LOADER_HF_TIMEOUT", default_value = DEFAULT_HF_TIMEOUT, value_parser = humantime::parse_duration)]
    pub hf_timeout: Duration,

    /// The S3-compatible endpoint for `s3://` ids (`http://127.0.0.1:9000`) [default:
    /// $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS]. Credentials come from the standard
    /// AWS_*, GOOGLE_* and AZURE_* variables; plain http needs AWS_ALLOW_HTTP=true or an http:// endpoint here.
    #[arg(long, env = "MODEL_LOADER_OBJECT_ENDPOINT")]
    pub object_endpoint: Option<String>,

    /// Bytes of one ranged GET of an object store's weights (at most a staging buffer for a GPU).
    #[arg(long, env = "MODEL_LOADER_OBJECT_CHUNK", default_value = "16MiB", value_parser = parse_size)]
    pub object_chunk: bytesize::ByteSize,

    /// Ranged GETs in flight at once for one load from an object store.
    #[arg(long, env = "MODEL_LOADER_OBJECT_CONCURRENCY", default_value_t = model_manager::DEFAULT_OBJECT_CONCURRENCY)]
    pub object_concurrency: usize,

    /// How long an object store may send nothing (no answer, no byte) before a GET is retried,
    /// and after the retries the load fails with UNAVAILABLE.
    #[arg(long, env = "MODEL_LOADER_OBJECT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub object_timeout: Duration,

    /// Bytes per second a ranged GET of an object store must average over each `--object-timeout`
    /// window; a store that trickles below it is retried like a silent one, then the load fails
    /// with UNAVAILABLE. 0 turns it off (only silence counts).
    #[arg(long, env = "MODEL_LOADER_OBJECT_MIN_THROUGHPUT", default_value = "16KiB", value_parser = parse_size)]
    pub object_min_throughput: bytesize::ByteSize,

    /// Never contact the hub (also set by HF_HUB_OFFLINE=1, ON, YES or TRUE, in any case).
    #[arg(long, env = "MODEL_LOADER_OFFLINE")]
    pub offline: bool,

    /// Device loads go to unless a request names one: "cpu", "cuda" or "cuda:N"; several GPUs as
    /// "cuda:0,cuda:1" or "cuda:*" (every GPU).
    #[arg(long, env = "MODEL_LOADER_DEVICE", default_value = "cpu", value_parser = clap::value_parser!(TargetRequest))]
    pub device: TargetRequest,

    /// How a model goes over several GPUs unless a request says: "split" (each tensor on one GPU,
    /// balanced by bytes) or "replicate" (a whole copy on each) [default: split].
    #[arg(long, env = "MODEL_LOADER_PLACEMENT", value_parser = clap::value_parser!(Layout))]
    pub placement: Option<Layout>,

    /// Convert floating-point tensors to this dtype unless a request names one [default: as stored].
    #[arg(long, env = "MODEL_LOADER_DTYPE", value_parser = clap::value_parser!(TargetDtype))]
    pub dtype: Option<TargetDtype>,

    /// Most memory models may hold on a device: bytes ("8GiB", "500MB") or a share ("75%") of its
    /// capacity (for the CPU: the cgroup's memory limit, else the memory available at start-up)
    /// [default: 80%].
    #[arg(long, env = "MODEL_LOADER_MEMORY_BUDGET", value_parser = clap::value_parser!(MemoryBudget))]
    pub memory_budget: Option<MemoryBudget>,

    /// Threads reading one load's weights [default: one per core].
    #[arg(long, env = "MODEL_LOADER_READ_THREADS")]
    pub read_threads: Option<usize>,

    /// Pinned host memory GPU loads read through, allocated once at start-up and only when the
    /// build and the machine have a GPU, in 4 MiB buffers: the default is two per reader thread
    /// on 16 cores; much more leaves the CPU's cache and loads slower.
    #[arg(long, env = "MODEL_LOADER_PINNED_POOL", default_value = "96MiB", value_parser = parse_size)]
    pub pinned_pool: bytesize::ByteSize,

    /// What to do when a load does not fit the budget: `none` refuses it with RESOURCE_EXHAUSTED;
    /// `lru` unloads least-recently-used loaded models until it fits (never one that is loading).
    #[arg(
        long,
        env = "MODEL_LOADER_EVICT",
        default_value_t = EvictPolicy::None,
        value_parser = PossibleValuesParser::new(["none", "lru"]).try_map(|s| s.parse::<EvictPolicy>()),
    )]
    pub evict: EvictPolicy,

    /// Loads that run at once; later ones wait in a queue (step 1, detail "queued: N ahead").
    #[arg(long, env = "MODEL_LOADER_MAX_CONCURRENT_LOADS", default_value_t = model_manager::DEFAULT_MAX_CONCURRENT_LOADS)]
    pub max_concurrent_loads: usize,

    /// Models to load at start-up (repeatable); readiness turns SERVING once they are loaded.
    #[arg(long, env = "MODEL_LOADER_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090) [default: off].
    #[arg(long, env = "MODEL_LOADER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve the attach socket at PATH: processes on this machine map LOADED models' memory
    /// read-only, zero-copy (CPU loads then go into sealed memfds) [default: off].
    #[arg(long, env = "MODEL_LOADER_ATTACH_SOCKET")]
    pub attach_socket: Option<PathBuf>,

    /// The attach socket's permissions, in octal: who may attach.
    #[arg(long, env = "MODEL_LOADER_ATTACH_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    pub attach_socket_mode: u32,

    /// Attach connections open at once; past it, a client is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MODEL_LOADER_ATTACH_MAX_CLIENTS", default_value_t = 1024)]
    pub attach_max_clients: usize,

    /// How long an attach client may take to send its request before it is disconnected.
    #[arg(long, env = "MODEL_LOADER_ATTACH_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub attach_request_timeout: Duration,

    /// Require a bearer token on the ModelLoader service: a file of `read:<token>` and
    /// `admin:<token>` lines (read again on SIGHUP). Health and reflection stay open [default: off].
    #[arg(long, env = "MODEL_LOADER_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key); reloaded when it
    /// changes [default: plaintext].
    #[arg(long, env = "MODEL_LOADER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "MODEL_LOADER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate signed by this PEM CA.
    #[arg(long, env = "MODEL_LOADER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Browser pages of this origin (`https://host:port`) may call over gRPC-web (repeatable, or
    /// comma-separated). The dashboard needs none when opened by IP address or localhost; opened
    /// by a DNS name, list that origin (a defence against DNS rebinding) [default: same origin].
    #[arg(long, env = "MODEL_LOADER_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<CorsOrigin>,

    /// Do not serve the dashboard page at `GET /` of the gRPC port (404 instead).
    #[arg(long, env = "MODEL_LOADER_NO_DASHBOARD")]
    pub no_dashboard: bool,

    /// gRPC connections open at once; when all are taken, a new one replaces the connection
    /// idle the longest (and is refused if none is idle).
    #[arg(long, env = "MODEL_LOADER_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,

    /// A connection with no request in flight for this long is closed.
    #[arg(long, env = "MODEL_LOADER_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// A connection must finish its TLS handshake and send its first request (or HTTP/2
    /// preface) within this.
    #[arg(long, env = "MODEL_LOADER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Requests (HTTP/2 streams) open at once on one connection; past it the client's new
    /// streams are refused.
    #[arg(long, env = "MODEL_LOADER_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024)]
    pub max_streams_per_connection: u32,

    /// WatchModels streams open at once in all; past it, WatchModels is RESOURCE_EXHAUSTED.
    #[arg(long, env = "MODEL_LOADER_MAX_WATCHERS", default_value_t = 256)]
    pub max_watchers: usize,

    /// Log format.
    #[arg(long, env = "MODEL_LOADER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Export traces (gRPC calls, loads, their steps) over OTLP/gRPC to this collector, e.g.
    /// `http://127.0.0.1:4317` [default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    /// $OTEL_EXPORTER_OTLP_ENDPOINT, else off]. The service name is $OTEL_SERVICE_NAME, else
    /// `model-loader`.
    #[arg(long, env = "MODEL_LOADER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// How long shutdown may take before remaining connections are dropped.
    #[arg(long, env = "MODEL_LOADER_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE, value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// A size in bytes: `96MiB`, `1GiB`, `500MB` or plain bytes.
fn parse_size(text: &str) -> Result<bytesize::ByteSize, InvalidSize> {
    text.trim().parse().map_err(InvalidSize)
}

/// Permissions in octal (`660`, `0600`).
fn parse_mode(text: &str) -> Result<u32, InvalidMode> {
    u32::from_str_radix(text.trim(), 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| InvalidMode(text.to_owned()))
}

/// A mode flag that is not octal permissions.
#[derive(Debug, thiserror::Error)]
#[error("not octal permissions (such as 660): {0}")]
pub struct InvalidMode(String);

/// A size flag that is not a size.
#[derive(Debug, thiserror::Error)]
#[error("not a size: {0}")]
pub struct InvalidSize(String);

/// Flags that parse but do not make a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--preload: {0}")]
    Preload(#[source] model_manager::InvalidRequest),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub manager: ManagerConfig,
    pub preload: Vec<model_manager::ModelId>,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Where traces go; `None`: nowhere.
    pub otlp: Option<OtlpConfig>,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The attach socket; `None`: off.
    pub attach: Option<AttachConfig>,
    pub security: SecurityConfig,
}

/// Who may call, over what, and how much (SPEC §11).
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// The bearer-token file; `None`: no auth.
    pub auth_token_file: Option<PathBuf>,
    /// `None`: plaintext.
    pub tls: Option<TlsFiles>,
    pub connections: ConnectionLimits,
    pub max_streams_per_connection: u32,
    pub max_watchers: usize,
    /// Origins other than its own whose pages may call over gRPC-web.
    pub cors_origins: Vec<CorsOrigin>,
    /// Whether the dashboard page is served (without a token: its calls need one).
    pub dashboard: bool,
}

impl Default for SecurityConfig {
    /// No auth, plaintext, the flags' default limits.
    fn default() -> Self {
        Self {
            auth_token_file: None,
            tls: None,
            connections: ConnectionLimits::default(),
            max_streams_per_connection: 1024,
            max_watchers: 256,
            cors_origins: Vec::new(),
            dashboard: true,
        }
    }
}

impl Cli {
    /// Validates the flags into a [`ServerConfig`]; `env` looks up the HF variables.
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<ServerConfig, ConfigError> {
        let preload = self
            .preload
            .iter()
            .map(|id| model_manager::ModelId::parse(id).map_err(ConfigError::Preload))
            .collect::<Result<_, _>>()?;
        let offline = self.offline || env("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        let hf_cache = self.hf_cache.or_else(|| default_hf_cache(&env));
        let mut manager = ManagerConfig {
            budget: self.memory_budget.unwrap_or_default(),
            default_device: self.device,
            default_placement: self.placement,
            pinned_pool_bytes: self.pinned_pool.as_u64(),
            event_capacity: DEFAULT_EVENT_CAPACITY,
            ..ManagerConfig::default()
        };
        let hub = HubConfig {
            endpoint: self.hf_endpoint.or_else(|| env("HF_ENDPOINT")).filter(|e| !e.is_empty()),
            token: self.hf_token.or_else(|| env("HF_TOKEN")).filter(|t| !t.is_empty()),
            stall_timeout: self.hf_timeout,
        };
        let object = ObjectConfig {
            endpoint: self.object_endpoint.filter(|e| !e.is_empty()),
            chunk_bytes: usize::try_from(self.object_chunk.as_u64()).unwrap_or(usize::MAX).max(4096),
            concurrency: self.object_concurrency.max(1),
            stall_timeout: self.object_timeout,
            min_throughput: self.object_min_throughput.as_u64(),
        };
        manager.loader.sources = SourceConfig { model_root: Some(self.model_root), hf_cache, offline, hub, object };
        manager.loader.default_dtype = self.dtype;
        manager.loader.max_concurrent_loads = self.max_concurrent_loads.max(1);
        if let Some(threads) = self.read_threads {
            manager.loader.read_threads = threads.max(1);
        }
        manager.loader.evict = self.evict;
        manager.loader.exportable = self.attach_socket.is_some();
        let otlp = self
            .otlp_endpoint
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|e| !e.is_empty())
            .map(|endpoint| OtlpConfig {
                endpoint,
                service_name: env("OTEL_SERVICE_NAME")
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| crate::traces::SERVICE_NAME.to_owned()),
            });
        let attach = self.attach_socket.map(|path| AttachConfig {
            path,
            mode: self.attach_socket_mode,
            max_clients: self.attach_max_clients.max(1),
            request_timeout: self.attach_request_timeout,
        });
        Ok(ServerConfig {
            listen: self.listen,
            manager,
            preload,
            shutdown_grace: self.shutdown_grace,
            log_format: self.log_format,
            otlp,
            metrics_listen: self.metrics_listen,
            attach,
            security: SecurityConfig {
                auth_token_file: self.auth_token_file,
                tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                }),
                connections: ConnectionLimits {
                    max_connections: self.max_connections.max(1),
                    idle_timeout: self.idle_timeout,
                    handshake_timeout: self.handshake_timeout,
                },
                max_streams_per_connection: self.max_streams_per_connection.max(1),
                max_watchers: self.max_watchers.max(1),
                cors_origins: self.cors_origin,
                dashboard: !self.no_dashboard,
            },
        })
    }
}

/// A true boolean environment variable as huggingface_hub reads one: `1`, `ON`, `YES` or `TRUE`
/// in any case.
fn is_true(value: &str) -> bool {
    ["1", "ON", "YES", "TRUE"].iter().any(|t| value.trim().eq_ignore_ascii_case(t))
}

/// `$HF_HUB_CACHE`, else the older `$HUGGINGFACE_HUB_CACHE` (still set by many images), else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (as huggingface_hub).
fn default_hf_cache(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(cache) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return Some(cache.into());
    }
    if let Some(home) = env("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    let base =
        env("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("huggingface").join("hub"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags, refused by clap or by [`Cli::into_config`].
    #[derive(Debug, thiserror::Error)]
    enum Refused {
        #[error(transparent)]
        Flags(#[from] clap::Error),
        #[error(transparent)]
        Config(#[from] ConfigError),
    }

    impl Refused {
        fn contains(&self, text: &str) -> bool {
            self.to_string().contains(text)
        }
    }

    fn parse(args: &[&str]) -> Result<ServerConfig, Refused> {
        let cli = Cli::try_parse_from(std::iter::once("model-loader").chain(args.iter().copied()))?;
        Ok(cli.into_config(|name| match name {
            "HF_HOME" => Some("/hf".into()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        })?)
    }

    /// With no flags the server listens on the default address with the bundled model root.
    #[test]
    fn defaults() {
        let config = parse(&[]).expect("defaults are valid");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.manager.loader.sources.model_root, Some(PathBuf::from("models")));
        assert_eq!(config.manager.loader.sources.hf_cache, Some(PathBuf::from("/hf/hub")));
        assert!(config.manager.loader.sources.offline, "HF_HUB_OFFLINE=1 is honoured");
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }

    /// `HF_HUB_OFFLINE` means offline for every value huggingface_hub takes as true, in any case,
    /// and for nothing else; the cache is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
    /// `HF_HOME/hub`.
    #[test]
    fn hf_variables_are_read_as_huggingface_hub_reads_them() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            let cli = Cli::try_parse_from(["model-loader"]).expect("no flags");
            cli.into_config(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())).expect("valid")
        };
        for value in ["1", "TRUE", "true", "True", "ON", "on", "YES", "yes"] {
            assert!(with(&[("HF_HUB_OFFLINE", value)]).manager.loader.sources.offline, "HF_HUB_OFFLINE={value}");
        }
        for value in ["0", "false", "off", "no", ""] {
            assert!(!with(&[("HF_HUB_OFFLINE", value)]).manager.loader.sources.offline, "HF_HUB_OFFLINE={value}");
        }
        let cache = |vars: &[(&str, &str)]| with(vars).manager.loader.sources.hf_cache;
        assert_eq!(cache(&[("HUGGINGFACE_HUB_CACHE", "/legacy"), ("HF_HOME", "/hf")]), Some("/legacy".into()));
        assert_eq!(cache(&[("HF_HUB_CACHE", "/new"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]), Some("/new".into()));
        assert_eq!(cache(&[("HF_HOME", "/hf")]), Some("/hf/hub".into()));
    }

    /// The dashboard is on by default and `--no-dashboard` turns it off; `--cors-origin` takes a
    /// list of origins and refuses anything else.
    #[test]
    fn web_flags() {
        let web =
            parse(&["--cors-origin", "https://a.example,http://b.example:8080", "--no-dashboard"]).expect("valid");
        assert_eq!(web.security.cors_origins.len(), 2);
        assert!(!web.security.dashboard);
        assert!(parse(&[]).expect("valid").security.dashboard);
        assert!(parse(&["--cors-origin", "a.example"]).expect_err("bad origin").contains("--cors-origin"));
    }

    /// Traces are off unless `--otlp-endpoint` or one of OpenTelemetry's endpoint variables names a
    /// collector (the flag first, then the traces variable, then the general one); the service name
    /// is `OTEL_SERVICE_NAME`'s, else `model-loader`.
    #[test]
    fn otlp_endpoint_from_the_flag_or_opentelemetry_variables() {
        let otlp = |args: &[&str], vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            let cli = Cli::try_parse_from(std::iter::once("model-loader").chain(args.iter().copied())).expect("flags");
            cli.into_config(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                .expect("valid")
                .otlp
        };
        assert_eq!(otlp(&[], &[]), None);
        assert_eq!(otlp(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), None);
        let flag = otlp(&["--otlp-endpoint", "http://a:4317"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://b:4317")]);
        assert_eq!(flag, Some(OtlpConfig { endpoint: "http://a:4317".into(), service_name: "model-loader".into() }));
        let general =
            otlp(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://b:4317"), ("OTEL_SERVICE_NAME", "ml")]).expect("on");
        assert_eq!((general.endpoint.as_str(), general.service_name.as_str()), ("http://b:4317", "ml"));
        let vars =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://b:4317"), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")];
        assert_eq!(otlp(&[], &vars).expect("on").endpoint, "http://c:4317");
    }

    /// Flags are validated into typed values; bad ones are refused with the flag's name.
    #[test]
    fn flags_are_validated() {
        let config =
            parse(&["--dtype", "bf16", "--memory-budget", "2GiB", "--preload", "a/b,c", "--shutdown-grace", "3s"])
                .expect("valid");
        assert_eq!(config.manager.loader.default_dtype, Some(TargetDtype::BF16));
        assert_eq!(config.manager.budget, MemoryBudget::Bytes(2 << 30));
        assert_eq!(config.preload.len(), 2);
        assert_eq!(config.manager.loader.evict, EvictPolicy::None);
        assert_eq!(parse(&["--evict", "lru"]).expect("valid").manager.loader.evict, EvictPolicy::Lru);
        assert!(parse(&["--evict", "fifo"]).is_err());
        assert!(parse(&["--device", "gpu"]).expect_err("bad device").contains("--device"));
        // Several GPUs parse here; whether the machine has them is the start-up's to say.
        let gpus = parse(&["--device", "cuda:0,cuda:1", "--placement", "replicate"]).expect("valid");
        assert_eq!(
            (gpus.manager.default_device, gpus.manager.default_placement),
            ("cuda:0,cuda:1".parse().expect("two GPUs"), Some(model_manager::resource_manager::Layout::Replicate))
        );
        assert!(parse(&["--placement", "mirror"]).expect_err("bad placement").contains("--placement"));
        assert!(parse(&["--dtype", "int4"]).expect_err("bad dtype").contains("--dtype"));
        assert!(parse(&["--preload", "../x"]).expect_err("bad id").contains("--preload"));
        assert!(parse(&["--memory-budget", "lots"]).is_err());
        let tuned = parse(&["--read-threads", "6", "--pinned-pool", "1GiB"]).expect("valid");
        assert_eq!(tuned.manager.loader.read_threads, 6);
        assert_eq!(tuned.manager.pinned_pool_bytes, 1 << 30);
        assert_eq!(parse(&[]).expect("valid").manager.pinned_pool_bytes, model_manager::DEFAULT_PINNED_POOL_BYTES);
        assert!(parse(&["--pinned-pool", "half"]).expect_err("bad size").contains("--pinned-pool"));
    }
}
