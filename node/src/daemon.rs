//! The node daemon (`shoal node run`): owns the local store and the swarm, and serves the CLI
//! over a Unix socket under the state directory (`node.sock`), one JSON document per line.
//!
//! A request is one line (`{"op": "pull", ...}`); the daemon answers with any number of
//! `{"progress": [phase, done, total]}` lines and then one `{"ok": ...}` or `{"error": "..."}`.

use crate::error::{Error, Result};
use crate::mount::MountSpec;
use crate::progress::Progress;
use crate::swarm::{self, Holding, Status, SwarmConfig};
use crate::{Home, Node};
use serde::{Deserialize, Serialize};
use shoal_registry::{DatasetName, DatasetRef, Origin, PublicKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// What the CLI asks of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pull {
        reference: String,
        to: Option<PathBuf>,
        origin: String,
    },
    Status,
    Versions {
        name: String,
        origin: String,
    },
    Ls {
        reference: String,
        path: String,
        origin: String,
    },
    /// Fetch a version into the primary disk tier and pin it.
    Pin {
        reference: String,
        origin: String,
    },
    Unpin {
        reference: String,
        origin: String,
    },
    /// Usage, pins and hit rates per tier.
    Cache,
    /// Drop everything no pin needs.
    Gc,
    /// Mount a version and serve it until it is unmounted or this connection closes.
    Mount {
        reference: String,
        origin: String,
        spec: MountSpec,
    },
}

/// A request as sent: the operation, and publisher keys the CLI trusts (its config file and
/// `SHOAL_TRUSTED_KEYS`) on top of the daemon's own.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    request: Request,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    trusted: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Progress(String, u64, u64),
    /// A line for the user (e.g. "mounted ... at ...").
    Notice(String),
    Ok(serde_json::Value),
    Error(String),
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub swarm: SwarmConfig,
    pub metrics: Option<SocketAddr>,
}

/// A connection to a running daemon.
pub struct Client {
    stream: UnixStream,
    trusted: Vec<String>,
}

impl Client {
    /// Connects to the daemon of `home`, or None if none is running.
    pub async fn connect(home: &Home) -> Option<Client> {
        UnixStream::connect(home.socket_path())
            .await
            .ok()
            .map(|stream| Client {
                stream,
                trusted: Vec::new(),
            })
    }

    /// Has the daemon also trust these publisher keys for this client's requests.
    pub fn trusting(mut self, keys: &[PublicKey]) -> Client {
        self.trusted = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    /// Sends one request; progress lines update `progress`; returns the result.
    pub async fn call(self, req: &Request, progress: &Progress) -> Result<serde_json::Value> {
        self.call_with(req, progress, |_| {}).await
    }

    /// Like [`Self::call`], handing the daemon's notices to `notice` as they come.
    pub async fn call_with(
        self,
        req: &Request,
        progress: &Progress,
        mut notice: impl FnMut(String),
    ) -> Result<serde_json::Value> {
        let (r, mut w) = self.stream.into_split();
        let envelope = Envelope {
            request: req.clone(),
            trusted: self.trusted.clone(),
        };
        let mut line = serde_json::to_string(&envelope).expect("requests serialize");
        line.push('\n');
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| Error::Net(format!("sending to the node daemon: {e}")))?;
        let mut lines = BufReader::new(r).lines();
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| Error::Net(format!("reading from the node daemon: {e}")))?
                .ok_or_else(|| Error::Net("the node daemon closed the connection".into()))?;
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|e| Error::Net(format!("unexpected reply from the node daemon: {e}")))?;
            match reply {
                Reply::Progress(phase, done, total) => {
                    progress.phase(phase_name(&phase), total);
                    progress.add(done);
                }
                Reply::Notice(n) => notice(n),
                Reply::Ok(v) => return Ok(v),
                Reply::Error(e) => return Err(Error::Net(e)),
            }
        }
    }
}

fn phase_name(s: &str) -> &'static str {
    match s {
        "resolving" => "resolving",
        "reading tree" => "reading tree",
        "fetching" => "fetching",
        "writing files" => "writing files",
        _ => "working",
    }
}

