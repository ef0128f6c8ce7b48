//! `shoal csi`: a Kubernetes CSI node plugin. A pod names a version in an ephemeral inline
//! volume (`volumeAttributes: {ref: imagenet@v3}`); kubelet calls NodePublishVolume over this
//! plugin's Unix socket and the local node daemon mounts the version at the pod's target path,
//! read-only, sharing the daemon's cache, peers and pins with every other mount on the node.
//! NodeUnpublishVolume unmounts it.
//!
//! The plugin holds one daemon connection per published volume: the daemon serves a mount as
//! long as the connection that asked for it (as for `shoal mount`). Restarting the plugin or the
//! daemon therefore ends its mounts (readers see ENOTCONN): run both in one pod, and drain a
//! node before upgrading it.
//!
//! Only the node services are offered (Identity and Node, no Controller): versions are
//! immutable and live at the origins, there is nothing to provision or attach.

use shoal_node::daemon::{Client, Request};
use shoal_node::{Home, MountSpec, Passthrough, Prefetch, Progress};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::{Request as Rpc, Response, Status};

/// The CSI spec v1.12.0, compiled at build time.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

use proto::identity_server::{Identity, IdentityServer};
use proto::node_server::{Node, NodeServer};
use proto::*;

/// The driver's name, as a `CSIDriver` object and pods' `csi.driver` spell it.
pub const DRIVER_NAME: &str = "csi.shoal.dev";

/// Volumes one plugin serves at once; more are refused with RESOURCE_EXHAUSTED.
pub const MAX_VOLUMES: usize = 1024;

/// How long NodePublishVolume waits for the daemon to resolve and mount a version (kubelet
/// gives a call two minutes, then retries).
const MOUNT_DEADLINE: Duration = Duration::from_secs(100);

/// How long NodeUnpublishVolume waits for the daemon to finish a mount it unmounted.
const UNMOUNT_DEADLINE: Duration = Duration::from_secs(30);

/// Longest path or value accepted in a request (Linux's PATH_MAX).
const MAX_FIELD: usize = 4096;

/// What the plugin needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node daemon's home (its socket is there).
    pub home: PathBuf,
    /// This node's name as Kubernetes knows it (`spec.nodeName`).
    pub node_id: String,
}

/// The CSI Identity and Node services.
#[derive(Clone)]
pub struct Driver {
    home: Home,
    node_id: String,
    volumes: Arc<Mutex<HashMap<String, Volume>>>,
}

enum Volume {
    /// A publish or unpublish of this volume is under way.
    Busy,
    Mounted {
        target: PathBuf,
        reference: String,
        /// The daemon connection serving the mount; it ends when the mount does.
        served: JoinHandle<()>,
    },
}

/// What a pod asked for in its volume's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRequest {
    pub reference: String,
    pub prefetch: Prefetch,
    pub passthrough: Passthrough,
}

/// Reads a volume's attributes: `ref` (required), `prefetch` (none, sequential, all) and
/// `passthrough` (auto, on, off). Kubernetes' own `csi.storage.k8s.io/*` keys are ignored;
/// any other key is refused by name, so a typo does not silently mount with defaults. Origins
/// are the daemon's own: a pod cannot point the node at a store of its choosing.
pub fn volume_request(ctx: &HashMap<String, String>) -> Result<VolumeRequest, String> {
    let mut reference = None;
    let mut prefetch = Prefetch::Sequential;
    let mut passthrough = Passthrough::Auto;
    for (k, v) in ctx {
        match k.as_str() {
            "ref" => {
                let r: shoal_registry::DatasetRef = v
                    .parse()
                    .map_err(|e| format!("volumeAttributes.ref {v:?}: {e}"))?;
                reference = Some(r.to_string());
            }
            "prefetch" => {
                prefetch = match v.as_str() {
                    "none" => Prefetch::None,
                    "sequential" => Prefetch::Sequential,
                    "all" => Prefetch::All,
                    _ => {
                        return Err(format!(
                            "volumeAttributes.prefetch {v:?}: expected none, sequential or all"
                        ))
                    }
                }
            }
            "passthrough" => {
                passthrough = match v.as_str() {
                    "auto" => Passthrough::Auto,
                    "on" => Passthrough::On,
                    "off" => Passthrough::Off,
                    _ => {
                        return Err(format!(
                            "volumeAttributes.passthrough {v:?}: expected auto, on or off"
                        ))
                    }
                }
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(format!(
                    "unknown volumeAttributes key {other:?} (known: ref, prefetch, passthrough)"
                ))
            }
        }
    }
    let reference = reference
        .ok_or("volumeAttributes.ref is required: the version to mount, e.g. imagenet@v3")?;
    Ok(VolumeRequest {
        reference,
        prefetch,
        passthrough,
    })
}

