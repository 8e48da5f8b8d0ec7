//! Integration tests against servers running in this process (`tests::TestServer` on port 0) and
//! the test hub: one module per area, one binary, so the server is linked once. Nothing here starts
//! the real binary, Python or an object store: `just test-fast` runs these.

mod attach;
mod bad_input;
mod cancel_unload;
mod client;
mod concurrency;
mod dtype;
mod error_kind;
mod facade;
mod fanout;
mod hub_load;
mod kserve;
mod load;
mod model_files;
mod refusals;
mod single_flight;
mod watch;
