//! A harness that runs real Shoal node processes on loopback, for tests and benchmarks.
//!
//! A [`Cluster`] owns a temporary directory with one origin and a publisher; [`Cluster::node`]
//! starts `shoal node run` with its own state directory, listening on 127.0.0.1, bootstrapped
//! from the first node, and waits until it answers `shoal status`. Every wait has a deadline
//! and fails with what it was waiting for. Dropping the cluster kills every process it started.

pub mod fuzz;
pub mod hostile;
pub mod scale;
pub mod sim;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Deterministic pseudo-random bytes (xorshift): incompressible test and benchmark data.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits until `cond` returns Some, polling, or panics after `secs` naming `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One origin, one publisher, and the nodes started on it.
pub struct Cluster {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub origin: String,
    pub publisher: PathBuf,
    pub trusted: String,
    pub nodes: Vec<NodeProc>,
}

/// A running (or killed) `shoal node run`.
pub struct NodeProc {
    pub name: String,
    pub home: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command the daemon runs under (e.g. `prlimit --nofile=1024:1024 --`).
    pub wrap: Vec<String>,
    pub child: Option<Child>,
    pub peer_id: String,
    pub addr: String,
    bin: PathBuf,
    origin: String,
    trusted: String,
}

impl Cluster {
    /// A cluster using the `shoal` binary at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Cluster {
        let bin = bin.into();
        let dir = tempfile::tempdir().expect("temp dir");
        let origin = dir.path().join("origin").display().to_string();
        let publisher = dir.path().join("publisher");
        let out = Command::new(&bin)
            .args(["key"])
            .env("SHOAL_HOME", &publisher)
            .output()
            .expect("running shoal key");
        assert!(out.status.success(), "shoal key failed");
        let trusted = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Cluster {
            bin,
            dir,
            origin,
            publisher,
            trusted,
            nodes: Vec::new(),
        }
    }

    /// Publishes `dir` as `target` from the publisher's state directory.
    pub fn publish(&self, dir: &Path, target: &str) -> Value {
        let out = Command::new(&self.bin)
            .args(["--json", "publish"])
            .arg(dir)
            .arg(target)
            .env("SHOAL_HOME", &self.publisher)
            .env("SHOAL_ORIGIN", &self.origin)
            .output()
            .expect("running shoal publish");
        assert!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("publish JSON")
    }

    /// A state directory for a machine named `name` (not started).
    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a node named `name`; `args` are extra `node run` flags, `env` extra variables
    /// (for the daemon and every command run as this machine, e.g. its own `SHOAL_ORIGIN`).
    /// Nodes after the first bootstrap from the first (by address only, no peer id).
    pub fn node(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(first) = self.nodes.first() {
            if !args.iter().any(|a| a == "--bootstrap") {
                args.push("--bootstrap".into());
                args.push(first.addr.clone());
            }
        }
        let mut n = NodeProc {
            name: name.to_string(),
            home: self.home(name),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrap: Vec::new(),
            child: None,
            peer_id: String::new(),
            addr: String::new(),
            bin: self.bin.clone(),
            origin: self.origin.clone(),
            trusted: self.trusted.clone(),
        };
        n.start();
        self.nodes.push(n);
        self.nodes.len() - 1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
    }
}

impl NodeProc {
    /// A `shoal` command as this machine.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("SHOAL_HOME", &self.home)
            .env("SHOAL_ORIGIN", &self.origin)
            .env("SHOAL_TRUSTED_KEYS", &self.trusted)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running shoal")
    }

    /// Runs with --json and returns the document; panics on failure with stderr.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "{}: shoal {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    pub fn status(&self) -> Option<Value> {
        let out = self.run(&["--json", "status"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Starts (or restarts) the daemon and waits until it answers.
    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.home).expect("creating node home");
        let log = std::fs::File::create(self.home.join("node.log")).expect("node log");
        let mut args: Vec<String> = vec!["node".into(), "run".into(), "--no-mdns".into()];
        if !self.args.iter().any(|a| a == "--listen") {
            args.extend(["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
        }
        args.extend(self.args.iter().cloned());
        let mut c = match self.wrap.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&self.bin).args(&args);
                c.env("SHOAL_HOME", &self.home)
                    .env("SHOAL_ORIGIN", &self.origin)
                    .env("SHOAL_TRUSTED_KEYS", &self.trusted)
                    .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                c
            }
            None => {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                self.cmd(&refs)
            }
        };
        c.env(
            "SHOAL_LOG",
            "warn,shoal_node=debug,shoal_swarm=debug,shoal_store=debug",
        )
        .stdout(Stdio::null())
        .stderr(log);
        self.child = Some(c.spawn().expect("starting shoal node run"));
        let s = wait_for(30, &format!("node {} to answer status", self.name), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("node {} exited with {st}: {}", self.name, self.log());
            }
            self.status()
        });
        self.peer_id = s["peer_id"].as_str().expect("peer id").to_string();
        self.addr = s["listen"][0].as_str().expect("listen address").to_string();
    }

    /// Connected peers, per `status`.
    pub fn connected(&self) -> usize {
        self.status()
            .map(|s| {
                s["peers"]
                    .as_array()
                    .map(|p| p.iter().filter(|p| p["connected"] == true).count())
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Waits until this node sees `n` connected peers.
    pub fn wait_peers(&self, n: usize) {
        wait_for(
            30,
            &format!("{} to connect to {n} peers", self.name),
            || (self.connected() >= n).then_some(()),
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("node.log")).unwrap_or_default()
    }
}
