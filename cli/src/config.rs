//! Where things live: the state directory, the config file, the origin and trusted keys.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use shoal_node::tiers::{self, CacheLayout};
use shoal_node::OriginSpec;
use shoal_registry::{PublicKey, TrustedKey};
use std::path::{Path, PathBuf};

/// `$SHOAL_HOME/config.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The origins: a URL or path (`origin = "s3://..."`), or `[[origin]]` tables with `url`,
    /// `region`, `zone` and `max_requests`, nearest or primary first (publishes and tags go to
    /// the first).
    pub origin: Option<OneOrMany>,
    /// Extra publisher keys to trust: `KEY`, or `KEY PATTERN,...` to trust it only for the
    /// datasets whose names match.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Refuse tags not re-signed for this long (e.g. "7d"): a frozen origin cannot keep a
    /// node on an old view for longer. Default: any age.
    pub max_tag_age: Option<String>,
    /// The local chunk store.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The node daemon (`shoal node run`); its flags override these.
    #[serde(default)]
    pub node: NodeConfig,
    /// Bytes per second this machine may move (`shoal node run`'s rate flags override these).
    #[serde(default)]
    pub rates: RatesConfig,
    /// Traces to an OpenTelemetry collector (off unless set). Read early by [`telemetry`];
    /// parsed here too so that a full load checks its keys.
    #[serde(default)]
    #[allow(dead_code)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]` in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/gRPC collector, e.g. "http://otel-collector:4317"; the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` overrides it.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the spans (default "shoal"; `OTEL_SERVICE_NAME` overrides it).
    pub service_name: Option<String>,
}

/// The config file's `[telemetry]`, read before anything else (the tracing it configures
/// covers the rest). A file that does not parse gives the default here: loading the config
/// reports it properly a moment later.
pub fn telemetry() -> TelemetryConfig {
    #[derive(Default, Deserialize)]
    struct Only {
        #[serde(default)]
        telemetry: TelemetryConfig,
    }
    home_dir()
        .ok()
        .and_then(|h| std::fs::read_to_string(h.join("config.toml")).ok())
        .and_then(|t| toml::from_str::<Only>(&t).ok())
        .unwrap_or_default()
        .telemetry
}

/// `[rates]` in the config file: bytes per second, e.g. "100MB" or "1GiB/s"; absent or "0"
/// is unlimited.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatesConfig {
    /// Read from the origins, all together (by the daemon, or by a command run without it).
    pub origin: Option<String>,
    /// Sent to peers by the daemon, all together.
    pub upload: Option<String>,
    /// Received from peers by the daemon, all together.
    pub download: Option<String>,
}

/// `origin = "URL"` or `[[origin]]` tables.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<OriginSpec>),
}

/// `[node]` in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    pub bootstrap: Vec<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub rack: Option<String>,
    pub members: Option<PathBuf>,
    /// The cluster key file (`shoal node keygen`).
    pub cluster_key: Option<PathBuf>,
    /// Serve anyone (public data).
    pub open: Option<bool>,
    pub metrics: Option<String>,
    pub mdns: Option<bool>,
    /// Send peers compressible chunks compressed (default true; receiving them is always on).
    pub wire_compression: Option<bool>,
    /// Connection and buffer bounds (`[node.limits]`); see docs/security.md.
    #[serde(default)]
    pub limits: shoal_node::limits::Limits,
}

/// `[cache]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most bytes the local store may use on disk, e.g. "200GiB" (default: unbounded).
    pub capacity: Option<String>,
    /// Bytes of chunks kept in memory by each shoal process (the daemon's for as long as it
    /// runs), e.g. "2GiB"; "0" turns the memory tier off. Default 256MiB.
    pub memory: Option<String>,
    /// Bytes of whole-file copies kept for mounts (large files read by the kernel straight
    /// from a local copy), e.g. "50GiB"; "0" turns them off. Default 16GiB, or a quarter of
    /// `capacity` when that is set.
    pub files: Option<String>,
    /// How long a cached version nobody uses stays, e.g. "7d" (default: until capacity
    /// evicts it). Pinned versions and versions in use never expire.
    pub ttl: Option<String>,
    /// Keep chunks that compress compressed on disk (default true): zstd level 1, decided per
    /// chunk by a probe, so random and already compressed data is stored as it is.
    pub compression: Option<bool>,
    /// Further disk tiers, fastest first: `[[cache.tier]]` with `path` and `capacity`.
    #[serde(default)]
    pub tier: Vec<TierConfig>,
}

