//! Prometheus text metrics (`shoal node run --metrics ADDR`).

use super::Swarm;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// More metrics, registered by the node on every scrape (cache tiers, mounts, origins, pulls).
pub type Extra = Arc<dyn Fn(&mut Registry) + Send + Sync>;

/// Renders the node's counters in the Prometheus text format.
pub fn render(swarm: &Swarm, extra: Option<&Extra>) -> String {
    let c = &swarm.counters;
    let (peers, connected) = {
        let t = swarm.table();
        (
            t.peers.len() as i64,
            t.peers.values().filter(|p| p.connected).count() as i64,
        )
    };
    let mut reg = Registry::with_prefix("shoal");
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let counters: [(&str, &str, u64); 10] = [
        (
            "bytes_from_peers",
            "Chunk bytes received from peers, verified",
            load(&c.bytes_from_peers),
        ),
        (
            "bytes_from_origin",
            "Chunk bytes read from origin stores",
            load(&c.bytes_from_origin),
        ),
        (
            "bytes_served",
            "Chunk bytes served to peers",
            load(&c.bytes_served),
        ),
        (
            "bytes_served_wire",
            "Bytes of answers sent to peers as they went on the wire (compressed where it paid)",
            load(&c.bytes_served_wire),
        ),
        (
            "bytes_from_peers_wire",
            "Bytes of answers received from peers as they came on the wire",
            load(&c.bytes_from_peers_wire),
        ),
        (
            "chunk_verify_failures",
            "Chunks from peers whose bytes did not match their id",
            load(&c.verify_failures),
        ),
        (
            "control_bytes_sent",
            "Bytes of the control protocols sent (hellos, have-maps and deltas, rosters, proofs)",
            load(&c.control.sent),
        ),
        (
            "control_bytes_received",
            "Bytes of the control protocols received",
            load(&c.control.received),
        ),
        (
            "origin_readers_passed_over",
            "Origin readers pulls passed over for showing no sign of life",
            load(&c.readers_passed_over),
        ),
        (
            "origin_readers_passed_over_by_lag",
            "Of those, passed over within about a second of the other readers showing theirs",
            load(&c.readers_passed_over_by_lag),
        ),
    ];
    for (name, help, v) in counters {
        reg.register(name, help, ConstCounter::new(v));
    }
    reg.register(
        "active_pulls",
        "Pulls in progress",
        ConstGauge::new(c.active_pulls.load(Ordering::Relaxed) as i64),
    );
    reg.register(
        "peers_connected",
        "Peers connected now",
        ConstGauge::new(connected),
    );
    reg.register("peers_known", "Peers ever seen", ConstGauge::new(peers));
    // Where received chunk bytes came from, by class: peers by distance, then the origins.
    let by_source = Family::<Vec<(String, String)>, Counter>::default();
    let classes = ["rack", "zone", "region", "farther"];
    for (class, n) in classes.iter().zip(&c.bytes_from_peers_by_distance) {
        by_source
            .get_or_create(&vec![("source".into(), class.to_string())])
            .inc_by(load(n));
    }
    by_source
        .get_or_create(&vec![("source".into(), "origin".into())])
        .inc_by(load(&c.bytes_from_origin));
    reg.register(
        "bytes_received_by_source",
        "Chunk bytes received, by source: peers in the same rack, zone, region, or farther; origins",
        by_source,
    );
    if let Some(extra) = extra {
        extra(&mut reg);
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// How long a metrics client has to send its request headers.
const HEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` on `addr` (HTTP/1.1, one task per connection, at most `max_clients` at
/// once: a scraper needs one; more are closed on accept).
pub fn serve(
    swarm: Arc<Swarm>,
    addr: SocketAddr,
    max_clients: usize,
    extra: Option<Extra>,
) -> crate::error::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| crate::error::Error::Net(format!("metrics endpoint on {addr}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| crate::error::Error::Net(format!("metrics endpoint on {addr}: {e}")))?;
    let bound = std_listener
        .local_addr()
        .map_err(|e| crate::error::Error::Net(format!("metrics endpoint on {addr}: {e}")))?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|e| crate::error::Error::Net(format!("metrics endpoint on {addr}: {e}")))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_clients.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics endpoint accept: {e}");
                    tokio::time::sleep(crate::limits::accept_backoff(&e)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closes the connection
            };
            let swarm = swarm.clone();
            let extra = extra.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let swarm = swarm.clone();
                        let extra = extra.clone();
                        async move {
                            let resp = if req.uri().path() == "/metrics" {
                                hyper::Response::builder()
                                    .header(
                                        "content-type",
                                        "text/plain; version=0.0.4; charset=utf-8",
                                    )
                                    .body(http_body_util::Full::new(bytes::Bytes::from(render(
                                        &swarm,
                                        extra.as_ref(),
                                    ))))
                            } else {
                                hyper::Response::builder().status(404).body(
                                    http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"try /metrics\n",
                                    )),
                                )
                            };
                            Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                        }
                    },
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_WAIT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                // A client that reads its answer slowly gets a bounded time.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}
