//! The node daemon (`shoal node run`): owns the local store and the swarm, and serves the CLI
//! over a Unix socket under the state directory (`node.sock`), one JSON document per line.
//!
//! A request is one line (`{"op": "pull", ...}`); the daemon answers with any number of
//! `{"progress": [phase, done, total]}` lines and then one `{"ok": ...}` or `{"error": "..."}`.

use crate::error::{Error, ErrorKind, Result};
use crate::limits::Limits;
use crate::mount::MountSpec;
use crate::origins::{OriginSpec, Origins};
use crate::progress::Progress;
use crate::select::Selection;
use crate::swarm::{self, Holding, Status, SwarmConfig};
use crate::{Home, Node};
use serde::{Deserialize, Serialize};
use shoal_registry::{DatasetName, DatasetRef, TrustedKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// What the CLI asks of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pull {
        reference: String,
        to: Option<PathBuf>,
        origin: String,
        /// Only some files (`--include`, `--exclude`).
        #[serde(default, skip_serializing_if = "Selection::is_all")]
        select: Selection,
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
        #[serde(default, skip_serializing_if = "Selection::is_all")]
        select: Selection,
    },
    Unpin {
        reference: String,
        origin: String,
    },
    /// Usage, pins and hit rates per tier.
    Cache,
    /// Drop everything no pin needs.
    Gc,
    /// Check the local store's copy of a version (`shoal verify --local`).
    VerifyLocal {
        reference: String,
        origin: String,
    },
    /// Copy versions to another origin (`shoal replicate`), reading what this node's store
    /// and its peers hold before the origins.
    Replicate {
        refs: Vec<String>,
        /// Datasets every version of which is copied.
        all: Vec<String>,
        to: String,
        #[serde(default)]
        options: crate::ReplicateOptions,
        origin: String,
    },
    /// Mount a version and serve it until it is unmounted or this connection closes.
    Mount {
        reference: String,
        origin: String,
        spec: MountSpec,
    },
    /// Read a version's files over this connection (`crate::files`: the Python package).
    Files {
        reference: String,
        origin: String,
    },
}

impl Request {
    /// The operation's name, for logs and traces.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Pull { .. } => "pull",
            Request::Status => "status",
            Request::Versions { .. } => "versions",
            Request::Ls { .. } => "ls",
            Request::Pin { .. } => "pin",
            Request::Unpin { .. } => "unpin",
            Request::Cache => "cache",
            Request::Gc => "gc",
            Request::VerifyLocal { .. } => "verify_local",
            Request::Replicate { .. } => "replicate",
            Request::Mount { .. } => "mount",
            Request::Files { .. } => "files",
        }
    }
}

/// A request as sent: the operation, and publisher keys the CLI trusts (its config file and
/// `SHOAL_TRUSTED_KEYS`) on top of the daemon's own.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    request: Request,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    trusted: Vec<String>,
    /// Every origin the CLI is configured with, when more than the request's `origin` (the
    /// first of them) or with labels; a daemon from before several origins reads `origin`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    origins: Vec<OriginSpec>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Progress(String, u64, u64),
    /// A line for the user (e.g. "mounted ... at ...").
    Notice(String),
    Ok(serde_json::Value),
    Error(ErrorReply),
}

/// A failure as the daemon sends it: `{"kind": "verify", "message": "..."}` (daemons before
/// error kinds sent the message alone).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum ErrorReply {
    Kind { kind: ErrorKind, message: String },
    Message(String),
}