/// `[[cache.tier]]`: a disk tier that keeps what the tier above it evicts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub path: PathBuf,
    /// Unbounded if absent (only for the last tier).
    pub capacity: Option<String>,
}

/// A size under `[cache]`: the environment variable `env` (if set and not empty) over the
/// config file's `key`.
fn cache_size(env: &str, from_file: Option<String>, key: &str) -> Result<Option<u64>> {
    std::env::var(env)
        .ok()
        .filter(|c| !c.is_empty())
        .or(from_file)
        .map(|c| parse_size(&c, &format!("{env} or [cache] {key}")))
        .transpose()
}

/// A rate in bytes per second: a size ("100MB", "1.5GiB"), optionally followed by "/s".
pub fn parse_rate(s: &str, what: &str) -> Result<u64> {
    let bare = s.trim();
    let bare = bare.strip_suffix("/s").unwrap_or(bare);
    parse_size(bare, what).map_err(|_| {
        anyhow::anyhow!("{what} {s:?}: expected bytes per second, e.g. \"100MB\" or \"1GiB/s\"")
    })
}

fn parse_size(s: &str, what: &str) -> Result<u64> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| anyhow::anyhow!("{what} {s:?}: {e}"))
}

/// Settings after combining flags, environment and config file.
#[derive(Debug)]
pub struct Config {
    pub home: PathBuf,
    /// The origins, the primary (where publishes and tags go) first.
    pub origins: Vec<OriginSpec>,
    pub trusted: Vec<TrustedKey>,
    pub max_tag_age: Option<std::time::Duration>,
    pub cache: CacheLayout,
    pub node: NodeConfig,
    pub rates: shoal_node::swarm::rate::RateLimits,
}

pub fn home_dir() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("SHOAL_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let base = dirs::data_dir()
        .context("cannot find a data directory for shoal's state; set SHOAL_HOME")?;
    Ok(base.join("shoal"))
}

/// `spec` unchanged if it is a URL or an absolute path, else `base` joined with it.
fn absolute_local(spec: String, base: &Path) -> String {
    if spec.contains("://") || Path::new(&spec).is_absolute() || spec.trim().is_empty() {
        spec
    } else {
        base.join(spec).display().to_string()
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading config file {}", path.display())),
    }
}

fn parse_keys(list: impl IntoIterator<Item = String>, source: &str) -> Result<Vec<TrustedKey>> {
    list.into_iter()
        .filter(|k| !k.trim().is_empty())
        .map(|k| TrustedKey::parse_line(&k).with_context(|| format!("trusted key in {source}")))
        .collect()
}

impl Config {
    /// The primary origin's URL (where publishes and tags go).
    pub fn origin(&self) -> &str {
        &self.origins[0].url
    }

