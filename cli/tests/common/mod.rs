//! Helpers for tests that run the real `shoal` binary.
#![allow(dead_code)]

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// A state directory and an origin, isolated per test.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub origin: String,
    pub extra_env: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let origin = dir.path().join("origin").display().to_string();
        Env {
            dir,
            home,
            origin,
            extra_env: Vec::new(),
        }
    }

    /// Another machine (own state dir and key) sharing this origin.
    pub fn peer(&self, name: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join(name);
        Env {
            dir,
            home,
            origin: self.origin.clone(),
            extra_env: self.extra_env.clone(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("SHOAL_HOME", &self.home)
            .env("SHOAL_ORIGIN", &self.origin)
            .env_remove("SHOAL_TRUSTED_KEYS");
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs with --json, asserts success, returns the document.
    pub fn json(&self, args: &[&str]) -> Value {
        self.json_with(args, &[])
    }

    /// As [`Env::json`], with `vars` set in the command's environment.
    pub fn json_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cmd(&a).envs(vars.iter().copied()).output().unwrap();
        assert!(
            out.status.success(),
            "shoal {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "shoal {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs, asserts failure, returns stderr. Also checks the failure is a clean one-line
    /// error, not a panic.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "shoal {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "shoal {args:?}: exit {:?}, stderr: {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "shoal {args:?} panicked: {err}");
        assert!(err.starts_with("error: "), "shoal {args:?}: {err}");
        err
    }

    pub fn key(&self) -> String {
        self.json(&["key"])["public_key"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for chunking tests.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    shoal_testnet::random_bytes(seed, len)
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A small dataset with nesting, modes, an empty file, an empty dir and a symlink.
pub fn sample_tree(root: &Path) {
    write(&root.join("big.bin"), &random_bytes(1, 3_000_000));
    write(&root.join("a/b/c.txt"), b"hello shoal\n");
    write(&root.join("a/run.sh"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        root.join("a/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write(&root.join("a/readonly.dat"), &random_bytes(2, 70_000));
    std::fs::set_permissions(
        root.join("a/readonly.dat"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    write(&root.join("empty"), b"");
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    std::os::unix::fs::symlink("../big.bin", root.join("a/link")).unwrap();
    for i in 0..20 {
        write(
            &root.join(format!("many/f{i:02}")),
            &random_bytes(100 + i, 1000 + i as usize * 3000),
        );
    }
}

/// The string field `field` of every object in the JSON array `list`.
pub fn strs(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|e| {
            e[field]
                .as_str()
                .unwrap_or_else(|| panic!("no {field}: {e}"))
                .to_string()
        })
        .collect()
}

/// Asserts that two trees hold the same names, kinds, bytes, modes and link targets.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let list = |root: &Path| {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let desc = if m.file_type().is_symlink() {
                    format!("link {}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_dir() {
                    stack.push(p.clone());
                    format!("dir {:o}", m.permissions().mode() & 0o777)
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    format!(
                        "file {:o} {} {:x}",
                        m.permissions().mode() & 0o777,
                        bytes.len(),
                        fxhash(&bytes)
                    )
                };
                v.push((rel, desc));
            }
        }
        v.sort();
        v
    };
    assert_eq!(
        list(a),
        list(b),
        "trees differ: {} vs {}",
        a.display(),
        b.display()
    );
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100000001b3)
    })
}

/// Every file under `root` with its size (for checking that nothing escaped a destination).
pub fn all_paths(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p.clone());
                }
                v.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    v.sort();
    v
}

/// The largest pack object of a local origin.
pub fn first_pack(origin: &str) -> PathBuf {
    // The largest: a version's files' chunks (its tree nodes are in packs of their own).
    std::fs::read_dir(Path::new(origin).join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a pack in the origin")
}

/// nginx serving a directory over HTTP (with Range support, as an HTTP origin needs), on a
/// port that can be stopped and started again. Stopped on drop.
pub struct Nginx {
    conf: PathBuf,
    port: u16,
    child: std::cell::RefCell<Option<std::process::Child>>,
}

impl Nginx {
    /// Serves `root`, keeping nginx's files under `dir`.
    pub fn start(root: &str, dir: &Path) -> Nginx {
        Self::start_with(root, dir, "")
    }

    /// Serves `root` with extra directives in its `server` block (e.g. `limit_rate 4m;`).
    pub fn start_with(root: &str, dir: &Path, directives: &str) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join(format!("nginx-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; worker_processes 1; pid {d}/nginx-{port}.pid; error_log {d}/nginx-{port}.err;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 server {{ listen 127.0.0.1:{port}; root {root}; {directives} }} }}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let n = Nginx {
            conf,
            port,
            child: Default::default(),
        };
        n.restart();
        n
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn restart(&self) {
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nginx ({e}); the README's test command installs it (nginx-light)"
                )
            });
        *self.child.borrow_mut() = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not start listening on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn stop(&self) {
        if let Some(mut c) = self.child.borrow_mut().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes in the local store's segment files under a state directory.
pub fn stored_bytes(home: &Path) -> u64 {
    std::fs::read_dir(home.join("store/segments"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Whether `mp` is a mount point now (per /proc/mounts).
pub fn is_mounted(mp: &Path) -> bool {
    let canon = mp.canonicalize().unwrap_or(mp.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canon.to_str().unwrap()))
}

/// Reading `path` fails with EIO, and sooner than `bound`.
pub fn assert_eio_within(path: &Path, bound: std::time::Duration) {
    let t = std::time::Instant::now();
    let err = std::fs::read(path).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected, got {err}");
    assert!(
        waited < bound,
        "the read waited {waited:?}, beyond the bound"
    );
}
pub mod cluster;

/// A server process the test started, killed when dropped (pass or fail).
pub struct Server(pub std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start listening on port {port} within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A raw HTTP request; returns the status line.
pub fn http(port: u16, method: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    use std::io::{Read, Write};
    let _ = s.read_to_string(&mut resp);
    resp.lines().next().unwrap_or_default().to_string()
}

/// Writes a new cluster key file at `path` (`shoal node keygen`).
pub fn keygen(path: &Path) {
    let out = Command::new(BIN)
        .args(["node", "keygen"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal node keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts moto_server on a free port with one bucket; returns the guard and the env vars
/// that point shoal at it.
pub fn moto() -> (Server, Vec<(String, String)>) {
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start moto_server ({e}); the README's test command installs it (pip install 'moto[server]')"));
    let server = Server(child);
    wait_for_port(port, "moto_server");
    assert!(
        http(port, "PUT", "/shoal-test").contains("200"),
        "creating the test bucket failed"
    );
    let env = vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        (
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ),
    ];
    (server, env)
}

/// A running `shoal mount`; unmounted and reaped on drop, pass or fail.
pub struct Mounted {
    pub child: Option<std::process::Child>,
    pub mp: PathBuf,
}

impl Mounted {
    pub fn start(env: &Env, reference: &str, mp: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mp).unwrap();
        let mut args = vec!["--json", "mount", reference, mp.to_str().unwrap()];
        args.extend_from_slice(extra);
        let log = std::fs::File::create(env.path("mount.log")).unwrap();
        let child = env
            .cmd(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let m = Mounted {
            child: Some(child),
            mp: mp.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !is_mounted(mp) {
            assert!(
                std::time::Instant::now() < deadline,
                "not mounted within 30 s: {}",
                std::fs::read_to_string(env.path("mount.log")).unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        m
    }

    /// Unmounts with `shoal unmount` and returns the mount's JSON report.
    pub fn stop(mut self, env: &Env) -> serde_json::Value {
        env.json(&["unmount", self.mp.to_str().unwrap()]);
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(out.status.success(), "mount process failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mp)
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