impl Driver {
    pub fn new(opts: Options) -> Driver {
        Driver {
            home: Home::new(opts.home),
            node_id: opts.node_id,
            volumes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    async fn daemon(&self) -> Result<Client, Status> {
        Client::connect(&self.home).await.ok_or_else(|| {
            Status::unavailable(format!(
                "no shoal node daemon is running at {} (start `shoal node run`)",
                self.home.socket_path().display()
            ))
        })
    }

    fn volumes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Volume>> {
        self.volumes.lock().expect("poisoned")
    }

    /// Claims `id` for an operation: Ok(previous state) or ABORTED while another runs.
    fn claim(&self, id: &str) -> Result<Option<Volume>, Status> {
        let mut v = self.volumes();
        match v.get(id) {
            Some(Volume::Busy) => Err(Status::aborted(format!(
                "an operation on volume {id} is under way"
            ))),
            _ => {
                if !v.contains_key(id) && v.len() >= MAX_VOLUMES {
                    return Err(Status::resource_exhausted(format!(
                        "this node serves {MAX_VOLUMES} shoal volumes already"
                    )));
                }
                Ok(v.insert(id.to_string(), Volume::Busy))
            }
        }
    }

    fn release(&self, id: &str, state: Option<Volume>) {
        let mut v = self.volumes();
        match state {
            Some(s) => v.insert(id.to_string(), s),
            None => v.remove(id),
        };
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), Status> {
        let id = &req.volume_id;
        field("volume_id", id)?;
        field("target_path", &req.target_path)?;
        let target = PathBuf::from(&req.target_path);
        if !target.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "target_path {} is not absolute",
                target.display()
            )));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        match &cap.access_type {
            Some(volume_capability::AccessType::Mount(_)) => {}
            Some(volume_capability::AccessType::Block(_)) => {
                return Err(Status::invalid_argument(
                    "shoal volumes are directories: block access is not offered",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume_capability.access_type is required",
                ))
            }
        }
        let want = volume_request(&req.volume_context).map_err(Status::invalid_argument)?;
        let before = self.claim(id)?;
        if let Some(Volume::Mounted {
            target: t,
            reference,
            served,
        }) = &before
        {
            // Published before: the same again is success, anything else a conflict.
            let r = if served.is_finished() {
                Err(Status::failed_precondition(format!(
                    "volume {id}'s mount at {} has ended; unpublish it first",
                    t.display()
                )))
            } else if *t == target && *reference == want.reference {
                Ok(())
            } else {
                Err(Status::already_exists(format!(
                    "volume {id} is published at {} with {reference}",
                    t.display()
                )))
            };
            self.release(id, before);
            return r;
        }
        let (state, result) = match self.mount(&target, &want).await {
            Ok(served) => (
                Some(Volume::Mounted {
                    target,
                    reference: want.reference,
                    served,
                }),
                Ok(()),
            ),
            Err(e) => (None, Err(e)),
        };
        self.release(id, state);
        result
    }

    /// Creates the target directory, asks the daemon to mount there and waits until it has.
    async fn mount(&self, target: &Path, want: &VolumeRequest) -> Result<JoinHandle<()>, Status> {
        if shoal_fuse::find_mount(target).is_some() {
            return Err(Status::failed_precondition(format!(
                "{} is already a mount point",
                target.display()
            )));
        }
        let daemon = self.daemon().await?;
        std::fs::create_dir_all(target)
            .map_err(|e| Status::internal(format!("creating target {}: {e}", target.display())))?;
        let req = Request::Mount {
            reference: want.reference.clone(),
            origin: String::new(),
            spec: MountSpec {
                mountpoint: target.to_path_buf(),
                prefetch: want.prefetch,
                read_order: Vec::new(),
                read_ahead: MountSpec::DEFAULT_READ_AHEAD,
                timeout_secs: MountSpec::DEFAULT_TIMEOUT_SECS,
                threads: MountSpec::DEFAULT_THREADS,
                direct_io: false,
                passthrough: want.passthrough,
            },
        };
        let (up_tx, up_rx) = tokio::sync::oneshot::channel::<()>();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<Status>();
        let reference = want.reference.clone();
        let at = target.display().to_string();
        let served = tokio::spawn(async move {
            let mut up = Some(up_tx);
            let r = daemon
                .call_with(&req, &Progress::default(), |notice| {
                    if notice.starts_with("mounted ") {
                        if let Some(up) = up.take() {
                            let _ = up.send(());
                        }
                    }
                })
                .await;
            match r {
                Ok(_) => tracing::info!(%reference, at, "mount ended"),
                Err(e) => {
                    tracing::warn!(%reference, at, "mount failed: {e}");
                    let _ = end_tx.send(status_of(&e));
                }
            }
        });
        let outcome = tokio::time::timeout(MOUNT_DEADLINE, async {
            match up_rx.await {
                Ok(()) => Ok(()),
                // The call ended before the mount was up: its error, if it sent one.
                Err(_) => Err(end_rx.await.unwrap_or_else(|_| {
                    Status::internal("the node daemon ended the mount before it was up")
                })),
            }
        })
        .await;
        let failed = match outcome {
            Ok(Ok(())) => return Ok(served),
            Ok(Err(e)) => e,
            Err(_) => Status::deadline_exceeded(format!(
                "mounting {} at {} took over {}s",
                want.reference,
                target.display(),
                MOUNT_DEADLINE.as_secs()
            )),
        };
        // Dropping the connection has the daemon unmount whatever it got to.
        served.abort();
        let _ = served.await;
        let _ = std::fs::remove_dir(target);
        Err(failed)
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), Status> {
        let id = &req.volume_id;
        field("volume_id", id)?;
        field("target_path", &req.target_path)?;
        let target = PathBuf::from(&req.target_path);
        let before = self.claim(id)?;
        let served = match before {
            Some(Volume::Mounted { served, .. }) => Some(served),
            _ => None,
        };
        let r = unmount_target(&target, served).await;
        self.release(id, None);
        r
    }
}