    /// The origins: `--origin` flags, then `SHOAL_ORIGIN` (comma-separated), then the config
    /// file, then `$SHOAL_HOME/origin`. An origin named by a flag or the environment takes
    /// its labels from the config file's `[[origin]]` of the same URL, if any.
    pub fn load(origin_flags: Vec<String>) -> Result<Config> {
        let home = home_dir()?;
        let cfg_path = home.join("config.toml");
        let file = read_file_config(&cfg_path)?;
        // A relative local path is made absolute here (against the working directory, or the
        // config file's directory for the file's setting): a node daemon serving this command
        // runs elsewhere.
        let cwd = std::env::current_dir().context("the current directory")?;
        let from_file: Vec<OriginSpec> = match file.origin {
            None => Vec::new(),
            Some(OneOrMany::One(url)) => vec![OriginSpec::new(absolute_local(url, &home))],
            Some(OneOrMany::Many(list)) => list
                .into_iter()
                .map(|o| OriginSpec {
                    url: absolute_local(o.url, &home),
                    ..o
                })
                .collect(),
        };
        let named: Vec<String> = if !origin_flags.is_empty() {
            origin_flags
        } else {
            std::env::var("SHOAL_ORIGIN")
                .ok()
                .map(|o| {
                    o.split(',')
                        .map(str::trim)
                        .filter(|o| !o.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let origins: Vec<OriginSpec> = if !named.is_empty() {
            named
                .into_iter()
                .map(|url| {
                    let url = absolute_local(url, &cwd);
                    from_file
                        .iter()
                        .find(|o| o.url == url)
                        .cloned()
                        .unwrap_or_else(|| OriginSpec::new(url))
                })
                .collect()
        } else if !from_file.is_empty() {
            from_file
        } else {
            vec![OriginSpec::new(home.join("origin").display().to_string())]
        };
        if let Some(o) = origins.iter().find(|o| o.url.trim().is_empty()) {
            bail!("an origin is empty ({o:?}); pass --origin or set SHOAL_ORIGIN");
        }
        let mut trusted = parse_keys(file.trusted_keys, &cfg_path.display().to_string())?;
        if let Ok(env) = std::env::var("SHOAL_TRUSTED_KEYS") {
            // Keys only (trusted for every dataset): scopes belong in the config file.
            for k in env.split([',', ' ', '\n']).filter(|k| !k.trim().is_empty()) {
                let key: PublicKey = k.parse().context("trusted key in SHOAL_TRUSTED_KEYS")?;
                trusted.push(key.into());
            }
        }
        let max_tag_age = std::env::var("SHOAL_MAX_TAG_AGE")
            .ok()
            .filter(|a| !a.is_empty())
            .or(file.max_tag_age)
            .map(|a| {
                humantime::parse_duration(&a)
                    .with_context(|| format!("SHOAL_MAX_TAG_AGE or max_tag_age {a:?}: expected a duration such as 7d or 12h"))
            })
            .transpose()?;
        let capacity = cache_size("SHOAL_CACHE_CAPACITY", file.cache.capacity, "capacity")?;
        let memory = cache_size("SHOAL_CACHE_MEMORY", file.cache.memory, "memory")?
            .unwrap_or(tiers::DEFAULT_MEMORY);
        let files =
            cache_size("SHOAL_CACHE_FILES", file.cache.files, "files")?.unwrap_or(match capacity {
                Some(c) => (c / 4).min(shoal_node::wholefiles::DEFAULT_CAPACITY),
                None => shoal_node::wholefiles::DEFAULT_CAPACITY,
            });
        let mut disk_tiers = Vec::new();
        for t in file.cache.tier {
            let capacity = t
                .capacity
                .map(|c| parse_size(&c, &format!("capacity of tier {}", t.path.display())))
                .transpose()?;
            disk_tiers.push(tiers::DiskTier {
                path: home.join(t.path),
                capacity,
            });
        }
        let ttl = std::env::var("SHOAL_CACHE_TTL")
            .ok()
            .filter(|a| !a.is_empty())
            .or(file.cache.ttl)
            .map(|a| {
                humantime::parse_duration(&a).with_context(|| {
                    format!("SHOAL_CACHE_TTL or [cache] ttl {a:?}: expected a duration such as 7d or 12h")
                })
            })
            .transpose()?
            .filter(|t| !t.is_zero());
        let compress = match std::env::var("SHOAL_CACHE_COMPRESSION")
            .ok()
            .filter(|v| !v.is_empty())
        {
            Some(v) => match v.as_str() {
                "1" | "true" | "on" => true,
                "0" | "false" | "off" => false,
                _ => bail!("SHOAL_CACHE_COMPRESSION {v:?}: expected on or off"),
            },
            None => file.cache.compression.unwrap_or(true),
        };
        let cache = CacheLayout {
            memory,
            capacity,
            tiers: disk_tiers,
            files,
            ttl,
            compress,
        };
        cache
            .check()
            .map_err(|e| anyhow::anyhow!("[cache] in {}: {e}", cfg_path.display()))?;
        // Paths in the file are relative to the file's directory, like its origin: the same
        // file means the same thing from any working directory (and to the daemon).
        let rate = |v: Option<String>, key: &str| -> Result<Option<u64>> {
            let what = format!("[rates] {key} in {}", cfg_path.display());
            Ok(v.map(|v| parse_rate(&v, &what))
                .transpose()?
                .filter(|&r| r > 0))
        };
        let rates = shoal_node::swarm::rate::RateLimits {
            origin: rate(file.rates.origin, "origin")?,
            upload: rate(file.rates.upload, "upload")?,
            download: rate(file.rates.download, "download")?,
        };
        let mut node = file.node;
        node.members = node.members.map(|p| home.join(p));
        node.cluster_key = node.cluster_key.map(|p| home.join(p));
        Ok(Config {
            home,
            origins,
            trusted,
            max_tag_age,
            cache,
            node,
            rates,
        })
    }
}
