//! gRPC faces of the cloud manager, the only code that speaks the wire types to callers:
//! ingest calls check the caller's role each, the control API is checked once by
//! `operator_only`, and errors become statuses through `fail` (`to_status`), nowhere else.
use crate::cloud::{self, Cloud, CloudError};
use ferry_common::error::{to_status, ErrorKind, Kind};
use ferry_common::pki::Identity;
use ferry_common::tls::peer;
use ferry_proto::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone)]
pub struct Grpc {
    pub cloud: Arc<Cloud>,
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

/// The control API is the operator's alone: one check in front of every call.
#[allow(clippy::result_large_err)] // tonic's interceptor answers with a `Status`
pub fn operator_only(
    cloud: Arc<Cloud>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let who = identity(&req);
        match cloud::require_operator(who.as_ref()) {
            Ok(_) => Ok(req),
            Err(e) => Err(fail(&cloud, "control", who.as_ref(), e)),
        }
    }
}

impl Grpc {
    fn fail(&self, op: &str, who: Option<&Identity>, e: CloudError) -> Status {
        fail(&self.cloud, op, who, e)
    }

    /// A call's result as its answer.
    #[allow(clippy::result_large_err)] // what every tonic handler returns
    fn reply<T>(
        &self,
        op: &str,
        who: Option<Identity>,
        r: Result<T, CloudError>,
    ) -> Result<Response<T>, Status> {
        r.map(Response::new)
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
        let r = req.into_inner();
        let r = cloud::blocking(move || cloud.enroll(r)).await;
        self.reply("enroll", None, r)
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for Grpc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = identity(&req);
        let r = async {
            let id = cloud::require_ingest(who.as_ref())?;
            self.cloud.register(id, req.into_inner()).await
        }
        .await;
        self.reply("register", who, r)
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksResponse>, Status> {
        let who = identity(&req);
        let r = match cloud::require_ingest(who.as_ref()) {
            Ok(_) => self.cloud.missing(req.into_inner()).await,
            Err(e) => Err(e),
        };
        self.reply("missing-chunks", who, r)
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::ChunkFrame>>,
    ) -> Result<Response<pb::PutChunksResponse>, Status> {
        let who = identity(&req);
        cloud::require_ingest(who.as_ref())
            .map_err(|e| self.fail("put-chunks", who.as_ref(), e))?;
        let mut stream = req.into_inner();
        let mut staged = Vec::new();
        let mut duplicate = 0;
        while let Some(frame) = stream.message().await? {
            match self.cloud.stage_frame(&frame) {
                Ok(Some(s)) => staged.push(s),
                Ok(None) => duplicate += 1,
                Err(e) => {
                    self.cloud.storage_error(&e);
                    return Err(self.fail("put-chunks", who.as_ref(), e));
                }
            }
        }
        let stored = self.cloud.publish_chunks(staged).await.map_err(|e| {
            self.cloud.storage_error(&e);
            self.fail("put-chunks", who.as_ref(), e)
        })?;
        Ok(Response::new(pb::PutChunksResponse { stored, duplicate }))
    }

    async fn apply_batch(
        &self,
        req: Request<pb::Batch>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let who = identity(&req);
        let r = async {
            let id = cloud::require_ingest(who.as_ref())?;
            self.cloud.apply_batch(id, req.into_inner()).await
        }
        .await;
        self.reply("apply-batch", who, r)
    }

    async fn progress(
        &self,
        req: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_ingest(who.as_ref())
            .and_then(|id| self.cloud.progress(id, req.get_ref()));
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
        let r = self.cloud.list(&req.get_ref().name);
        let r = r.map(|systems| pb::ListSystemsResponse { systems });
        self.reply("list-systems", identity(&req), r)
    }

    async fn sync_status(
        &self,
        req: Request<pb::SyncStatusRequest>,
    ) -> Result<Response<pb::SyncStatusResponse>, Status> {
        let r = self.cloud.list("").map(|systems| pb::SyncStatusResponse {
            systems,
            counters: Some(self.cloud.counters.to_proto()),
            last_error: self.cloud.last_error(),
        });
        self.reply("sync-status", identity(&req), r)
    }

    async fn replica_path(
        &self,
        req: Request<pb::ReplicaPathRequest>,
    ) -> Result<Response<pb::ReplicaPathResponse>, Status> {
        let q = req.get_ref();
        let r = self.cloud.replica_path(&q.system, &q.mount_point);
        let r = r.map(|p| pb::ReplicaPathResponse {
            path: p.display().to_string(),
        });
        self.reply("replica-path", identity(&req), r)
    }

    async fn set_replication(
        &self,
        req: Request<pb::SetReplicationRequest>,
    ) -> Result<Response<pb::SetReplicationResponse>, Status> {
        let r = self.cloud.set_replication(req.get_ref()).await;
        self.reply("set-replication", identity(&req), r)
    }

    async fn file_db_add(
        &self,
        req: Request<pb::FileDbAddRequest>,
    ) -> Result<Response<pb::FileDbEntry>, Status> {
        let who = identity(&req);
        let r = self.cloud.filedb_add(req.into_inner()).await;
        self.reply("filedb-add", who, r)
    }

    async fn build_image(
        &self,
        req: Request<pb::BuildImageRequest>,
    ) -> Result<Response<pb::ImageInfo>, Status> {
        let who = identity(&req);
        let r = self.cloud.build_image(req.into_inner()).await;
        self.reply("build-image", who, r)
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        self.reply("list-images", identity(&req), self.cloud.list_images())
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let r = self.cloud.delete_image(&req.get_ref().id).await;
        self.reply("delete-image", identity(&req), r)
    }

    async fn create_app(&self, req: Request<pb::AppInfo>) -> Result<Response<pb::AppInfo>, Status> {
        let who = identity(&req);
        let r = self.cloud.create_app(req.into_inner());
        self.reply("create-app", who, r)
    }

    async fn list_apps(
        &self,
        req: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        self.reply("list-apps", identity(&req), self.cloud.list_apps())
    }

    async fn delete_app(
        &self,
        req: Request<pb::DeleteAppRequest>,
    ) -> Result<Response<pb::DeleteAppResponse>, Status> {
        let r = self.cloud.delete_app(&req.get_ref().name).await;
        self.reply("delete-app", identity(&req), r)
    }

    async fn build_app_images(
        &self,
        req: Request<pb::BuildAppImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let who = identity(&req);
        let r = self.cloud.build_app_images(req.into_inner()).await;
        self.reply("build-app-images", who, r)
    }

    async fn create_clone(
        &self,
        req: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let who = identity(&req);
        let r = self.cloud.create_clone(req.into_inner()).await;
        self.reply("create-clone", who, r)
    }

    async fn list_clones(
        &self,
        req: Request<pb::ListClonesRequest>,
    ) -> Result<Response<pb::ListClonesResponse>, Status> {
        self.reply("list-clones", identity(&req), self.cloud.list_clones())
    }

    async fn suspend_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let r = self.cloud.suspend_clone(&req.get_ref().name).await;
        self.reply("suspend-clone", identity(&req), r)
    }

