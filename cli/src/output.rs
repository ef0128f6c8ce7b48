//! Terminal and JSON output, progress bars.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use shoal_node::Progress;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

/// A command whose report is a failure (`verify` finding problems): with --json the report
/// is printed once, with the error in it.
#[derive(Debug)]
pub struct Failed(pub serde_json::Value);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the check failed")
    }
}

impl std::error::Error for Failed {}

/// Where results and errors go.
pub struct Out {
    json: bool,
}

/// The line saying how many origin readers were passed over for no sign of life, if any
/// (a pull's report, a node's status).
pub fn passed_over(readers: u64, by_lag: u64) -> Option<String> {
    (readers > 0).then(|| {
        format!("{readers} origin reader(s) passed over for no sign of life ({by_lag} within about a second)")
    })
}

pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// Writes to stdout; a closed pipe (`shoal versions x | head -1`) is not an error.
fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}").and_then(|_| stdout.flush());
}

impl Out {
    pub fn new(json: bool) -> Out {
        Out { json }
    }

    /// Prints a result: as JSON with --json, else the text from `human`.
    pub fn report<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            print(&serde_json::to_string_pretty(value)?);
        } else {
            print(&human());
        }
        Ok(())
    }

    /// Reports an error: one line on stderr (`error: what: why: cause`), and with --json also
    /// `{"error": ...}` on stdout.
    pub fn error(&self, e: &anyhow::Error) {
        let msg = format!("{e:#}");
        if let (true, Some(Failed(report))) = (self.json, e.downcast_ref::<Failed>()) {
            // A report that is itself the failure: one document, the report and the error.
            let mut doc = report.clone();
            doc["error"] = serde_json::Value::String(msg.clone());
            print(&serde_json::to_string_pretty(&doc).unwrap_or_default());
        } else if self.json {
            // The kind of the node's error, wherever it happened (here or in the daemon).
            let kind = e
                .chain()
                .find_map(|c| c.downcast_ref::<shoal_node::Error>())
                .map(|n| n.kind());
            let doc = match kind {
                Some(k) => serde_json::json!({ "error": msg, "kind": k }),
                None => serde_json::json!({ "error": msg }),
            };
            print(&doc.to_string());
        }
        let _ = writeln!(std::io::stderr(), "error: {msg}");
    }

    /// A progress bar that follows `progress` on stderr, when stderr is a terminal and output
    /// is not JSON.
    pub fn progress(&self, progress: Arc<Progress>) -> Bar {
        if self.json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let (phase, done, total) = progress.get();
                b.set_prefix(phase);
                b.set_length(total.max(done));
                b.set_position(done);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Bar(Some((bar, task)))
    }
}

/// Handle on a running progress bar.
pub struct Bar(Option<(ProgressBar, tokio::task::JoinHandle<()>)>);

impl Bar {
    pub fn finish(self) {
        if let Some((bar, task)) = self.0 {
            task.abort();
            bar.finish_and_clear();
        }
    }
}