/// Unmounts `target` if a shoal mount is there, waits for its serving connection to end, and
/// removes the directory. Idempotent: a target with no mount, or already gone, is success.
async fn unmount_target(target: &Path, served: Option<JoinHandle<()>>) -> Result<(), Status> {
    if let Some(m) = shoal_fuse::find_mount(target) {
        if !m.source.starts_with("shoal:") {
            return Err(Status::failed_precondition(format!(
                "{} holds a {} mount of {}, not a shoal volume",
                target.display(),
                m.fstype,
                m.source
            )));
        }
        if let Err(e) = shoal_node::unmount(target) {
            // A reader still holds it open: detach it now, the kernel frees it at the last close.
            tracing::warn!("{e}; detaching it lazily");
            shoal_node::unmount_lazy(target).map_err(|e| Status::internal(e.to_string()))?;
        }
    }
    if let Some(mut served) = served {
        if tokio::time::timeout(UNMOUNT_DEADLINE, &mut served)
            .await
            .is_err()
        {
            served.abort();
        }
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "removing target {}: {e}",
            target.display()
        ))),
    }
}

fn field(name: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{name} is required")));
    }
    if v.len() > MAX_FIELD {
        return Err(Status::invalid_argument(format!(
            "{name} is longer than {MAX_FIELD} bytes"
        )));
    }
    Ok(())
}

/// The gRPC status for an error the daemon reported.
fn status_of(e: &shoal_node::Error) -> Status {
    use shoal_node::ErrorKind as K;
    let m = e.to_string();
    match e.kind() {
        K::NotFound => Status::not_found(m),
        K::Name | K::Usage => Status::invalid_argument(m),
        K::Verify | K::TagRefused | K::Unsafe => Status::failed_precondition(m),
        K::Net | K::Origin => Status::unavailable(m),
        _ => Status::internal(m),
    }
}

