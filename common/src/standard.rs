//! The standard gRPC services every Ferry server answers beside its own, so grpcurl and
//! load balancers can use them: health (`grpc.health.v1`, open to anonymous peers, see
//! `tls`) and reflection (`grpc.reflection.v1` and `v1alpha`, for enrolled peers).
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

#[derive(Debug, thiserror::Error)]
pub enum StandardError {
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// Adds health and reflection to `router`, which serves `services`; `watch` (spawned by
/// the caller with the reporter) keeps the health service true. Reflection names only
/// the services this server answers (the descriptors hold every `ferry.v1` service).
pub fn add<L>(
    router: Router<L>,
    services: &[&str],
) -> Result<(Router<L>, HealthReporter), StandardError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for name in services.iter().chain(&[
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(*name);
        }
        b
    };
    let v1 = reflection().build_v1().map_err(StandardError::Reflection)?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(StandardError::Reflection)?;
    // Anonymous peers reach the health check: it decodes no more than an enrollment.
    let health = health.max_decoding_message_size(crate::tls::ENROLL_MESSAGE_BYTES);
    Ok((
        router
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha),
        reporter,
    ))
}

/// Keeps the health service true: `services` and the whole server serve until the
/// store fails or shutdown begins, then not (a load balancer sends no new calls while
/// the daemon stops).
pub async fn watch(
    mut reporter: HealthReporter,
    services: &'static [&'static str],
    shutdown: CancellationToken,
) {
    let names = || std::iter::once(&"").chain(services);
    for name in names() {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let failed = crate::store::failed();
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = failed.cancelled() => tracing::error!("health: not serving, the state store has failed"),
    }
    for name in names() {
        reporter
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
}
