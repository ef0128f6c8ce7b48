//! `shoal csi`, the Kubernetes CSI node plugin, called for real over its Unix socket by a gRPC
//! client speaking the official csi.proto, as kubelet does: a pod's inline volume naming a
//! version is mounted by the node daemon at the pod's target path, serves the exact bytes,
//! and goes away on unpublish or when the plugin stops. Bad requests get one clear status and
//! leave nothing behind; garbage on the socket does not bring the plugin down.

mod common;

use common::{assert_same_tree, is_mounted, random_bytes, sample_tree, write, BIN};
use shoal_csi::proto::identity_client::IdentityClient;
use shoal_csi::proto::node_client::NodeClient;
use shoal_csi::proto::*;
use shoal_testnet::{wait_for, Cluster};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use tonic::Code;

/// The plugin process; killed and its volumes lazily unmounted on drop, pass or fail.
struct Plugin {
    child: Option<Child>,
    targets: Vec<PathBuf>,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in &self.targets {
            if is_mounted(t) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(t)
                    .status();
            }
        }
    }
}

/// What kubelet sends for a pod's inline volume.
fn publish_request(id: &str, target: &Path, ctx: &[(&str, &str)]) -> NodePublishVolumeRequest {
    let mut volume_context: HashMap<String, String> = ctx
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    volume_context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    volume_context.insert("csi.storage.k8s.io/pod.name".into(), "train-0".into());
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume::default(),
            )),
            // Kubelet asks inline volumes for single-node writer access; shoal serves them
            // read-only whatever the mode.
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        volume_context,
        ..Default::default()
    }
}

