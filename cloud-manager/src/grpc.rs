//! gRPC faces of the cloud manager. Each call checks the caller's identity and maps
//! errors to statuses through `ferry_common::error::to_status`, nowhere else.
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

impl Grpc {
    fn fail(&self, op: &str, who: Option<&Identity>, e: CloudError) -> Status {
        if matches!(
            e.kind(),
            Kind::InvalidArgument | Kind::PermissionDenied | Kind::Unauthenticated
        ) {
            self.cloud.refused();
            tracing::warn!(op, peer = ?who.map(|i| i.to_string()), error = %e, "request refused");
        } else {
            tracing::warn!(op, peer = ?who.map(|i| i.to_string()), error = %e, "request failed");
        }
        to_status(&e)
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
        cloud::blocking(move || cloud.enroll(r))
            .await
            .map(Response::new)
            .map_err(|e| self.fail("enroll", None, e))
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
        r.map(Response::new)
            .map_err(|e| self.fail("register", who.as_ref(), e))
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
        r.map(Response::new)
            .map_err(|e| self.fail("missing-chunks", who.as_ref(), e))
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
        r.map(Response::new)
            .map_err(|e| self.fail("apply-batch", who.as_ref(), e))
    }

    async fn progress(
        &self,
        req: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_ingest(who.as_ref())
            .and_then(|id| self.cloud.progress(id, req.get_ref()));
        r.map(Response::new)
            .map_err(|e| self.fail("progress", who.as_ref(), e))
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for Grpc {
    async fn list_systems(
        &self,
        req: Request<pb::ListSystemsRequest>,
    ) -> Result<Response<pb::ListSystemsResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref())
            .and_then(|_| self.cloud.list(&req.get_ref().name));
        r.map(|systems| Response::new(pb::ListSystemsResponse { systems }))
            .map_err(|e| self.fail("list-systems", who.as_ref(), e))
    }

    async fn sync_status(
        &self,
        req: Request<pb::SyncStatusRequest>,
    ) -> Result<Response<pb::SyncStatusResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| self.cloud.list(""));
        r.map(|systems| {
            Response::new(pb::SyncStatusResponse {
                systems,
                counters: Some(self.cloud.counters.to_proto()),
                last_error: self.cloud.last_error(),
            })
        })
        .map_err(|e| self.fail("sync-status", who.as_ref(), e))
    }

    async fn replica_path(
        &self,
        req: Request<pb::ReplicaPathRequest>,
    ) -> Result<Response<pb::ReplicaPathResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| {
            self.cloud
                .replica_path(&req.get_ref().system, &req.get_ref().mount_point)
        });
        r.map(|p| {
            Response::new(pb::ReplicaPathResponse {
                path: p.display().to_string(),
            })
        })
        .map_err(|e| self.fail("replica-path", who.as_ref(), e))
    }

    async fn set_replication(
        &self,
        req: Request<pb::SetReplicationRequest>,
    ) -> Result<Response<pb::SetReplicationResponse>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.set_replication(req.get_ref()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("set-replication", who.as_ref(), e))
    }

    async fn file_db_add(
        &self,
        req: Request<pb::FileDbAddRequest>,
    ) -> Result<Response<pb::FileDbEntry>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.filedb_add(req.into_inner()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("filedb-add", who.as_ref(), e))
    }

    async fn build_image(
        &self,
        req: Request<pb::BuildImageRequest>,
    ) -> Result<Response<pb::ImageInfo>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.build_image(req.into_inner()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("build-image", who.as_ref(), e))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| self.cloud.list_images());
        r.map(Response::new)
            .map_err(|e| self.fail("list-images", who.as_ref(), e))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.delete_image(&req.get_ref().id).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("delete-image", who.as_ref(), e))
    }

    async fn create_app(&self, req: Request<pb::AppInfo>) -> Result<Response<pb::AppInfo>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref())
            .and_then(|_| self.cloud.create_app(req.into_inner()));
        r.map(Response::new)
            .map_err(|e| self.fail("create-app", who.as_ref(), e))
    }

    async fn list_apps(
        &self,
        req: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| self.cloud.list_apps());
        r.map(Response::new)
            .map_err(|e| self.fail("list-apps", who.as_ref(), e))
    }

    async fn delete_app(
        &self,
        req: Request<pb::DeleteAppRequest>,
    ) -> Result<Response<pb::DeleteAppResponse>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.delete_app(&req.get_ref().name).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("delete-app", who.as_ref(), e))
    }

    async fn build_app_images(
        &self,
        req: Request<pb::BuildAppImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.build_app_images(req.into_inner()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("build-app-images", who.as_ref(), e))
    }

    async fn create_clone(
        &self,
        req: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.create_clone(req.into_inner()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("create-clone", who.as_ref(), e))
    }

    async fn list_clones(
        &self,
        req: Request<pb::ListClonesRequest>,
    ) -> Result<Response<pb::ListClonesResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| self.cloud.list_clones());
        r.map(Response::new)
            .map_err(|e| self.fail("list-clones", who.as_ref(), e))
    }

    async fn suspend_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.suspend_clone(&req.get_ref().name).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("suspend-clone", who.as_ref(), e))
    }

    async fn resume_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.resume_clone(&req.get_ref().name).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("resume-clone", who.as_ref(), e))
    }

    async fn terminate_clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.terminate_clone(&req.get_ref().name).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("terminate-clone", who.as_ref(), e))
    }

    async fn tunnel_connect(
        &self,
        req: Request<pb::TunnelConnectRequest>,
    ) -> Result<Response<pb::TunnelConnectResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref())
            .and_then(|_| self.cloud.tunnel_connect(req.into_inner()));
        r.map(Response::new)
            .map_err(|e| self.fail("tunnel-connect", who.as_ref(), e))
    }

    async fn edit_services(
        &self,
        req: Request<pb::EditServicesRequest>,
    ) -> Result<Response<pb::AppInfo>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref())
            .and_then(|_| self.cloud.edit_services(req.into_inner()));
        r.map(Response::new)
            .map_err(|e| self.fail("edit-services", who.as_ref(), e))
    }

    async fn prepare_system(
        &self,
        req: Request<pb::PrepareSystemRequest>,
    ) -> Result<Response<pb::PrepareSystemResponse>, Status> {
        let who = identity(&req);
        let r = async {
            cloud::require_operator(who.as_ref())?;
            self.cloud.prepare_system(req.into_inner()).await
        }
        .await;
        r.map(Response::new)
            .map_err(|e| self.fail("prepare-system", who.as_ref(), e))
    }

    async fn file_db_list(
        &self,
        req: Request<pb::FileDbListRequest>,
    ) -> Result<Response<pb::FileDbListResponse>, Status> {
        let who = identity(&req);
        let r = cloud::require_operator(who.as_ref()).and_then(|_| self.cloud.filedb_list());
        r.map(Response::new)
            .map_err(|e| self.fail("filedb-list", who.as_ref(), e))
    }
}
