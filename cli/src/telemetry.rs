//! Logs to stderr, and traces to an OpenTelemetry collector when one is configured (off by
//! default): `[telemetry] otlp_endpoint` in the config file, or the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (which win over the
//! file); `OTEL_SDK_DISABLED=true` turns it off. Spans go over OTLP/gRPC in batches from a
//! bounded queue (2,048 spans; more are dropped, never waited for); an unreachable collector
//! costs a command at most the export timeout when it ends.

use crate::config::TelemetryConfig;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How long one export may take, and how long a command waits at its end for the last one.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The spans exported: this project's crates at info (one per command, request, publish,
/// pull, fetch, tree read, origin read, mount), nothing of the libraries'.
const EXPORTED: &str = "warn,shoal=info,shoal_cli=info,shoal_node=info,shoal_swarm=info,\
                        shoal_registry=info,shoal_fuse=info,shoal_csi=info";

/// Flushes the exporter when dropped (the command's last spans).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown_with_timeout(EXPORT_TIMEOUT) {
                eprintln!("warning: exporting traces: {e}");
            }
        }
    }
}

/// Where traces go, if anywhere: None unless configured.
pub fn endpoint(file: &TelemetryConfig) -> Option<Option<String>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    // The exporter reads the environment itself when no endpoint is set in code.
    if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
    {
        return Some(None);
    }
    file.otlp_endpoint.clone().map(Some)
}

/// Installs the global subscriber: stderr logs at `verbose`'s level (or `SHOAL_LOG`), and the
/// OpenTelemetry layer when `telemetry` names a collector. Must run inside the Tokio runtime
/// the command uses (the gRPC channel's worker lives there) and that runtime must outlive the
/// returned guard.
pub fn init(verbose: u8, telemetry: &TelemetryConfig) -> Telemetry {
    // fuser warns when its own unmount at the end finds the mount gone, which is how every
    // mount ends here (`shoal unmount` or ours on Ctrl-C unmount first): not worth a warning.
    let default = match verbose {
        0 => "warn,fuser::mnt=error",
        1 => "info,shoal=info,fuser::mnt=error",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let (provider, problem) = match endpoint(telemetry).map(|ep| exporter(ep, telemetry)) {
        None => (None, None),
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e)),
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("shoal"))
            .with_filter(EnvFilter::new(EXPORTED))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if let Some(e) = problem {
        tracing::warn!("traces are not exported: {e}");
    }
    Telemetry { provider }
}

fn exporter(endpoint: Option<String>, cfg: &TelemetryConfig) -> Result<SdkTracerProvider, String> {
    let mut b = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_timeout(EXPORT_TIMEOUT);
    if let Some(ep) = endpoint {
        b = b.with_endpoint(ep);
    }
    let exporter = b.build().map_err(|e| e.to_string())?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_attribute(opentelemetry::KeyValue::new(
            "host.name",
            host.trim().to_string(),
        ))
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the SDK and win.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource =
            resource.with_service_name(cfg.service_name.clone().unwrap_or_else(|| "shoal".into()));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