fn unpublish_request(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

#[test]
fn kubelet_publishes_a_version_as_a_pod_volume_and_unpublishes_it() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    sample_tree(&src);
    write(&src.join("shards/s0.bin"), &random_bytes(9, 6_000_000));
    c.publish(&src, "ds@v1");
    let a = c.node("a", &[], &[]);
    let socket = c.dir.path().join("plugins/csi.shoal.dev/csi.sock");
    let pods = c.dir.path().join("kubelet/pods");
    let target = pods.join("uid-1/volumes/kubernetes.io~csi/data/mount");
    let other = pods.join("uid-2/volumes/kubernetes.io~csi/data/mount");
    let log = c.dir.path().join("csi.log");
    let mut plugin = Plugin {
        child: Some(
            c.nodes[a]
                .cmd(&[
                    "csi",
                    "--endpoint",
                    &format!("unix://{}", socket.display()),
                    "--node-id",
                    "node-a",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ),
        targets: vec![target.clone(), other.clone()],
    };
    wait_for(20, "the CSI socket", || {
        if let Some(Ok(Some(st))) = plugin.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "shoal csi exited with {st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        socket.exists().then_some(())
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is its owner's (kubelet's) only");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = shoal_csi::connect(&socket).await.unwrap();
        let mut identity = IdentityClient::new(channel.clone());
        let mut node = NodeClient::new(channel);

        let info = identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.shoal.dev");
        assert!(!info.vendor_version.is_empty());
        let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
        assert_eq!(probe.ready, Some(true), "the daemon is up");
        let ni = node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ni.node_id, "node-a");
        let caps = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(caps.capabilities.is_empty(), "no staging: {caps:?}");

        // Publish: the pod's target appears as the version, exact.
        node.node_publish_volume(publish_request("vol-1", &target, &[("ref", "ds@v1")]))
            .await
            .unwrap();
        assert!(is_mounted(&target), "published volume is a mount");
        assert_same_tree(&src, &target);
        let write_err = std::fs::write(target.join("new"), b"x").unwrap_err();
        assert_eq!(write_err.raw_os_error(), Some(libc::EROFS), "{write_err}");
        // Kubelet retries a publish it is unsure of: the same again is success.
        node.node_publish_volume(publish_request("vol-1", &target, &[("ref", "ds@v1")]))
            .await
            .unwrap();
        // The same volume with another version is a conflict, not a second mount.
        let e = node
            .node_publish_volume(publish_request("vol-1", &target, &[("ref", "ds@v2")]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

        // Bad requests: one clear status each, nothing left at the target.
        let cases: Vec<(NodePublishVolumeRequest, Code, &str)> = vec![
            (
                publish_request("vol-2", &other, &[("ref", "ds@nope")]),
                Code::NotFound,
                "ds@nope",
            ),
            (
                publish_request("vol-2", &other, &[]),
                Code::InvalidArgument,
                "volumeAttributes.ref is required",
            ),
            (
                publish_request(
                    "vol-2",
                    &other,
                    &[("ref", "ds@v1"), ("origin", "file:///etc")],
                ),
                Code::InvalidArgument,
                "unknown volumeAttributes key \"origin\"",
            ),
            (
                NodePublishVolumeRequest {
                    volume_capability: Some(VolumeCapability {
                        access_type: Some(volume_capability::AccessType::Block(
                            volume_capability::BlockVolume {},
                        )),
                        access_mode: None,
                    }),
                    ..publish_request("vol-2", &other, &[("ref", "ds@v1")])
                },
                Code::InvalidArgument,
                "block access",
            ),
            (
                publish_request("vol-2", Path::new("relative/mount"), &[("ref", "ds@v1")]),
                Code::InvalidArgument,
                "not absolute",
            ),
            (
                publish_request("", &other, &[("ref", "ds@v1")]),
                Code::InvalidArgument,
                "volume_id is required",
            ),
        ];
        for (req, code, says) in cases {
            let e = node.node_publish_volume(req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().contains(says),
                "{:?} lacks {says:?}",
                e.message()
            );
            assert!(!e.message().contains('\n'), "one line: {:?}", e.message());
            assert!(!is_mounted(&other));
            assert!(!other.exists(), "a refused publish leaves no directory");
        }
        let unstage = node
            .node_stage_volume(NodeStageVolumeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(unstage.code(), Code::Unimplemented);

        // Garbage on the socket (a hostile local client) does not bring the plugin down.
        {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let _ = s.write_all(&random_bytes(3, 1 << 16)).await;
        }

        // Unpublish: the mount and its directory go; again is success.
        node.node_unpublish_volume(unpublish_request("vol-1", &target))
            .await
            .unwrap();
        assert!(!is_mounted(&target), "unpublished volume is unmounted");
        assert!(!target.exists(), "the target directory is removed");
        node.node_unpublish_volume(unpublish_request("vol-1", &target))
            .await
            .unwrap();

        // Two pods at once; then the plugin is stopped with both published.
        node.node_publish_volume(publish_request("vol-1", &target, &[("ref", "ds@v1")]))
            .await
            .unwrap();
        node.node_publish_volume(publish_request(
            "vol-2",
            &other,
            &[("ref", "ds@v1"), ("prefetch", "all")],
        ))
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(other.join("shards/s0.bin")).unwrap(),
            std::fs::read(src.join("shards/s0.bin")).unwrap()
        );
        assert!(is_mounted(&target) && is_mounted(&other));
    });
    let child = plugin.child.take().unwrap();
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "shoal csi on SIGTERM: {:?} {}",
        out.status,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        !is_mounted(&target) && !is_mounted(&other),
        "stopping unmounts"
    );
    assert!(!socket.exists(), "the socket is removed");
    // The daemon is still up and serves the version (nothing of it was torn down).
    let out = c.nodes[a].run(&["--json", "status"]);
    assert!(out.status.success());
}

#[test]
fn without_a_daemon_the_plugin_says_so() {
    let env = common::Env::new();
    let dir = env.path("csi");
    let socket = dir.join("csi.sock");
    let mut plugin = Plugin {
        child: Some(
            env.cmd(&["csi", "--endpoint", socket.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        targets: Vec::new(),
    };
    wait_for(20, "the CSI socket", || socket.exists().then_some(()));
    let target = env.path("pods/p/mount");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = shoal_csi::connect(&socket).await.unwrap();
        let e = IdentityClient::new(channel.clone())
            .probe(ProbeRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("shoal node run"), "{}", e.message());
        let e = NodeClient::new(channel)
            .node_publish_volume(publish_request("v", &target, &[("ref", "ds@v1")]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(!target.exists());
    });
    // A second plugin on the same socket is refused; the first keeps serving.
    let out = env
        .cmd(&["csi", "--endpoint", socket.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("serves") && err.contains("already"), "{err}");
    assert!(plugin.child.as_mut().unwrap().try_wait().unwrap().is_none());
}