    async fn resume_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let r = self.cloud.resume_clone(&req.get_ref().name).await;
        self.reply("resume-clone", identity(&req), r)
    }

    async fn terminate_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let r = self.cloud.terminate_clone(&req.get_ref().name).await;
        self.reply("terminate-clone", identity(&req), r)
    }

    async fn tunnel_connect(
        &self,
        req: Request<pb::TunnelConnectRequest>,
    ) -> Result<Response<pb::TunnelConnectResponse>, Status> {
        let who = identity(&req);
        let r = self.cloud.tunnel_connect(req.into_inner());
        self.reply("tunnel-connect", who, r)
    }

    async fn edit_services(
        &self,
        req: Request<pb::EditServicesRequest>,
    ) -> Result<Response<pb::AppInfo>, Status> {
        let who = identity(&req);
        let r = self.cloud.edit_services(req.into_inner());
        self.reply("edit-services", who, r)
    }

    async fn prepare_system(
        &self,
        req: Request<pb::PrepareSystemRequest>,
    ) -> Result<Response<pb::PrepareSystemResponse>, Status> {
        let who = identity(&req);
        let r = self.cloud.prepare_system(req.into_inner()).await;
        self.reply("prepare-system", who, r)
    }

    async fn file_db_list(
        &self,
        req: Request<pb::FileDbListRequest>,
    ) -> Result<Response<pb::FileDbListResponse>, Status> {
        self.reply("filedb-list", identity(&req), self.cloud.filedb_list())
    }
}
