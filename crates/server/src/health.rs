//! gRPC health (`grpc.health.v1`) whose Watch streams end at shutdown: tonic-health's own streams
//! last as long as their connection, so one open Watch would hold the shutdown for its whole grace.

use std::pin::Pin;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

/// The reporter that sets each service's status; the service answering Check and Watch; and the
/// token that, cancelled at shutdown (after NOT_SERVING is set), ends every Watch stream with
/// UNAVAILABLE once it has reported that.
pub fn service() -> (HealthReporter, HealthServer<EndAtShutdown>, CancellationToken) {
    let (reporter, stop) = (HealthReporter::new(), CancellationToken::new());
    let inner = HealthService::from_health_reporter(reporter.clone());
    (reporter, HealthServer::new(EndAtShutdown { inner, stop: stop.clone() }), stop)
}

/// tonic-health's service, its Watch streams ended at shutdown.
#[derive(Debug)]
pub struct EndAtShutdown {
    inner: HealthService,
    stop: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndAtShutdown {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let reports = self.inner.watch(request).await?.into_inner();
        let stop = self.stop.clone();
        // Reports first (NOT_SERVING is set before the stop), then one UNAVAILABLE, then the end.
        let stream = futures::stream::unfold(Some((reports, stop)), |state| async move {
            let (mut reports, stop) = state?;
            tokio::select! {
                biased;
                report = reports.next() => report.map(|report| (report, Some((reports, stop)))),
                () = stop.cancelled() => Some((Err(Status::unavailable("the server is shutting down")), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
