//! gRPC faces of the cloud manager, the only code that speaks the wire types: each call
//! turns its request into the service's domain types (`wire`), ingest calls check the
//! caller's role each, the control API is checked once by `operator_only`, and errors
//! become statuses through `fail` (`to_status`), nowhere else.
mod wire;

use crate::actions::CloneOp;
use crate::cloud::Cloud;
use crate::error::{CloudError, Result};
use crate::ingest::{require_ingest, Enrollment};
use crate::jobs::{JobKind, JobResult, JobState};
use crate::replication::SettingsChange;
use ferry_common::error::{to_status, ErrorKind, Kind};
use ferry_common::pki::{Identity, Role};
use ferry_common::tls::peer;
use ferry_proto::v1 as pb;
use ferry_proto::MAX_MESSAGE_BYTES;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone)]
pub struct Grpc {
    pub cloud: Arc<Cloud>,
    /// The web console, when it is served.
    pub console: Option<Arc<crate::console::Console>>,
}

fn identity<T>(req: &Request<T>) -> Option<Identity> {
    peer(req).and_then(|p| p.identity.clone())
}

/// Logs a failed or refused call (refusals also count in the metrics) and maps it to its
/// status: the one way an error leaves the cloud manager.
fn fail(cloud: &Cloud, op: &str, who: Option<&Identity>, e: CloudError) -> Status {
    if matches!(
        e.kind(),
        Kind::InvalidArgument | Kind::PermissionDenied | Kind::Unauthenticated
    ) {
        cloud.refused();
        tracing::warn!(op, peer = ?who.map(|i| i.to_string()), error = %e, "request refused");
    } else {
        tracing::warn!(op, peer = ?who.map(|i| i.to_string()), error = %e, "request failed");
    }
    to_status(&e)
}

/// The caller of a control call: an operator.
pub fn require_operator(peer: Option<&Identity>) -> Result<&Identity> {
    match peer {
        Some(id) if id.role == Role::Operator => Ok(id),
        Some(id) => Err(CloudError::PermissionDenied(format!(
            "{id} may not use the control api"
        ))),
        None => Err(CloudError::Unauthenticated),
    }
}

/// The name of the site calling: tasks are for sites alone.
fn require_site(peer: Option<&Identity>) -> Result<String> {
    match peer {
        Some(id) if id.role == Role::Site => Ok(id.name.clone()),
        Some(id) => Err(CloudError::PermissionDenied(format!(
            "{id} is no site: tasks are for sites"
        ))),
        None => Err(CloudError::Unauthenticated),
    }
}

/// The control API is the operator's alone: one check in front of every call.
#[allow(clippy::result_large_err)] // tonic's interceptor answers with a `Status`
pub fn operator_only(
    cloud: Arc<Cloud>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let who = identity(&req);
        match require_operator(who.as_ref()) {
            Ok(_) => Ok(req),
            Err(e) => Err(fail(&cloud, "control", who.as_ref(), e)),
        }
    }
}

