//! The Kubernetes manifests in deploy/kubernetes: valid for the API server, consistent with
//! each other, and what they run works: the DaemonSet's container command with the
//! ConfigMap's config, the readiness probe, the metrics the PodMonitor scrapes, and the
//! mounter's script mounting the listed version from the configured S3 origin.

mod common;

use common::{http, is_mounted, moto, wait_for_port, write, Env, BIN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every manifest, by file name, parsed by PyYAML (which
/// kubernetes-validate brings).
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
                ])
                .arg(&f)
                .output()
                .expect("python3 (the README's test command installs it)");
            assert!(
                out.status.success(),
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            docs.into_iter().map(move |d| (name.clone(), d))
        })
        .collect()
}

fn kind<'a>(all: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = all
        .iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in deploy/kubernetes");
    found[0]
}

fn in_file<'a>(all: &'a [(String, Value)], file: &str) -> &'a Value {
    &all.iter()
        .find(|(f, _)| f == file)
        .unwrap_or_else(|| panic!("deploy/kubernetes/{file}"))
        .1
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Replaces `from` (which must occur exactly once) with `to`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} once in the ConfigMap's config.toml"
    );
    text.replace(from, to)
}

/// Kills a process group (the mounter's shell and its mounts) and unmounts what it
/// mounted, pass or fail.
struct Group {
    child: std::process::Child,
    mounts: Vec<PathBuf>,
}

