//! Traces exported over OTLP/gRPC when configured, and only then: a collector the test runs
//! (the OTLP trace service from the OpenTelemetry protos, served by tonic) receives a
//! command's spans as one trace: the command, the publish or pull, its tree read and its
//! origin reads, with the attributes an operator filters by. An unreachable collector costs
//! a command nothing but the export.

mod common;

use common::{free_port, sample_tree, Env};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    attrs: HashMap<String, String>,
    resource: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|a| {
            let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (a.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                        name: s.name,
                        attrs: attrs(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free loopback port for as long as the test runs.
    fn start() -> (Collector, u16) {
        let c = Collector::default();
        let port = free_port();
        let svc = TraceServiceServer::new(c.clone());
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve(([127, 0, 0, 1], port).into())
                        .await
                        .unwrap();
                })
        });
        common::wait_for_port(port, "the test's OTLP collector");
        (c, port)
    }

    fn take(&self) -> Vec<Got> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Every span's parent chain reaches `root` within the trace.
fn assert_one_trace(spans: &[Got], root: &Got) {
    let by_id: HashMap<&[u8], &Got> = spans.iter().map(|s| (s.id.as_slice(), s)).collect();
    for s in spans {
        assert_eq!(s.trace, root.trace, "{} is in the command's trace", s.name);
        let mut at = s;
        let mut hops = 0;
        while at.id != root.id {
            at = by_id
                .get(at.parent.as_slice())
                .unwrap_or_else(|| panic!("{}'s parent chain breaks at {}", s.name, at.name));
            hops += 1;
            assert!(hops < 64);
        }
    }
}

#[test]
fn commands_export_their_spans_to_a_configured_collector_and_only_then() {
    let (collector, port) = Collector::start();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = Env::new();
    sample_tree(&env.path("src"));
    let src = env.path("src");
    let trusted = env.key();

    // The standard environment variable.
    env.extra_env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone())];
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    let spans = collector.take();
    let root = *named(&spans, "shoal").first().expect("the command's span");
    assert_eq!(root.attrs["command"], "publish");
    assert!(root.parent.is_empty(), "the command's span is the root");
    assert_eq!(root.resource["service.name"], "shoal");
    let publish = named(&spans, "publish");
    assert_eq!(publish.len(), 1, "{spans:#?}");
    assert_eq!(publish[0].attrs["target"], "ds@v1");
    assert_eq!(publish[0].parent, root.id);
    assert_one_trace(&spans, root);

    // The config file, on another machine sharing the origin; its service name.
    let mut peer = env.peer("trainer");
    peer.extra_env = Vec::new();
    common::write(
        &peer.home.join("config.toml"),
        format!(
            "trusted_keys = [\"{trusted}\"]\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"trainer\"\n"
        )
        .as_bytes(),
    );
    let dest = peer.path("out");
    peer.json(&["pull", "ds@v1", "--to", dest.to_str().unwrap()]);
    common::assert_same_tree(&src, &dest);
    let spans = collector.take();
    let root = *named(&spans, "shoal").first().expect("the command's span");
    assert_eq!(root.attrs["command"], "pull");
    assert_eq!(root.resource["service.name"], "trainer");
    assert!(!root.resource["host.name"].is_empty());
    let pull = named(&spans, "pull");
    assert_eq!(pull.len(), 1, "{spans:#?}");
    assert_eq!(pull[0].attrs["reference"], "ds@v1");
    // The tree is read in batches as the pull streams through it.
    let trees = named(&spans, "read tree");
    assert!(!trees.is_empty(), "{spans:#?}");
    assert!(trees.iter().all(|t| t.parent == pull[0].id), "{trees:#?}");
    let reads = named(&spans, "origin.read");
    assert!(!reads.is_empty(), "origin reads are spans: {spans:#?}");
    for r in &reads {
        assert_eq!(r.attrs["origin"], env.origin);
        assert!(r.attrs["key"].contains("packs/"), "{r:?}");
        assert!(r.attrs["bytes"].parse::<u64>().unwrap() > 0);
    }
    assert_one_trace(&spans, root);

    // Not configured: nothing is sent. (A configured command flushes before it exits, so
    // anything it sent would be here by now.)
    let again = peer.path("again");
    let mut bare = env.peer("bare");
    bare.extra_env = Vec::new();
    common::write(
        &bare.home.join("config.toml"),
        format!("trusted_keys = [\"{trusted}\"]\n").as_bytes(),
    );
    bare.json(&["pull", "ds@v1", "--to", again.to_str().unwrap()]);
    assert!(
        collector.take().is_empty(),
        "no collector configured, no spans"
    );

    // A collector that is not there: the command still does its work and says so at most
    // in a warning.
    let mut lost = env.peer("lost");
    let closed = free_port();
    lost.extra_env = vec![(
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        format!("http://127.0.0.1:{closed}"),
    )];
    common::write(
        &lost.home.join("config.toml"),
        format!("trusted_keys = [\"{trusted}\"]\n").as_bytes(),
    );
    let third = lost.path("third");
    lost.json(&["pull", "ds@v1", "--to", third.to_str().unwrap()]);
    common::assert_same_tree(&src, &third);

    // A daemon exports a trace per request as it goes (its batches every 200 ms here), the
    // request's span the root of the pull it carries out.
    let mut c = shoal_testnet::Cluster::new(common::BIN);
    c.publish(&src, "ds@v1");
    let a = c.node(
        "a",
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    collector.take();
    let pulled = c.dir.path().join("pulled");
    let out = c.nodes[a].run(&["--json", "pull", "ds@v1", "--to", pulled.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = shoal_testnet::wait_for(20, "the daemon's pull spans", || {
        let spans = collector.0.lock().unwrap().clone();
        let asked = named(&spans, "daemon.request")
            .iter()
            .any(|s| s.attrs["op"] == "pull");
        (asked && !named(&spans, "pull").is_empty()).then_some(spans)
    });
    let request = *named(&spans, "daemon.request")
        .iter()
        .find(|s| s.attrs["op"] == "pull")
        .unwrap();
    assert!(
        request.parent.is_empty(),
        "each request is a trace of its own"
    );
    let mine: Vec<Got> = spans
        .iter()
        .filter(|s| s.trace == request.trace)
        .cloned()
        .collect();
    assert_one_trace(&mine, request);
    assert_eq!(named(&mine, "pull")[0].attrs["reference"], "ds@v1");
    assert!(!named(&mine, "fetch").is_empty(), "{mine:#?}");

    // A typo in [telemetry] is refused by name.
    common::write(
        &bare.home.join("config.toml"),
        b"[telemetry]\notlp_endpoit = \"http://x:4317\"\n",
    );
    let err = bare.fails(&["versions", "ds"]);
    assert!(err.contains("otlp_endpoit"), "{err}");
}