#[tonic::async_trait]
impl Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Rpc<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Rpc<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // No controller service: nothing to provision, versions are immutable.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _: Rpc<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // Ready when the daemon answers its status within a few seconds.
        let daemon = self.daemon().await?;
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            daemon.call(&Request::Status, &Progress::default()),
        )
        .await;
        let ready = matches!(status, Ok(Ok(_)));
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl Node for Driver {
    async fn node_stage_volume(
        &self,
        _: Rpc<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("shoal volumes are not staged"))
    }

    async fn node_unstage_volume(
        &self,
        _: Rpc<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("shoal volumes are not staged"))
    }

    async fn node_publish_volume(
        &self,
        req: Rpc<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let (id, target) = (req.volume_id.clone(), req.target_path.clone());
        match self.publish(req).await {
            Ok(()) => {
                tracing::info!(volume = id, target, "published");
                Ok(Response::new(NodePublishVolumeResponse {}))
            }
            Err(e) => {
                tracing::warn!(volume = id, target, "publish refused: {}", e.message());
                Err(e)
            }
        }
    }

    async fn node_unpublish_volume(
        &self,
        req: Rpc<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let (id, target) = (req.volume_id.clone(), req.target_path.clone());
        self.unpublish(req).await?;
        tracing::info!(volume = id, target, "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Rpc<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("volume stats are not offered"))
    }

    async fn node_expand_volume(
        &self,
        _: Rpc<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "shoal volumes are read-only versions",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _: Rpc<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Rpc<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: MAX_VOLUMES as i64,
            accessible_topology: None,
        }))
    }
}

/// Serves the plugin on the Unix socket `socket` until `stop` completes, then unmounts every
/// volume it published. A stale socket file left by a killed plugin is replaced; a live one
/// is an error (another plugin is serving there). The socket is made readable and writable by
/// its owner only (kubelet runs as root).
///
/// Cancelling it drops its mounts' daemon connections, which has the daemon unmount them; run
/// it to completion through `stop` to have them unmounted in order.
pub async fn serve(
    socket: &Path,
    opts: Options,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Err(format!(
                "another process serves {} already",
                socket.display()
            ));
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("removing the stale socket {}: {e}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
    rustix::fs::chmod(socket, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(|e| format!("restricting {}: {e}", socket.display()))?;
    let driver = Driver::new(opts);
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tracing::info!(socket = %socket.display(), node = driver.node_id, "CSI plugin {DRIVER_NAME} serving");
    let served = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(32)
        .timeout(MOUNT_DEADLINE + Duration::from_secs(10))
        .max_connection_age(Duration::from_secs(3600))
        .add_service(IdentityServer::new(driver.clone()).max_decoding_message_size(1 << 20))
        .add_service(NodeServer::new(driver.clone()).max_decoding_message_size(1 << 20))
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    let _ = std::fs::remove_file(socket);
    // Unmount what this plugin published: its connections are about to go anyway.
    let volumes: Vec<(PathBuf, JoinHandle<()>)> = driver
        .volumes()
        .drain()
        .filter_map(|(_, v)| match v {
            Volume::Mounted { target, served, .. } => Some((target, served)),
            Volume::Busy => None,
        })
        .collect();
    for (target, served) in volumes {
        if let Err(e) = unmount_target(&target, Some(served)).await {
            tracing::warn!("{}", e.message());
        }
    }
    served.map_err(|e| format!("serving {}: {e}", socket.display()))
}

/// A gRPC channel to a plugin's socket (for tests and health checks).
pub async fn connect(socket: &Path) -> Result<tonic::transport::Channel, String> {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volume_attributes_name_a_version_and_nothing_unknown() {
        let r = volume_request(&ctx(&[
            ("ref", "imagenet@v3"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "train-0"),
        ]))
        .unwrap();
        assert_eq!(r.reference, "imagenet@v3");
        assert_eq!(r.prefetch, Prefetch::Sequential);
        let r = volume_request(&ctx(&[
            ("ref", "a@v1"),
            ("prefetch", "all"),
            ("passthrough", "off"),
        ]))
        .unwrap();
        assert_eq!(
            (r.prefetch, r.passthrough),
            (Prefetch::All, Passthrough::Off)
        );
        let e = volume_request(&ctx(&[("prefetch", "all")])).unwrap_err();
        assert!(e.contains("ref is required"), "{e}");
        let e = volume_request(&ctx(&[("ref", "a@v1"), ("origin", "s3://x")])).unwrap_err();
        assert!(e.contains("\"origin\""), "{e}");
        let e = volume_request(&ctx(&[("ref", "a@v1"), ("prefetch", "most")])).unwrap_err();
        assert!(e.contains("prefetch \"most\""), "{e}");
        let e = volume_request(&ctx(&[("ref", "no version")])).unwrap_err();
        assert!(e.starts_with("volumeAttributes.ref"), "{e}");
    }
}