/// Runs the daemon until SIGINT or SIGTERM. `ready` is called once it listens.
pub async fn run(node: Node, opts: DaemonOptions, ready: impl FnOnce(&Status)) -> Result<()> {
    let home = node.home().clone();
    let sock = home.socket_path();
    if UnixStream::connect(&sock).await.is_ok() {
        return Err(Error::Net(format!(
            "a node daemon is already running for {} (socket {})",
            home.root().display(),
            sock.display()
        )));
    }
    let _ = std::fs::remove_file(&sock);
    std::fs::create_dir_all(home.root()).map_err(crate::error::io("creating", home.root()))?;

    let keypair = swarm::identity(&home)?;
    let store = node.store()?;
    let sw = swarm::start(keypair, store, home.pack_cache_dir(), opts.swarm).await?;
    for (root, name) in home.held()? {
        sw.hold(root, &name, Holding::Complete, None);
    }
    node.attach_swarm(sw.clone());
    if let Some(addr) = opts.metrics {
        let bound = swarm::metrics::serve(sw.clone(), addr)?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let listener = UnixListener::bind(&sock)
        .map_err(|e| Error::Net(format!("listening on {}: {e}", sock.display())))?;
    // Only the daemon's own user may drive it (it mounts, pulls and trusts keys on request).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(crate::error::io("restricting", &sock))?;
    }
    ready(&sw.status());

    let daemon = Arc::new(Daemon {
        node: Arc::new(node),
        others: Mutex::default(),
        mounts: Mutex::default(),
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Net(format!("installing a SIGTERM handler: {e}")))?;
    let result = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(daemon, stream).await {
                            tracing::debug!("local client: {e}");
                        }
                    });
                }
                Err(e) => break Err(Error::Net(format!("accepting on {}: {e}", sock.display()))),
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
        }
    };
    let _ = std::fs::remove_file(&sock);
    // Mounts served here end with the daemon; leave none behind.
    let mounts: Vec<PathBuf> = daemon
        .mounts
        .lock()
        .expect("poisoned")
        .keys()
        .cloned()
        .collect();
    for mp in mounts {
        if let Err(e) = crate::mount::unmount(&mp) {
            tracing::warn!("{e}");
        }
    }
    if let Ok(s) = daemon.node.store() {
        let _ = s.flush();
    }
    result
}

/// What the daemon's local clients share.
struct Daemon {
    node: Arc<Node>,
    /// Siblings of `node` for requests naming another origin.
    others: Mutex<HashMap<String, Arc<Node>>>,
    /// Mount points served now, with the reference each serves.
    mounts: Mutex<HashMap<PathBuf, String>>,
}

impl Daemon {
    /// The node for a request's origin and extra trusted keys: the daemon's own, or a sibling
    /// sharing store and swarm.
    fn node_for(&self, origin: &str, trusted: &[PublicKey]) -> Result<Arc<Node>> {
        let own = if trusted.is_empty() {
            Vec::new()
        } else {
            self.node.trusted_keys()?
        };
        let extra: Vec<PublicKey> = trusted
            .iter()
            .filter(|k| !own.contains(k))
            .copied()
            .collect();
        let same_origin = origin == self.node.origin().url() || origin.is_empty();
        if same_origin && extra.is_empty() {
            return Ok(self.node.clone());
        }
        let mut key = origin.to_string();
        for k in &extra {
            key.push(' ');
            key.push_str(&k.to_string());
        }
        let mut o = self.others.lock().expect("poisoned");
        if let Some(n) = o.get(&key) {
            return Ok(n.clone());
        }
        let origin = if same_origin {
            self.node.origin().clone()
        } else {
            Origin::open(origin, false)?
        };
        let n = Arc::new(self.node.with_origin(origin).trusting(extra));
        o.insert(key, n.clone());
        Ok(n)
    }
}