impl Drop for Group {
    fn drop(&mut self) {
        for mp in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(mp).status();
        }
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kubernetes_manifests_validate_agree_and_run() {
    // The API server's own schemas, strictly (unknown fields refused). The PodMonitor is a
    // Prometheus Operator resource, whose schema the validator does not carry.
    let files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate (the README's test command installs it)");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate: {report}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        let line = report
            .lines()
            .find(|l| l.contains(&format!("/{name} ")))
            .unwrap_or_else(|| panic!("kubernetes-validate said nothing of {name}: {report}"));
        if name == "podmonitor.yaml" {
            assert!(line.contains("Couldn't find schema"), "{line}");
        } else {
            assert!(line.contains(" passed "), "{line}");
        }
    }

    // The pieces agree with each other.
    let all = manifests();
    let ns = s(&kind(&all, "Namespace")["metadata"]["name"]).to_string();
    for (file, d) in &all {
        let cluster_scoped = ["Namespace", "CSIDriver"].contains(&s(&d["kind"]));
        if !cluster_scoped && !file.starts_with("training-pod") {
            assert_eq!(d["metadata"]["namespace"], ns.as_str(), "{file}: namespace");
        }
    }
    let ds = kind(&all, "DaemonSet");
    let pod = &ds["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects = |sel: &Value, what: &str| {
        for (k, v) in sel.as_object().unwrap() {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{what} selects {k}={v}, not a pod label"
            );
        }
    };
    selects(&ds["spec"]["selector"]["matchLabels"], "the DaemonSet");
    let svc = kind(&all, "Service");
    selects(&svc["spec"]["selector"], "the Service");
    let pm = kind(&all, "PodMonitor");
    selects(&pm["spec"]["selector"]["matchLabels"], "the PodMonitor");
    let node = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "node")
        .expect("a node container");
    let mounter = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mounter")
        .expect("a mounter container");
    let port = |name: &str| -> u64 {
        node["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the node container has no {name} port"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let (p2p, metrics) = (port("p2p"), port("metrics"));
    for p in svc["spec"]["ports"].as_array().unwrap() {
        assert_eq!(p["targetPort"].as_u64(), Some(port(s(&p["name"]))));
    }
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(port(s(&ep["port"])), metrics);
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(
        s(&ann["prometheus.io/port"]).parse::<u64>().unwrap(),
        metrics
    );
    assert_eq!(ann["prometheus.io/path"], ep["path"]);
    let volume_path = |c: &Value, vol: &str| -> String {
        s(&c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == vol)
            .unwrap_or_else(|| panic!("{} does not mount {vol}", c["name"]))["mountPath"])
        .to_string()
    };
    let env_of = |c: &Value, name: &str| -> String {
        s(&c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{} has no {name}", c["name"]))["value"])
        .to_string()
    };
    let home = env_of(node, "SHOAL_HOME");
    assert_eq!(volume_path(node, "state"), home);
    assert_eq!(env_of(mounter, "SHOAL_HOME"), home);
    assert_eq!(volume_path(mounter, "state"), home);
    let secret = kind(&all, "Secret");
    let key_vol = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cluster-key")
        .unwrap();
    assert_eq!(key_vol["secret"]["secretName"], secret["metadata"]["name"]);
    let key_file = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let cm = kind(&all, "ConfigMap");
    let config = s(&cm["data"]["config.toml"]).to_string();
    let mounts_list = s(&cm["data"]["mounts"]).to_string();
    // The training pod reads what the mounter mounted on the host.
    let host_mounts = s(&pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mounts")
        .unwrap()["hostPath"]["path"])
    .to_string();
    let train = in_file(&all, "training-pod.yaml");
    let first_ref = mounts_list.lines().next().unwrap().trim().to_string();
    assert_eq!(
        train["spec"]["volumes"][0]["hostPath"]["path"],
        format!("{host_mounts}/{first_ref}").as_str()
    );

    // The CSI driver: the plugin's socket where the registrar looks and registers it with
    // kubelet (the plugin dir's host path), the driver's name as pods spell it, pods' volume
    // paths at the host's own path in both containers that touch them, propagated both ways.
    let containers = pod["spec"]["containers"].as_array().unwrap();
    let container = |name: &str| -> &Value {
        containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("a {name} container"))
    };
    let (csi, registrar) = (container("csi"), container("registrar"));
    let host_path = |vol: &str| -> String {
        s(&pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vol)
            .unwrap_or_else(|| panic!("a {vol} volume"))["hostPath"]["path"])
        .to_string()
    };
    let driver = kind(&all, "CSIDriver");
    assert_eq!(driver["metadata"]["name"], shoal_csi::DRIVER_NAME);
    assert_eq!(driver["spec"]["volumeLifecycleModes"][0], "Ephemeral");
    assert_eq!(driver["spec"]["attachRequired"], false);
    let csi_pod = in_file(&all, "training-pod-csi.yaml");
    let csi_volume = &csi_pod["spec"]["volumes"][0]["csi"];
    assert_eq!(csi_volume["driver"], shoal_csi::DRIVER_NAME);
    assert_eq!(csi["args"][0], "csi");
    let endpoint = env_of(csi, "CSI_ENDPOINT");
    let sock = endpoint
        .strip_prefix("unix://")
        .expect("a unix:// endpoint");
    let sock_name = Path::new(sock).file_name().unwrap().to_str().unwrap();
    assert_eq!(
        Path::new(sock).parent().unwrap().to_str().unwrap(),
        volume_path(csi, "plugin-dir")
    );
    let flag = |c: &Value, name: &str| -> String {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|a| s(a).strip_prefix(&format!("--{name}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("{} has no --{name}", c["name"]))
    };
    assert_eq!(
        flag(registrar, "csi-address"),
        format!("{}/{sock_name}", volume_path(registrar, "plugin-dir"))
    );
    assert_eq!(
        flag(registrar, "kubelet-registration-path"),
        format!("{}/{sock_name}", host_path("plugin-dir"))
    );
    assert!(host_path("plugin-dir").ends_with(shoal_csi::DRIVER_NAME));
    for c in [node, csi] {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "kubelet-pods")
            .unwrap_or_else(|| panic!("{} does not mount kubelet-pods", c["name"]));
        assert_eq!(
            m["mountPath"],
            host_path("kubelet-pods").as_str(),
            "{}",
            c["name"]
        );
        assert_eq!(m["mountPropagation"], "Bidirectional", "{}", c["name"]);
    }
    assert_eq!(env_of(csi, "SHOAL_HOME"), home);
    assert_eq!(volume_path(csi, "state"), home);

    // The config as the node container sees it: the cluster key where the Secret is
    // mounted, peers found through the headless Service's name on its p2p port.
    let key_path = format!("{}/{key_file}", volume_path(node, "cluster-key"));
    assert!(
        config.contains(&format!("cluster_key = \"{key_path}\"")),
        "{config}"
    );
    let svc_dns = format!(
        "/dns4/{}.{ns}.svc.cluster.local/tcp/{p2p}",
        s(&svc["metadata"]["name"])
    );
    assert!(
        config.contains(&svc_dns),
        "bootstrap through {svc_dns}: {config}"
    );
    assert_eq!(svc["spec"]["clusterIP"], "None", "a headless Service");

    // Now run it: a publisher puts the version the ConfigMap lists at the configured S3
    // origin (a real S3 server), and the DaemonSet's node and mounter run with the
    // ConfigMap's config, only machine-specific paths and ports replaced.
    let (_moto, aws) = moto();
    let s3_port: u16 = aws
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .unwrap()
        .1
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let origin_url = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("url = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("an [[origin]] url")
        .to_string();
    let bucket = origin_url
        .strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .expect("an s3:// origin");
    assert!(http(s3_port, "PUT", &format!("/{bucket}")).contains("200"));
    let mut publisher = Env::new();
    publisher.origin = origin_url.clone();
    publisher.extra_env = aws.clone();
    let data = publisher.path("data");
    common::sample_tree(&data);
    publisher.json(&["publish", data.to_str().unwrap(), &first_ref]);
    let trusted = publisher.key();

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cluster_dir = dir.path().join("cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let key_local = cluster_dir.join(&key_file);
    common::keygen(&key_local);
    let (p2p_local, metrics_local) = (common::free_port(), common::free_port());
    let mut local = replace_once(
        &config,
        "# trusted_keys = [\"ed25519:<64 hex digits>\"]",
        &format!("trusted_keys = [\"{trusted}\"]"),
    );
    local = replace_once(&local, &key_path, key_local.to_str().unwrap());
    local = replace_once(
        &local,
        &format!("/ip4/0.0.0.0/tcp/{p2p}"),
        &format!("/ip4/127.0.0.1/tcp/{p2p_local}"),
    );
    local = replace_once(
        &local,
        &format!("0.0.0.0:{metrics}"),
        &format!("127.0.0.1:{metrics_local}"),
    );
    // No cluster DNS here: the first pod of a DaemonSet finds nobody either.
    local = replace_once(&local, &format!("\"{svc_dns}\""), "");
    // The init container's copy.
    write(&state.join("config.toml"), local.as_bytes());

    let args: Vec<String> = node["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| s(a).to_string())
        .collect();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let daemon = Command::new(BIN)
        .args(&args)
        .env("SHOAL_HOME", &state)
        .envs(aws.iter().cloned())
        .env_remove("SHOAL_ORIGIN")
        .env_remove("SHOAL_TRUSTED_KEYS")
        .stderr(log)
        .spawn()
        .unwrap();
    let _daemon = common::Server(daemon);
    let node_log = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    // The readiness probe passes, the liveness probe's port listens.
    let probe: Vec<String> = node["readinessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| s(a).to_string())
        .collect();
    assert_eq!(probe[0], "shoal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ok = Command::new(BIN)
            .args(&probe[1..])
            .env("SHOAL_HOME", &state)
            .output()
            .unwrap()
            .status
            .success();
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the readiness probe did not pass in 30 s: {}",
            node_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(node["livenessProbe"]["tcpSocket"]["port"], "p2p");
    wait_for_port(p2p_local, "the node's p2p port");
    // What the PodMonitor scrapes.
    wait_for_port(metrics_local, "the metrics endpoint");
    let scrape = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", metrics_local)).unwrap();
        write!(
            c,
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            s(&ep["path"])
        )
        .unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).unwrap();
        r
    };
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("\nshoal_"), "no shoal_ metrics: {scrape}");

    // The mounter's script, its paths moved under the test's directory.
    let script = s(&mounter["command"][2]).to_string();
    let config_dir = volume_path(mounter, "config");
    let mounts_dir = volume_path(mounter, "mounts");
    assert_eq!(mounts_dir, host_mounts, "mounted at the host path it shows");
    let local_config = dir.path().join("config");
    write(&local_config.join("mounts"), mounts_list.as_bytes());
    let local_mounts = dir.path().join("mounts");
    let script = replace_all(&script, &config_dir, local_config.to_str().unwrap());
    let script = replace_all(&script, &mounts_dir, local_mounts.to_str().unwrap());
    let bin_dir = Path::new(BIN).parent().unwrap();
    let mp = local_mounts.join(&first_ref);
    let mut group = Group {
        child: {
            use std::os::unix::process::CommandExt;
            Command::new(s(&mounter["command"][0]))
                .arg(s(&mounter["command"][1]))
                .arg(&script)
                .env("SHOAL_HOME", &state)
                .env(
                    "PATH",
                    format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
                )
                .env_remove("SHOAL_ORIGIN")
                .env_remove("SHOAL_TRUSTED_KEYS")
                .stdout(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap()
        },
        mounts: vec![mp.clone()],
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !is_mounted(&mp) {
        if let Ok(Some(st)) = group.child.try_wait() {
            panic!("the mounter exited ({st}): {}", node_log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{first_ref} not mounted within 30 s: {}",
            node_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    common::assert_same_tree(&data, &mp);
    drop(group);
    assert!(!is_mounted(&mp));

    // The csi container's command against the same daemon, its socket moved here; kubelet's
    // call for the CSI training pod's volume mounts the version at the pod's path.
    let local_sock = dir
        .path()
        .join("plugins")
        .join(shoal_csi::DRIVER_NAME)
        .join(sock_name);
    let local_pods = dir.path().join("kubelet/pods");
    let target = local_pods.join("uid-1/volumes/kubernetes.io~csi/imagenet/mount");
    let csi_args: Vec<String> = csi["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| s(a).to_string())
        .collect();
    let plugin = Command::new(BIN)
        .args(&csi_args)
        .env("SHOAL_HOME", &state)
        .env("CSI_ENDPOINT", format!("unix://{}", local_sock.display()))
        .env("NODE_ID", "node-1")
        .env_remove("SHOAL_ORIGIN")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut plugin = Group {
        child: plugin,
        mounts: vec![target.clone()],
    };
    shoal_testnet::wait_for(20, "the CSI socket", || {
        assert!(
            plugin.child.try_wait().unwrap().is_none(),
            "shoal csi exited"
        );
        local_sock.exists().then_some(())
    });
    let attributes: std::collections::HashMap<String, String> = csi_volume["volumeAttributes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), s(v).to_string()))
        .collect();
    assert_eq!(attributes["ref"], first_ref);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use shoal_csi::proto::{node_client::NodeClient, *};
        let mut node = NodeClient::new(shoal_csi::connect(&local_sock).await.unwrap());
        let mut volume_context = attributes.clone();
        volume_context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: "csi-0123".into(),
            target_path: target.display().to_string(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(volume_capability::AccessType::Mount(Default::default())),
                access_mode: Some(volume_capability::AccessMode {
                    mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            readonly: csi_volume["readOnly"] == true,
            volume_context,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(is_mounted(&target));
        common::assert_same_tree(&data, &target);
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "csi-0123".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        assert!(!is_mounted(&target) && !target.exists());
    });
    let _ = Command::new("kill")
        .arg(plugin.child.id().to_string())
        .status();
    assert!(plugin.child.wait().unwrap().success());
}

fn replace_all(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} in the mounter's script");
    text.replace(from, to)
}