impl ErrorReply {
    fn of(e: &Error) -> ErrorReply {
        ErrorReply::Kind {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub swarm: SwarmConfig,
    pub metrics: Option<SocketAddr>,
    pub limits: Limits,
}

/// Longest request line a local client may send (a request names a reference, an origin, a
/// few paths and keys: kilobytes).
pub const MAX_REQUEST_LINE: usize = 1 << 20;
/// How long a local client has to send its request after connecting.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// Nodes kept for requests naming another origin or extra keys.
const MAX_SIBLINGS: usize = 64;
/// Notices (mount messages) queued for one client before more are dropped.
const NOTICES: usize = 64;

/// A connection to a running daemon.
pub struct Client {
    stream: UnixStream,
    trusted: Vec<String>,
    origins: Vec<OriginSpec>,
}

impl Client {
    /// Connects to the daemon of `home`, or None if none is running.
    ///
    /// Cancel-safe: nothing is sent before it returns.
    pub async fn connect(home: &Home) -> Option<Client> {
        UnixStream::connect(home.socket_path())
            .await
            .ok()
            .map(|stream| Client {
                stream,
                trusted: Vec::new(),
                origins: Vec::new(),
            })
    }

    /// Has the daemon also trust these publisher keys for this client's requests.
    pub fn trusting(mut self, keys: &[TrustedKey]) -> Client {
        self.trusted = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    /// Has the daemon read from these origins for this client's requests (all of the CLI's,
    /// with their labels; a single unlabelled one is the request's `origin` alone).
    pub fn with_origins(mut self, origins: &[OriginSpec]) -> Client {
        let plain = origins.len() == 1 && origins[0] == OriginSpec::new(origins[0].url.clone());
        self.origins = if plain { Vec::new() } else { origins.to_vec() };
        self
    }

    /// Sends one request; progress lines update `progress`; returns the result.
    ///
    /// Not cancel-safe for the request: once sent, the daemon carries it out whether or not the
    /// reply is read (dropping the call only stops waiting; a mount asked this way is unmounted
    /// when the connection closes).
    pub async fn call(self, req: &Request, progress: &Progress) -> Result<serde_json::Value> {
        self.call_with(req, progress, |_| {}).await
    }

    /// Like [`Self::call`], handing the daemon's notices to `notice` as they come.
    ///
    /// Cancel-safety as [`Self::call`].
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
            origins: self.origins.clone(),
        };
        let mut line = serde_json::to_string(&envelope).expect("requests serialize");
        line.push('\n');
        // A daemon that refuses a client (too many at once) replies and closes without
        // reading, so the write can fail while its reply waits to be read: read it first.
        let sent = w.write_all(line.as_bytes()).await;
        let unsent = |e: Error| match &sent {
            Err(s) => Error::Net(format!("sending to the node daemon: {s}")),
            Ok(()) => e,
        };
        let mut lines = BufReader::new(r).lines();
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| unsent(Error::Net(format!("reading from the node daemon: {e}"))))?
                .ok_or_else(|| {
                    unsent(Error::Net("the node daemon closed the connection".into()))
                })?;
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|e| Error::Net(format!("unexpected reply from the node daemon: {e}")))?;
            match reply {
                Reply::Progress(phase, done, total) => {
                    progress.phase(phase_name(&phase), total);
                    progress.add(done);
                }
                Reply::Notice(n) => notice(n),
                Reply::Ok(v) => return Ok(v),
                Reply::Error(ErrorReply::Kind { kind, message }) => {
                    return Err(Error::Daemon { kind, message })
                }
                Reply::Error(ErrorReply::Message(m)) => return Err(Error::Net(m)),
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
///
/// Cancelling it stops serving without the orderly unmount and flush of a signal: run it to
/// completion (it returns on SIGINT or SIGTERM).
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
    home.ensure()?;
    let mut opts = opts;
    if let Some(nofile) = crate::limits::raise_nofile() {
        let fitted = opts.limits.fit_to(nofile);
        if fitted != opts.limits {
            tracing::warn!(
                nofile,
                max_connections = fitted.max_connections,
                max_local_clients = fitted.max_local_clients,
                "open-file limit is low: connection limits lowered to fit under it"
            );
        }
        opts.limits = fitted.clone();
        opts.swarm.limits = fitted;
    }

    let keypair = crate::home::node_identity(&home)?;
    let store = node.store()?;
    let sw = swarm::start(keypair, store.clone(), home.pack_cache_dir(), opts.swarm).await?;
    // Only versions still whole are announced: a gc or eviction since the last run may have
    // taken part of one.
    let held = home.held()?;
    let s2 = store.clone();
    let whole: Vec<bool> = tokio::task::spawn_blocking(move || {
        held.iter()
            .map(|(root, _)| crate::walk::complete_locally(s2.as_ref(), *root).unwrap_or(false))
            .collect()
    })
    .await
    .map_err(|e| Error::Net(e.to_string()))?;
    for ((root, name), whole) in home.held()?.into_iter().zip(whole) {
        if whole {
            sw.hold(root, &name, Holding::Complete, None);
        } else {
            tracing::info!(version = %name, "no longer held whole; not announced");
            home.forget_held(&root)?;
        }
    }
    node.attach_swarm(sw.clone());
    let node = Arc::new(node);
    tokio::spawn(watch_held(home.clone(), store.clone(), sw.clone()));
    if let Some(ttl) = node.cache_ttl() {
        tokio::spawn(expire_unused(node.clone(), store.clone(), sw.clone(), ttl));
    }
    if let Some(addr) = opts.metrics {
        let n = node.clone();
        let extra: swarm::metrics::Extra = Arc::new(move |reg| n.metrics().register(&n, reg));
        let bound = swarm::metrics::serve(
            sw.clone(),
            addr,
            opts.limits.max_metrics_clients,
            Some(extra),
        )?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    // The state directory is 0700 (checked above), so the socket is out of other users'
    // reach from the moment it exists; it is made 0600 as well.
    let listener = UnixListener::bind(&sock)
        .map_err(|e| Error::Net(format!("listening on {}: {e}", sock.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(crate::error::io("restricting", &sock))?;
    }
    ready(&sw.status());

    let daemon = Arc::new(Daemon {
        node,
        others: Mutex::default(),
        mounts: Mutex::default(),
        readers: Default::default(),
    });
    let clients = Arc::new(tokio::sync::Semaphore::new(opts.limits.max_local_clients));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Net(format!("installing a SIGTERM handler: {e}")))?;
    let result = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    // Over the limit, a client is told so and closed, rather than queued
                    // behind clients that may hold their connection for hours (mounts).
                    let Ok(permit) = clients.clone().try_acquire_owned() else {
                        tokio::spawn(refuse(stream, opts.limits.max_local_clients));
                        continue;
                    };
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(daemon, stream).await {
                            tracing::debug!("local client: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of descriptors or memory: wait for connections to close; never exit.
                    tracing::warn!("accepting on {}: {e}", sock.display());
                    tokio::time::sleep(crate::limits::accept_backoff(&e)).await;
                }
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

/// How often the daemon looks whether blobs left the store (eviction), which may have made a
/// version it announces whole no longer so.
const HELD_CHECK: Duration = Duration::from_secs(5);

/// Withdraws every version announced whole that no longer is.
///
/// Cancel-safe: it only withdraws announcements.
async fn recheck_held(
    home: &Home,
    store: Arc<dyn crate::store::ChunkStore>,
    sw: &Arc<swarm::Swarm>,
) {
    let roots = sw.complete_versions();
    let gone = tokio::task::spawn_blocking(move || {
        roots
            .into_iter()
            .filter(|r| !crate::walk::complete_locally(store.as_ref(), *r).unwrap_or(false))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for root in gone {
        tracing::info!(root = %root, "version no longer held whole (evicted or collected); withdrawn");
        sw.withdraw(&root);
        if let Err(e) = home.forget_held(&root) {
            tracing::warn!("{e}");
        }
    }
}

/// Applies the cache's TTL every [`crate::expiry::sweep_interval`], withdrawing what it
/// expired.
///
/// Runs until the daemon ends; cancel-safe (each sweep is, see [`Node::expire`]).
async fn expire_unused(
    node: Arc<Node>,
    store: Arc<dyn crate::store::ChunkStore>,
    sw: Arc<swarm::Swarm>,
    ttl: Duration,
) {
    let every = crate::expiry::sweep_interval(ttl);
    loop {
        tokio::time::sleep(every).await;
        match node.expire(false).await {
            Ok(r) if !r.expired.is_empty() => {
                recheck_held(node.home(), store.clone(), &sw).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("applying the cache TTL: {e}"),
        }
    }
}

/// Rechecks the versions announced whole whenever blobs have left the store.
///
/// Runs until the daemon ends; cancel-safe (it holds no state of its own between rechecks).
async fn watch_held(home: Home, store: Arc<dyn crate::store::ChunkStore>, sw: Arc<swarm::Swarm>) {
    let mut seen = store.losses();
    loop {
        tokio::time::sleep(HELD_CHECK).await;
        let now = store.losses();
        if now != seen {
            seen = now;
            recheck_held(&home, store.clone(), &sw).await;
        }
    }
}

/// What the daemon's local clients share.
struct Daemon {
    node: Arc<Node>,
    /// Siblings of `node` for requests naming another origin.
    others: Mutex<HashMap<String, Arc<Node>>>,
    /// Mount points served now, with the reference each serves.
    mounts: Mutex<HashMap<PathBuf, String>>,
    /// Versions open for file sessions.
    readers: crate::files::Readers,
}

impl Daemon {
    /// The node for a request's origins (`origins`, or `origin` alone when that is empty) and
    /// extra trusted keys: the daemon's own, or a sibling sharing store and swarm.
    fn node_for(
        &self,
        origin: &str,
        origins: &[OriginSpec],
        trusted: &[TrustedKey],
    ) -> Result<Arc<Node>> {
        let own = if trusted.is_empty() {
            Vec::new()
        } else {
            self.node.trusted_keys()?
        };
        let extra: Vec<TrustedKey> = trusted
            .iter()
            .filter(|k| !own.contains(k))
            .cloned()
            .collect();
        let mine = self.node.origins();
        let specs: Vec<OriginSpec> = if !origins.is_empty() {
            origins.to_vec()
        } else if origin.is_empty() || origin == mine.primary().url() {
            mine.specs().to_vec()
        } else {
            vec![OriginSpec::new(origin)]
        };
        let same_origins = specs == mine.specs();
        if same_origins && extra.is_empty() {
            return Ok(self.node.clone());
        }
        let mut key = serde_json::to_string(&specs).expect("specs serialize");
        for k in &extra {
            key.push(' ');
            key.push_str(&k.to_string());
        }
        let mut o = self.others.lock().expect("poisoned");
        if let Some(n) = o.get(&key) {
            return Ok(n.clone());
        }
        let origins = if same_origins {
            mine.clone()
        } else {
            let (region, zone) = mine.node_labels();
            // Other origins, the same machine: within the same origin rate.
            Arc::new(Origins::open(specs, false, region, zone)?.with_rate(mine.rate()))
        };
        let n = Arc::new(self.node.with_origins(origins).trusting(extra));
        // Bounded: past this many origin/key combinations, one is forgotten (and reopened if
        // asked for again).
        if o.len() >= MAX_SIBLINGS {
            if let Some(k) = o.keys().next().cloned() {
                o.remove(&k);
            }
        }
        o.insert(key, n.clone());
        Ok(n)
    }
}

/// Decodes one request line: the operation and the extra keys the client trusts.
pub fn parse_request(line: &str) -> Result<(Request, Vec<TrustedKey>, Vec<OriginSpec>)> {
    let Envelope {
        request,
        trusted,
        origins,
    } = serde_json::from_str(line)
        .map_err(|e| Error::Net(format!("bad request from the CLI: {e}")))?;
    let trusted = trusted
        .iter()
        .map(|k| TrustedKey::parse_line(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Net(format!("bad trusted key from the CLI: {e}")))?;
    if origins.len() > crate::origins::MAX_ORIGINS {
        return Err(Error::Net(format!(
            "the CLI named {} origins; at most {} may be configured",
            origins.len(),
            crate::origins::MAX_ORIGINS
        )));
    }
    Ok((request, trusted, origins))
}

/// Tells a client over the connection limit so, and closes.
///
/// Cancel-safe: the connection is closed either way.
async fn refuse(mut stream: UnixStream, limit: usize) {
    let reply = Reply::Error(ErrorReply::of(&Error::Net(format!(
        "the node daemon is serving its most local clients ({limit}, [node.limits] max_local_clients); try again when some finish"
    ))));
    let mut l = serde_json::to_string(&reply).expect("serializes");
    l.push('\n');
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(l.as_bytes())).await;
}

/// Reads one request line of at most [`MAX_REQUEST_LINE`] bytes; None if the client closed
/// first.
///
/// Not cancel-safe: a cancelled read may have consumed part of a line; the connection is then
/// dropped, never read again.
pub(crate) async fn read_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        let why = if buf.len() > MAX_REQUEST_LINE {
            format!("request longer than {MAX_REQUEST_LINE} bytes")
        } else {
            "request not terminated by a newline".to_string()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "request is not UTF-8"))
}

/// Serves one CLI connection until it closes; spawned per connection and never cancelled (a
/// mount it serves ends through its `stop` future when the connection closes).
async fn serve(daemon: Arc<Daemon>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let line = match tokio::time::timeout(REQUEST_WAIT, read_line(&mut r)).await {
        Err(_) => return Ok(()),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(line))) => line,
        Ok(Err(e)) => {
            let bad = Error::Net(format!("bad request from the CLI: {e}"));
            let mut l =
                serde_json::to_string(&Reply::Error(ErrorReply::of(&bad))).expect("serializes");
            l.push('\n');
            let _ = w.write_all(l.as_bytes()).await;
            return Err(e);
        }
    };
    // A file session keeps the connection, served on a blocking thread of its own.
    if let Ok((Request::Files { reference, origin }, trusted, origins)) = parse_request(&line) {
        let opened = async {
            let node = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            daemon.readers.open(&node, &reference).await
        };
        let session = match opened.await {
            Ok(s) => s,
            Err(e) => {
                let mut l = serde_json::to_string(&serde_json::json!({ "error": e.to_string() }))
                    .expect("serializes");
                l.push('\n');
                return w.write_all(l.as_bytes()).await;
            }
        };
        let buffered = r.buffer().to_vec();
        let stream = r
            .into_inner()
            .reunite(w)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_std()?;
        return tokio::task::spawn_blocking(move || {
            crate::files::serve_blocking(session, stream, buffered)
        })
        .await
        .unwrap_or(Ok(()));
    }
    // One request per connection: the client closing its end means it went away. Whatever
    // else it sends is read and dropped, a buffer at a time.
    let gone = async move {
        let mut sink = [0u8; 4096];
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let progress = Arc::new(Progress::default());
    let (notice_tx, mut notices) = tokio::sync::mpsc::channel(NOTICES);
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
        Err(e) => Reply::Error(ErrorReply::of(&e)),
    };
    let mut l = serde_json::to_string(&reply).expect("serializes");
    l.push('\n');
    w.write_all(l.as_bytes()).await
}

/// Carries out one request. Cancel-safe as the operation it runs (pull, pin, mount: see each).
#[tracing::instrument(name = "daemon.request", skip_all, fields(op))]
async fn handle(
    daemon: Arc<Daemon>,
    line: String,
    progress: Arc<Progress>,
    notices: tokio::sync::mpsc::Sender<String>,
    gone: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<serde_json::Value> {
    let (request, trusted, origins) = parse_request(&line)?;
    tracing::Span::current().record("op", request.op());
    Ok(match request {
        // Served by `serve` before it gets here.
        Request::Files { .. } => {
            return Err(Error::Net(
                "a file session is served on its own connection".into(),
            ))
        }
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
            status.rates.origin = daemon.node.origins().rate().map(|r| r.per_second());
            serde_json::to_value(status)
        }
        Request::Pull {
            reference,
            to,
            origin,
            select,
        } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let _listed = n.metrics().pull(&reference.to_string(), progress.clone());
            let r = n
                .pull_select(&reference, to.as_deref(), &select, &progress)
                .await?;
            serde_json::to_value(r)
        }
        Request::Versions { name, origin } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let name: DatasetName = name.parse()?;
            let list = n.versions(&name).await?;
            serde_json::to_value(list)
        }
        Request::Ls {
            reference,
            path,
            origin,
        } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            serde_json::to_value(n.ls(&reference, &path).await?)
        }
        Request::Pin {
            reference,
            origin,
            select,
        } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let _listed = n.metrics().pull(&reference.to_string(), progress.clone());
            let r = n.pin_select(&reference, &select, &progress).await?;
            n.store()?.flush()?;
            serde_json::to_value(r)
        }
        Request::VerifyLocal { reference, origin } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            let r = n.verify_local(&reference, &progress).await?;
            // Blobs dropped as damaged: a version held whole may no longer be.
            if r.local.as_ref().is_some_and(|l| l.corrupt > 0) {
                if let Some(sw) = daemon.node.swarm() {
                    recheck_held(daemon.node.home(), daemon.node.store()?, sw).await;
                }
            }
            serde_json::to_value(r)
        }
        Request::Unpin { reference, origin } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let reference: DatasetRef = reference.parse()?;
            serde_json::to_value(n.unpin(&reference).await?)
        }
        Request::Replicate {
            refs,
            all,
            to,
            options,
            origin,
        } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
            let refs = refs
                .iter()
                .map(|r| r.parse::<DatasetRef>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let all = all
                .iter()
                .map(|r| r.parse::<DatasetName>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let to = shoal_registry::Origin::open(&to, true)?;
            let r = n.replicate(&refs, &all, &to, &options, &progress).await?;
            serde_json::to_value(r)
        }
        Request::Cache => {
            let store = daemon.node.store()?;
            let mut stats = tokio::task::spawn_blocking(move || store.stats())
                .await
                .map_err(|e| Error::Net(e.to_string()))??;
            stats.whole_files = daemon.node.whole_files().map(|w| w.stats());
            crate::expiry::describe(daemon.node.home(), daemon.node.cache_ttl(), &mut stats)?;
            serde_json::to_value(stats)
        }
        Request::Gc => {
            let store = daemon.node.store()?;
            let freed = tokio::task::spawn_blocking(move || store.gc())
                .await
                .map_err(|e| Error::Net(e.to_string()))??;
            let copies = daemon.node.whole_files().map_or(0, |w| w.clear());
            // Versions no longer whole stop being announced before the answer goes out.
            if let Some(sw) = daemon.node.swarm() {
                recheck_held(daemon.node.home(), daemon.node.store()?, sw).await;
            }
            serde_json::to_value(freed + copies)
        }
        Request::Mount {
            reference,
            origin,
            spec,
        } => {
            let n = daemon.node_for(&origin, &origins, &trusted)?;
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
                        let _ = notices.try_send(notice);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_protocol_is_pinned() {
        // What a CLI and a daemon of different builds must agree on.
        let req = Envelope {
            request: Request::Pull {
                reference: "ds@v1".into(),
                to: Some("/data/ds".into()),
                origin: "s3://b/p".into(),
                select: Selection::default(),
            },
            trusted: vec!["ed25519:00 org/*".into()],
            origins: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"op":"pull","reference":"ds@v1","to":"/data/ds","origin":"s3://b/p","trusted":["ed25519:00 org/*"]}"#
        );
        // A partial pull's selection rides along only when there is one.
        let (r, _, _) = parse_request(
            r#"{"op":"pull","reference":"ds@v1","to":null,"origin":"/o","select":{"include":["*.jpg"]}}"#,
        )
        .unwrap();
        assert!(
            matches!(&r, Request::Pull { select, .. } if select.include == ["*.jpg"] && select.exclude.is_empty())
        );
        let (r, keys, origins) = parse_request(r#"{"op":"status"}"#).unwrap();
        assert!(matches!(r, Request::Status) && keys.is_empty() && origins.is_empty());
        // Several origins, with labels, ride along with the request.
        let req = Envelope {
            request: Request::Versions {
                name: "ds".into(),
                origin: "/o1".into(),
            },
            trusted: Vec::new(),
            origins: vec![
                OriginSpec::new("/o1"),
                OriginSpec {
                    url: "s3://b/p".into(),
                    region: Some("eu".into()),
                    zone: None,
                    max_requests: Some(4),
                },
            ],
        };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(
            line,
            r#"{"op":"versions","name":"ds","origin":"/o1","origins":[{"url":"/o1"},{"url":"s3://b/p","region":"eu","max_requests":4}]}"#
        );
        assert_eq!(parse_request(&line).unwrap().2, req.origins);
        let lines = [
            Reply::Progress("fetching".into(), 5, 10),
            Reply::Notice("mounted".into()),
            Reply::Ok(serde_json::json!({"a": 1})),
            Reply::Error(ErrorReply::of(&Error::TagRefused("old".into()))),
        ]
        .map(|r| serde_json::to_string(&r).unwrap());
        assert_eq!(
            lines,
            [
                r#"{"progress":["fetching",5,10]}"#,
                r#"{"notice":"mounted"}"#,
                r#"{"ok":{"a":1}}"#,
                r#"{"error":{"kind":"tag_refused","message":"old"}}"#,
            ]
        );
        // A daemon from before error kinds: its message still reaches the user.
        let old: Reply = serde_json::from_str(r#"{"error":"boom"}"#).unwrap();
        assert!(matches!(old, Reply::Error(ErrorReply::Message(m)) if m == "boom"));
    }
}