async fn serve(daemon: Arc<Daemon>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    // One request per connection: the client closing its end means it went away.
    let gone = async move { while let Ok(Some(_)) = lines.next_line().await {} };
    let progress = Arc::new(Progress::default());
    let (notice_tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    let work = handle(daemon, line, progress.clone(), notice_tx, Box::pin(gone));
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last = None;
    let mut client_gone = false;
    let reply = loop {
        let line = tokio::select! {
            r = &mut work => break r,
            Some(n) = notices.recv() => Reply::Notice(n),
            _ = tick.tick() => {
                let p = progress.get();
                if last == Some(p) {
                    continue;
                }
                last = Some(p);
                let (phase, done, total) = p;
                Reply::Progress(phase.into(), done, total)
            }
        };
        if client_gone {
            continue;
        }
        let mut l = serde_json::to_string(&line).expect("serializes");
        l.push('\n');
        // If the CLI went away, finish the work anyway (a pull stays useful; a mount notices
        // and unmounts).
        client_gone = w.write_all(l.as_bytes()).await.is_err();
    };
    let reply = match reply {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e.to_string()),
    };
    let mut l = serde_json::to_string(&reply).expect("serializes");
    l.push('\n');
    w.write_all(l.as_bytes()).await
}

async fn handle(
    daemon: Arc<Daemon>,
    line: String,
    progress: Arc<Progress>,
    notices: tokio::sync::mpsc::UnboundedSender<String>,
    gone: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<serde_json::Value> {
    let Envelope { request, trusted } = serde_json::from_str(&line)
        .map_err(|e| Error::Net(format!("bad request from the CLI: {e}")))?;
    let trusted = trusted
        .iter()
        .map(|k| k.parse::<PublicKey>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Net(format!("bad trusted key from the CLI: {e}")))?;
    Ok(match request {
        Request::Status => {
            let mut status = daemon.node.swarm().expect("attached").status();
            let mut mounts: Vec<swarm::MountStatus> = daemon
                .mounts
                .lock()
                .expect("poisoned")
                .iter()
                .map(|(mp, r)| swarm::MountStatus {
                    mountpoint: mp.display().to_string(),
                    reference: r.clone(),
                })
                .collect();
            mounts.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
            status.mounts = mounts;
            serde_json::to_value(status)
        }
        Request::Pull {
            reference,
            to,
            origin,
        } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let r = n.pull(&reference, to.as_deref(), &progress).await?;
            serde_json::to_value(r)
        }
        Request::Versions { name, origin } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let name: DatasetName = name.parse()?;
            let list = n.versions(&name).await?;
            serde_json::to_value(list)
        }
        Request::Ls {
            reference,
            path,
            origin,
        } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            serde_json::to_value(n.ls(&reference, &path).await?)
        }
        Request::Pin { reference, origin } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let r = n.pin(&reference, &progress).await?;
            n.store()?.flush()?;
            serde_json::to_value(r)
        }
        Request::Unpin { reference, origin } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            serde_json::to_value(n.unpin(&reference).await?)
        }
        Request::Cache => {
            let store = daemon.node.store()?;
            let mut stats = tokio::task::spawn_blocking(move || store.stats())
                .await
                .map_err(|e| Error::Net(e.to_string()))??;
            stats.whole_files = daemon.node.whole_files().map(|w| w.stats());
            serde_json::to_value(stats)
        }
        Request::Gc => {
            let store = daemon.node.store()?;
            let freed = tokio::task::spawn_blocking(move || store.gc())
                .await
                .map_err(|e| Error::Net(e.to_string()))??;
            let copies = daemon.node.whole_files().map_or(0, |w| w.clear());
            serde_json::to_value(freed + copies)
        }
        Request::Mount {
            reference,
            origin,
            spec,
        } => {
            let n = daemon.node_for(&origin, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let mp = spec.mountpoint.clone();
            {
                let mut mounts = daemon.mounts.lock().expect("poisoned");
                if mounts.contains_key(&mp) {
                    return Err(Error::Net(format!(
                        "{} is already a mount served by this node",
                        mp.display()
                    )));
                }
                mounts.insert(mp.clone(), reference.to_string());
            }
            let r = n
                .serve_mount(
                    &reference,
                    &spec,
                    "daemon",
                    |notice| {
                        let _ = notices.send(notice);
                    },
                    gone,
                )
                .await;
            daemon.mounts.lock().expect("poisoned").remove(&mp);
            serde_json::to_value(r?)
        }
    }
    .expect("reports serialize"))
}