/// Serves the three APIs, with health and reflection, over mTLS on `listener` until
/// `shutdown`.
pub async fn serve(
    cloud: Arc<Cloud>,
    console: Option<Arc<crate::console::Console>>,
    listener: tokio::net::TcpListener,
    tls: ferry_common::tls::ServerTls,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), crate::RunError> {
    let grpc = Grpc {
        cloud: cloud.clone(),
        console,
    };
    let incoming = ferry_common::tls::incoming(listener, tls, shutdown.clone());
    let router = ferry_common::tls::grpc_server(cloud.ingest.revoked.clone())
        .add_service(
            pb::enrollment_server::EnrollmentServer::new(grpc.clone())
                .max_decoding_message_size(ferry_common::tls::ENROLL_MESSAGE_BYTES),
        )
        .add_service(
            pb::ingest_server::IngestServer::new(grpc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::control_server::ControlServer::new(grpc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            operator_only(cloud),
        ));
    const SERVED: &[&str] = &["ferry.v1.Enrollment", "ferry.v1.Ingest", "ferry.v1.Control"];
    let (router, health) = ferry_common::standard::add(router, SERVED)?;
    tracker.spawn(ferry_common::standard::watch(
        health,
        SERVED,
        shutdown.clone(),
    ));
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Who started a job, as its record says.
fn operator(who: &Option<Identity>) -> String {
    who.as_ref().map(|i| i.to_string()).unwrap_or_default()
}

impl Grpc {
    fn fail(&self, op: &str, who: Option<&Identity>, e: CloudError) -> Status {
        fail(&self.cloud, op, who, e)
    }

    /// Suspends, resumes or terminates a clone as a job of one step.
    #[allow(clippy::result_large_err)] // what every tonic handler returns
    fn clone_job(
        &self,
        req: Request<pb::CloneRequest>,
        op: CloneOp,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let name = req.into_inner().name;
        let r = self.cloud.start_clone_op(&name, op, &operator(&who));
        self.reply(op.kind().as_str(), who, r.map(wire::job))
    }

    #[allow(clippy::result_large_err)] // what every tonic handler returns
    fn push_job(
        &self,
        req: Request<pb::InstallAgentsRequest>,
        uninstall: bool,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let op = if uninstall {
            "uninstall-agents"
        } else {
            "install-agents"
        };
        let r = wire::push_spec(req.into_inner()).and_then(|spec| {
            self.cloud
                .start_agent_push(spec, uninstall, &operator(&who))
        });
        self.reply(op, who, r.map(wire::job))
    }

    /// A call's result as its answer.
    #[allow(clippy::result_large_err)] // what every tonic handler returns
    fn reply<T, W: Into<T>>(
        &self,
        op: &str,
        who: Option<Identity>,
        r: Result<W, CloudError>,
    ) -> Result<Response<T>, Status> {
        r.map(|w| Response::new(w.into()))
            .map_err(|e| self.fail(op, who.as_ref(), e))
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for Grpc {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let cloud = self.cloud.clone();
        let via = identity(&req);
        let r = Enrollment {
            via,
            ..req.into_inner().into()
        };
        let r = crate::error::blocking(move || cloud.ingest.enroll(r)).await;
        self.reply("enroll", None, r)
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let who = identity(&req);
        let cloud = self.cloud.clone();
        let shown = peer(&req).and_then(|p| Some((p.cert.clone()?, p.cert_der.clone()?)));
        let r = match shown {
            None => Err(CloudError::Unauthenticated),
            Some((cert, der)) => {
                let renewal = req.into_inner().into();
                crate::error::blocking(move || cloud.ingest.renew(&cert, &der, renewal)).await
            }
        };
        self.reply("renew", who, r)
    }

    async fn revocations(
        &self,
        req: Request<pb::RevocationsRequest>,
    ) -> Result<Response<pb::RevocationsResponse>, Status> {
        let who = identity(&req);
        let r = match &who {
            Some(id) if matches!(id.role, Role::Site | Role::Operator) => {
                Ok(wire::revocations(self.cloud.ingest.revocations()))
            }
            Some(id) => Err(CloudError::PermissionDenied(format!(
                "{id} has no use for the revocation list"
            ))),
            None => Err(CloudError::Unauthenticated),
        };
        self.reply("revocations", who, r)
    }
}

/// Bytes of frames checked and staged together, off the async workers.
const STAGE_GROUP: u64 = 4 << 20;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for Grpc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = identity(&req);
        let cert = peer(&req).and_then(|p| p.cert.clone());
        let r = async {
            let id = require_ingest(who.as_ref())?;
            // Revoked while its body was on the way?
            self.cloud.ingest.check_live(cert.as_ref())?;
            self.cloud
                .ingest
                .register(id, req.into_inner().into())
                .await
        }
        .await;
        self.reply("register", who, r)
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksResponse>, Status> {
        let who = identity(&req);
        let r = async {
            require_ingest(who.as_ref())?;
            let hashes = wire::hashes(req.get_ref())?;
            let keeps = req.get_ref().asker_keeps_copy;
            let missing = self.cloud.ingest.missing(hashes, keeps).await?;
            Ok(pb::MissingChunksResponse { missing })
        }
        .await;
        self.reply("missing-chunks", who, r)
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::ChunkFrame>>,
    ) -> Result<Response<pb::PutChunksResponse>, Status> {
        let who = identity(&req);
        require_ingest(who.as_ref()).map_err(|e| self.fail("put-chunks", who.as_ref(), e))?;
        let ingest = &self.cloud.ingest;
        let fail = |e: CloudError| {
            ingest.storage_error(&e);
            self.fail("put-chunks", who.as_ref(), e)
        };
        let mut stream = req.into_inner();
        let (mut staged, mut duplicate) = (Vec::new(), 0);
        let mut took = |r: Option<Result<(Vec<ferry_common::chunks::Staged>, u64)>>| {
            let (s, d) = r.transpose()?.unwrap_or_default();
            staged.extend(s);
            duplicate += d;
            Ok::<_, CloudError>(())
        };
        let mut groups = ferry_common::chunks::Groups::new(STAGE_GROUP);
        loop {
            let frame = stream.message().await?;
            let end = frame.is_none();
            if let Some(frame) = frame {
                let f = wire::frame(frame).map_err(fail)?;
                let n = f.zdata.len() as u64;
                groups.push(f, n);
            }
            if groups.full() || end {
                let cloud = self.cloud.clone();
                let r = groups.hand(move |frames| cloud.ingest.stage_frames(frames));
                took(r.await.map_err(CloudError::Worker).map_err(fail)?).map_err(fail)?;
            }
            if end {
                break;
            }
        }
        let r = groups
            .finish()
            .await
            .map_err(CloudError::Worker)
            .map_err(fail)?;
        took(r).map_err(fail)?;
        let stored = ingest.publish_chunks(staged).await.map_err(fail)?;
        Ok(Response::new(pb::PutChunksResponse { stored, duplicate }))
    }

    async fn apply_batch(
        &self,
        req: Request<pb::Batch>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let who = identity(&req);
        let cert = peer(&req).and_then(|p| p.cert.clone());
        let r = async {
            let id = require_ingest(who.as_ref())?;
            self.cloud.ingest.check_live(cert.as_ref())?;
            self.cloud
                .ingest
                .apply_batch(id, req.into_inner().into())
                .await
        }
        .await;
        self.reply("apply-batch", who, r)
    }

    async fn site_report(
        &self,
        req: Request<pb::SiteReportRequest>,
    ) -> Result<Response<pb::SiteReportResponse>, Status> {
        let who = identity(&req);
        let r = async {
            let id = require_ingest(who.as_ref())?;
            let version = req
                .metadata()
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .and_then(ferry_common::version::Peer::from_tokens);
            let letters = req.into_inner().dead_letters;
            let letters = letters.into_iter().map(Into::into).collect();
            self.cloud.ingest.site_report(id, letters, version).await
        }
        .await;
        self.reply("site-report", who, r.map(|()| pb::SiteReportResponse {}))
    }

    async fn report_discovery(
        &self,
        req: Request<pb::DiscoveryReport>,
    ) -> Result<Response<pb::DiscoveryAck>, Status> {
        let who = identity(&req);
        let r = require_ingest(who.as_ref()).and_then(|id| {
            let rec = req.into_inner().try_into()?;
            self.cloud.report_discovery(id, rec)
        });
        self.reply("report-discovery", who, r.map(|()| pb::DiscoveryAck {}))
    }

    type SiteTasksStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SiteTask, Status>> + Send>>;

    async fn site_tasks(
        &self,
        req: Request<pb::SiteTasksRequest>,
    ) -> Result<Response<Self::SiteTasksStream>, Status> {
        let who = identity(&req);
        let site = match require_site(who.as_ref()) {
            Ok(site) => site,
            Err(e) => return Err(self.fail("site-tasks", who.as_ref(), e)),
        };
        let Some(cert) = peer(&req).and_then(|p| p.cert.clone()) else {
            return Err(self.fail("site-tasks", who.as_ref(), CloudError::Unauthenticated));
        };
        let rx = self.cloud.tasks.attach(&site, cert);
        let tasks = tokio_stream::wrappers::ReceiverStream::new(rx);
        #[allow(clippy::result_large_err)] // a stream item is what tonic takes
        let tasks = futures::StreamExt::map(tasks, |t| Ok(pb::SiteTask::from(t)));
        Ok(Response::new(Box::pin(tasks)))
    }

    async fn site_task_done(
        &self,
        req: Request<pb::SiteTaskOutcome>,
    ) -> Result<Response<pb::SiteTaskAck>, Status> {
        let who = identity(&req);
        let r = require_site(who.as_ref()).and_then(|site| {
            let outcome = (req.into_inner().try_into())
                .map_err(|e: ferry_common::push::Malformed| CloudError::Invalid(e.to_string()))?;
            self.cloud.tasks.done(&site, outcome)
        });
        self.reply("site-task-done", who, r.map(|()| pb::SiteTaskAck {}))
    }

    async fn progress(
        &self,
        req: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let who = identity(&req);
        let q = req.get_ref();
        let r = require_ingest(who.as_ref()).and_then(|id| {
            (self.cloud.ingest).progress(id, &q.system, q.pending_since_ms, q.pending_bytes)
        });
        self.reply("progress", who, r)
    }
}

/// Every call here passed `operator_only` first.
#[tonic::async_trait]
impl pb::control_server::Control for Grpc {
    async fn list_systems(
        &self,
        req: Request<pb::ListSystemsRequest>,
    ) -> Result<Response<pb::ListSystemsResponse>, Status> {
        let r = self.cloud.replication.list(&req.get_ref().name);
        let r = r.map(|s| pb::ListSystemsResponse {
            systems: s.into_iter().map(Into::into).collect(),
        });
        self.reply("list-systems", identity(&req), r)
    }

    async fn sync_status(
        &self,
        req: Request<pb::SyncStatusRequest>,
    ) -> Result<Response<pb::SyncStatusResponse>, Status> {
        let replication = &self.cloud.replication;
        let r = replication.list("").map(|s| pb::SyncStatusResponse {
            systems: s.into_iter().map(Into::into).collect(),
            counters: Some(self.cloud.counters.snapshot().into()),
            last_error: replication.last_error(),
            dead_letters: (self.cloud.ingest.dead_letters().into_iter())
                .map(Into::into)
                .collect(),
        });
        self.reply("sync-status", identity(&req), r)
    }

    async fn replica_path(
        &self,
        req: Request<pb::ReplicaPathRequest>,
    ) -> Result<Response<pb::ReplicaPathResponse>, Status> {
        let q = req.get_ref();
        let r = self
            .cloud
            .replication
            .replica_path(&q.system, &q.mount_point);
        let r = r.map(|p| pb::ReplicaPathResponse {
            path: p.display().to_string(),
        });
        self.reply("replica-path", identity(&req), r)
    }

    async fn set_replication(
        &self,
        req: Request<pb::SetReplicationRequest>,
    ) -> Result<Response<pb::SetReplicationResponse>, Status> {
        let q = req.get_ref();
        let change = SettingsChange {
            paused: q.set_paused.then_some(q.paused),
            rate_limit_bps: q.set_rate_limit.then_some(q.rate_limit_bps),
        };
        let r = self.cloud.replication.set(&q.system, change).await;
        let r = r.map(|s| pb::SetReplicationResponse {
            paused: s.paused,
            rate_limit_bps: s.rate_limit_bps,
        });
        self.reply("set-replication", identity(&req), r)
    }

    async fn allow_move(
        &self,
        req: Request<pb::AllowMoveRequest>,
    ) -> Result<Response<pb::AllowMoveResponse>, Status> {
        let who = identity(&req);
        let q = req.into_inner();
        let r = (self.cloud.replication)
            .allow_move(&q.system, &q.fs_id, q.mount_point)
            .await
            .map(|()| pb::AllowMoveResponse {});
        self.reply("allow-move", who, r)
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let r = self.cloud.ingest.tokens().map(|t| pb::ListTokensResponse {
            tokens: t.into_iter().map(wire::token_info).collect(),
        });
        self.reply("list-tokens", identity(&req), r)
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = identity(&req);
        let r = (self.cloud.ingest)
            .revoke_token(&req.get_ref().id)
            .map(|()| pb::RevokeTokenResponse {});
        self.reply("revoke-token", who, r)
    }

    async fn versions(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsResponse>, Status> {
        let r = self
            .cloud
            .ingest
            .versions()
            .map(|all| pb::VersionsResponse {
                components: all.into_iter().map(Into::into).collect(),
            });
        self.reply("versions", identity(&req), r)
    }

    async fn list_sites(
        &self,
        req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        let r = self.cloud.ingest.sites().map(|s| pb::ListSitesResponse {
            sites: s
                .into_iter()
                .map(|(name, systems)| pb::SiteInfo { name, systems })
                .collect(),
        });
        self.reply("list-sites", identity(&req), r)
    }

    async fn bind_site(
        &self,
        req: Request<pb::BindSiteRequest>,
    ) -> Result<Response<pb::BindSiteResponse>, Status> {
        let who = identity(&req);
        let q = req.into_inner();
        let r = (self.cloud.ingest)
            .bind_site(&q.site, &q.systems)
            .map(|()| pb::BindSiteResponse {});
        self.reply("bind-site", who, r)
    }

    async fn remove_system(
        &self,
        req: Request<pb::RemoveSystemRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let who = identity(&req);
        let r = self.cloud.remove_system(&req.get_ref().name).await;
        self.reply(
            "remove-system",
            who,
            r.map(|done| pb::RevokeResponse { done }),
        )
    }

    async fn revoke_site(
        &self,
        req: Request<pb::RevokeSiteRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let who = identity(&req);
        let r = self.cloud.ingest.revoke_site(&req.get_ref().name);
        self.reply(
            "revoke-site",
            who,
            r.map(|done| pb::RevokeResponse { done }),
        )
    }

    async fn revoke_operator(
        &self,
        req: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let who = identity(&req);
        let r = Identity::new(Role::Operator, &req.get_ref().name)
            .map_err(CloudError::from)
            .and_then(|id| {
                // The last door to the control API stays with whoever holds it.
                if who.as_ref() == Some(&id) {
                    return Err(CloudError::Invalid(format!(
                        "{id} cannot revoke itself: ask another operator"
                    )));
                }
                self.cloud.ingest.revoke(&id)?;
                Ok(pb::RevokeResponse {
                    done: vec![format!("{id} revoked: its certificates are refused")],
                })
            });
        self.reply("revoke-operator", who, r)
    }

    async fn list_revoked(
        &self,
        req: Request<pb::RevocationsRequest>,
    ) -> Result<Response<pb::RevocationsResponse>, Status> {
        let r = Ok(wire::revocations(self.cloud.ingest.revocations()));
        self.reply("list-revoked", identity(&req), r)
    }

    async fn resize_replica(
        &self,
        req: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::ResizeReplicaResponse>, Status> {
        let who = identity(&req);
        let q = req.into_inner();
        let r = (self.cloud.replication)
            .resize(&q.system, &q.fs_id, q.size_bytes)
            .await
            .map(|s| pb::ResizeReplicaResponse {
                size_bytes: s.size,
                free_bytes: s.free,
            });
        self.reply("resize-replica", who, r)
    }

    async fn file_db_add(
        &self,
        req: Request<pb::FileDbAddRequest>,
    ) -> Result<Response<pb::FileDbEntry>, Status> {
        let who = identity(&req);
        let r = async {
            let (entry, contents) = wire::filedb_add(req.into_inner())?;
            self.cloud.images.filedb_add(entry, contents).await
        }
        .await;
        self.reply("filedb-add", who, r)
    }

    async fn file_db_list(
        &self,
        req: Request<pb::FileDbListRequest>,
    ) -> Result<Response<pb::FileDbListResponse>, Status> {
        let r = self
            .cloud
            .images
            .filedb_list()
            .map(|l| pb::FileDbListResponse {
                entries: l.into_iter().map(Into::into).collect(),
            });
        self.reply("filedb-list", identity(&req), r)
    }

    async fn prepare_system(
        &self,
        req: Request<pb::PrepareSystemRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let r = (|| {
            let spec: crate::images::PrepareSpec = req.into_inner().try_into()?;
            self.cloud.replication.require(&spec.system)?;
            let (cloud, system) = (self.cloud.clone(), spec.system.clone());
            self.cloud.jobs.start(
                JobKind::Customize,
                &system,
                &operator(&who),
                move |job| async move {
                    // A fresh copy: the report shows every change customization makes.
                    let prepared = cloud.images.prepare(spec, &job, false).await?;
                    Ok(JobResult::from(prepared))
                },
            )
        })();
        self.reply("prepare-system", who, r.map(wire::job))
    }

    async fn build_image(
        &self,
        req: Request<pb::BuildImageRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let r = (|| {
            let q = req.into_inner();
            let spec = crate::images::PrepareSpec {
                system: q.system,
                target: wire::target(q.target)?,
                services: q.services,
                gateway: Vec::new(),
                dry_run: false,
            };
            self.cloud.replication.require(&spec.system)?;
            let (cloud, system, skip) =
                (self.cloud.clone(), spec.system.clone(), q.skip_boot_check);
            self.cloud.jobs.start(
                JobKind::ImageBuild,
                &system,
                &operator(&who),
                move |job| async move {
                    job.plan(crate::images::build_steps(spec.target));
                    let image = cloud.images.build(spec, skip, "", &job).await?;
                    Ok(JobResult::Images(vec![image]))
                },
            )
        })();
        self.reply("build-image", who, r.map(wire::job))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let r = self.cloud.images.list().map(wire::images);
        self.reply("list-images", identity(&req), r)
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let r = self.cloud.delete_image(&req.get_ref().id).await;
        let r = r.map(|()| pb::DeleteImageResponse {});
        self.reply("delete-image", identity(&req), r)
    }

    async fn create_app(&self, req: Request<pb::AppInfo>) -> Result<Response<pb::AppInfo>, Status> {
        let who = identity(&req);
        let r = req
            .into_inner()
            .try_into()
            .and_then(|s| self.cloud.apps.create(s));
        self.reply("create-app", who, r)
    }

    async fn list_apps(
        &self,
        req: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        let r = self.cloud.apps.list().map(|a| pb::ListAppsResponse {
            apps: a.into_iter().map(Into::into).collect(),
        });
        self.reply("list-apps", identity(&req), r)
    }

    async fn delete_app(
        &self,
        req: Request<pb::DeleteAppRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let name = req.into_inner().name;
        let r = self.cloud.start_app_delete(&name, &operator(&who));
        self.reply("delete-app", who, r.map(wire::job))
    }

    async fn edit_services(
        &self,
        req: Request<pb::EditServicesRequest>,
    ) -> Result<Response<pb::AppInfo>, Status> {
        let q = req.get_ref();
        let r = self.cloud.apps.edit_services(&q.app, &q.add, &q.remove);
        self.reply("edit-services", identity(&req), r)
    }

    async fn build_app_images(
        &self,
        req: Request<pb::BuildAppImagesRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let q = req.into_inner();
        let r = (self.cloud).start_app_images(&q.app, q.skip_boot_check, &operator(&who));
        self.reply("build-app-images", who, r.map(wire::job))
    }

    async fn create_clone(
        &self,
        req: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let q = req.into_inner();
        let spec = crate::clones::CloneSpec {
            name: q.name.clone(),
            instance_type: q.instance_type.clone(),
            network: q.network.clone(),
        };
        let r = self.cloud.start_clone_create(&q.app, spec, &operator(&who));
        self.reply("create-clone", who, r.map(wire::job))
    }

    async fn list_clones(
        &self,
        req: Request<pb::ListClonesRequest>,
    ) -> Result<Response<pb::ListClonesResponse>, Status> {
        let r = self.cloud.clones.list().map(|c| pb::ListClonesResponse {
            clones: c.into_iter().map(Into::into).collect(),
        });
        self.reply("list-clones", identity(&req), r)
    }

    async fn suspend_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.clone_job(req, CloneOp::Suspend)
    }

    async fn resume_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.clone_job(req, CloneOp::Resume)
    }

    async fn terminate_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.clone_job(req, CloneOp::Terminate)
    }

    async fn discover(
        &self,
        req: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        let r = self.cloud.discovery.graph(&req.get_ref().system);
        self.reply("discover", identity(&req), r.map(wire::graph))
    }

    async fn console_login(
        &self,
        req: Request<pb::ConsoleLoginRequest>,
    ) -> Result<Response<pb::ConsoleLoginResponse>, Status> {
        let who = identity(&req);
        let r = match &self.console {
            None => Err(CloudError::Failed(
                "this cloud manager serves no console (ferry-cloud serve --console ADDR)".into(),
            )),
            Some(c) => c.login_link(&operator(&who)),
        };
        let r = r.map(|(url, expires_unix)| pb::ConsoleLoginResponse { url, expires_unix });
        self.reply("console-login", who, r)
    }

    async fn install_agents(
        &self,
        req: Request<pb::InstallAgentsRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.push_job(req, false)
    }

    async fn uninstall_agents(
        &self,
        req: Request<pb::InstallAgentsRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        self.push_job(req, true)
    }

    async fn propose_app(
        &self,
        req: Request<pb::ProposeAppRequest>,
    ) -> Result<Response<pb::ProposeAppResponse>, Status> {
        let q = req.get_ref();
        let r = self.cloud.discovery.propose(&q.name, &q.from);
        self.reply("propose-app", identity(&req), r.map(wire::proposal))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = self.cloud.jobs.list().map(|jobs| pb::ListJobsResponse {
            jobs: jobs.into_iter().map(wire::job).collect(),
        });
        self.reply("list-jobs", identity(&req), r)
    }

    async fn get_job(&self, req: Request<pb::JobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        let r = self.cloud.jobs.get(&req.get_ref().id).map(wire::job);
        self.reply("get-job", identity(&req), r)
    }

    type WatchJobStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::JobInfo, Status>> + Send>>;

    async fn watch_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = identity(&req);
        let id = req.into_inner().id;
        let rx = match self.cloud.jobs.watch(&id) {
            Ok(rx) => rx,
            Err(e) => return Err(self.fail("watch-job", who.as_ref(), e)),
        };
        let Some(rx) = rx else {
            // Ended already: its record, once.
            let r = self.cloud.jobs.get(&id).map(wire::job);
            let r = r.map_err(|e| self.fail("watch-job", who.as_ref(), e))?;
            return Ok(Response::new(Box::pin(futures::stream::once(async {
                Ok(r)
            }))));
        };
        // The current record, then each change, until one says the job ended.
        let cloud = self.cloud.clone();
        let updates = futures::stream::unfold((rx, true, false), move |(mut rx, first, done)| {
            let (cloud, id) = (cloud.clone(), id.clone());
            async move {
                if done {
                    return None;
                }
                let rec = if first || rx.changed().await.is_ok() {
                    rx.borrow_and_update().clone()
                } else {
                    // The job's task let go: its record holds how it ended.
                    cloud.jobs.get(&id).ok()?
                };
                let ended = rec.state != JobState::Running;
                Some((Ok(wire::job(rec)), (rx, false, ended)))
            }
        });
        Ok(Response::new(Box::pin(updates)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = identity(&req);
        let r = self.cloud.jobs.cancel(&req.get_ref().id, &operator(&who));
        self.reply("cancel-job", who, r.map(wire::job))
    }

    async fn tunnel_connect(
        &self,
        req: Request<pb::TunnelConnectRequest>,
    ) -> Result<Response<pb::TunnelConnectResponse>, Status> {
        let q = req.get_ref();
        let r = self.cloud.tunnel_connect(&q.clone, &q.system, &q.key_path);
        self.reply("tunnel-connect", identity(&req), r)
    }
}
