//! The `shoal` command.

mod args;
mod config;
mod mount;
mod node;
mod output;
mod telemetry;

use anyhow::{Context, Result};
use args::{Args, Command, NodeCommand};
use clap::Parser;
use config::Config;
use output::Out;
use shoal_node::daemon::{Client, Request};
use shoal_node::swarm::rate::Rate;
use shoal_node::{Home, Node, Origins, Progress, PublishOptions, PublishSource};
use shoal_registry::{DatasetName, DatasetRef, Label, Origin, Params, VersionRef};
use std::process::ExitCode;
use std::sync::Arc;
use tracing::Instrument;

/// glibc serves every allocation over its mmap threshold (128 KiB, rising only as large blocks
/// are freed) with a fresh mapping, page-faulted and zeroed on first touch and unmapped on
/// free. The data plane allocates and frees buffers of MiBs (chunk batches) all the time, so
/// they are kept in the heap instead and memory is returned above 128 MiB free at its top.
/// Measured on a 1 GiB 1:1 pull over loopback: 15-20% less CPU on both ends (docs/swarm.md).
/// Each arena keeps that much free, and glibc opens up to 8 arenas a core (one per thread that
/// finds the others busy): a pull of 3M entries held ~630 MB anonymous memory with a heap peak
/// of 224 MB (heaptrack). One arena a core: 305 MB (docs/benchmarks.md). Only for the batch
/// commands that walk whole versions (`pull`, `publish`): a mount's or daemon's many threads
/// have not been measured with fewer arenas.
#[allow(unsafe_code)]
fn tune_malloc(few_arenas: bool) {
    // glibc's own variables, where set, win: an operator can tune the allocator as for any
    // program.
    let set = |var: &str| std::env::var_os(var).is_some();
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        if !set("MALLOC_MMAP_THRESHOLD_") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        if !set("MALLOC_TRIM_THRESHOLD_") {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
        if few_arenas && !set("MALLOC_ARENA_MAX") {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            libc::mallopt(libc::M_ARENA_MAX, cores.clamp(2, 64) as libc::c_int);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tune_malloc(matches!(
        args.command,
        Command::Pull { .. } | Command::Publish { .. }
    ));
    let out = Out::new(args.json);
    // Generated from the argument definitions; no state, config or runtime needed.
    match &args.command {
        Command::Completions { shell } => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "shoal", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match man_pages(dir) {
                Ok(n) => {
                    let _ = out.report(
                        &serde_json::json!({ "dir": dir.display().to_string(), "pages": n }),
                        || format!("wrote {n} man pages to {}", dir.display()),
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    out.error(&e);
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out.error(&anyhow::Error::new(e).context("starting the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _in_runtime = runtime.enter();
        telemetry::init(args.verbose, &config::telemetry())
    };
    let command = command_name(&args.command);
    let result = runtime
        .block_on(run(args, &out).instrument(tracing::info_span!("shoal", command = command)));
    // The last spans go out while the runtime still runs the exporter's channel.
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Writes `shoal.1` and a page per command (`shoal-node-run.1` for nested ones) into `dir`;
/// returns how many.
fn man_pages(dir: &std::path::Path) -> Result<usize> {
    fn write(dir: &std::path::Path, cmd: clap::Command, name: String) -> Result<usize> {
        let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        let mut n = 1;
        for sub in cmd.get_subcommands() {
            if sub.get_name() != "help" {
                n += write(dir, sub.clone(), format!("{name}-{}", sub.get_name()))?;
            }
        }
        Ok(n)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = <Args as clap::CommandFactory>::command();
    cmd.build();
    write(dir, cmd, "shoal".into())
}

/// The command's name for its root span: `publish`, `pull`, `node` ...
fn command_name(c: &Command) -> String {
    let debug = format!("{c:?}");
    let variant = debug.split([' ', '{', '(']).next().unwrap_or_default();
    let mut name = String::new();
    for (i, ch) in variant.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            name.push('-');
        }
        name.push(ch.to_ascii_lowercase());
    }
    name
}

/// The running node daemon of `home`, told which keys this command trusts; None if none runs.
async fn daemon(home: &Home, cfg: &Config) -> Option<Client> {
    Client::connect(home)
        .await
        .map(|c| c.trusting(&cfg.trusted).with_origins(&cfg.origins))
}

fn parse_chunking(s: &str) -> Result<Params> {
    let parts: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--chunking {s:?}: expected MIN,AVG,MAX in bytes"))?;
    let [min, avg, max] = parts[..] else {
        anyhow::bail!("--chunking {s:?}: expected three numbers MIN,AVG,MAX");
    };
    Ok(Params::new(min, avg, max)?)
}

async fn run(args: Args, out: &Out) -> Result<()> {
    let cfg = Config::load(args.origin)?;
    let home = Home::new(&cfg.home);
    let open_with = |create: bool,
                     region: Option<&str>,
                     zone: Option<&str>,
                     origin_rate: Option<u64>|
     -> Result<Node> {
        let origins = Origins::open(cfg.origins.clone(), create, region, zone)?
            .with_rate(origin_rate.and_then(Rate::new).map(Arc::new));
        Ok(Node::new(home.clone(), origins, cfg.trusted.clone())
            .with_cache(cfg.cache.clone())
            .with_max_tag_age(cfg.max_tag_age))
    };
    let open_at = |create: bool, region: Option<&str>, zone: Option<&str>| {
        open_with(create, region, zone, cfg.rates.origin)
    };
    let open = |create: bool| open_at(create, cfg.node.region.as_deref(), cfg.node.zone.as_deref());
    match args.command {
        Command::Publish {
            source,
            target,
            tags,
            chunking,
            in_place,
            rehash,
            compression,
            small_files,
        } => {
            let target: VersionRef = target.parse()?;
            let tags = tags
                .iter()
                .map(|t| t.parse::<Label>())
                .collect::<Result<Vec<_>, _>>()?;
            let params = chunking.as_deref().map(parse_chunking).transpose()?;
            let node = open(true)?;
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            let source = PublishSource::parse(&source);
            let report = node
                .publish_from(
                    &source,
                    &target,
                    &PublishOptions {
                        tags,
                        params,
                        in_place,
                        rehash,
                        uncompressed: compression == "none",
                        small: match small_files.as_str() {
                            "on" => shoal_node::SmallChoice::On,
                            "whole" => shoal_node::SmallChoice::Whole,
                            "off" => shoal_node::SmallChoice::Off,
                            _ => shoal_node::SmallChoice::Auto,
                        },
                    },
                    &progress,
                )
                .await;
            bar.finish();
            let r = report?;
            out.report(&r, || {
                format!(
                    "published {} ({})\n  {} files ({} unchanged, not read), {} in {} chunks\n  uploaded {} ({} new chunks, {} packs) in {:.1}s{}",
                    r.reference,
                    r.root,
                    r.files,
                    r.files_unchanged,
                    output::bytes(r.bytes),
                    r.chunks,
                    output::bytes(r.new_bytes_uploaded),
                    r.new_chunks,
                    r.packs_uploaded,
                    r.seconds,
                    if r.tags.is_empty() { String::new() } else { format!("\n  tags: {}", r.tags.join(", ")) }
                )
            })
        }
        Command::Pull {
            reference,
            to,
            no_files,
            include,
            exclude,
        } => {
            let reference: DatasetRef = reference.parse()?;
            let select = shoal_node::Selection { include, exclude };
            select.matcher()?;
            let dest = if no_files {
                None
            } else {
                Some(to.unwrap_or_else(|| {
                    reference
                        .dataset
                        .as_str()
                        .rsplit('/')
                        .next()
                        .unwrap_or("dataset")
                        .into()
                }))
            };
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            let report = match daemon(&home, &cfg).await {
                Some(daemon) => {
                    let to = dest
                        .as_deref()
                        .map(std::path::absolute)
                        .transpose()
                        .context("resolving the destination directory")?;
                    let req = Request::Pull {
                        reference: reference.to_string(),
                        to,
                        origin: cfg.origin().to_string(),
                        select,
                    };
                    daemon
                        .call(&req, &progress)
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|v| Ok(serde_json::from_value::<shoal_node::PullReport>(v)?))
                }
                None => open(false)?
                    .pull_select(&reference, dest.as_deref(), &select, &progress)
                    .await
                    .map_err(anyhow::Error::from),
            };
            bar.finish();
            let r = report?;
            out.report(&r, || {
                format!(
                    "pulled {} ({}){}\n  {} files, {}: {} from origin, {} from peers, {} already local, {:.1}s",
                    r.version,
                    r.root,
                    r.destination.as_ref().map(|d| format!(" into {d}")).unwrap_or_default(),
                    if r.partial {
                        format!("{} of {}", r.files, r.files_in_version)
                    } else {
                        r.files.to_string()
                    },
                    output::bytes(r.bytes),
                    output::bytes(r.bytes_from_origin),
                    output::bytes(r.bytes_from_peers),
                    output::bytes(r.bytes_already_local),
                    r.seconds
                ) + &output::passed_over(r.readers_passed_over, r.readers_passed_over_by_lag)
                    .map(|l| format!("\n  {l}"))
                    .unwrap_or_default()
            })
        }
        Command::Key => {
            let key = home.secret_key()?.public().to_string();
            out.report(&serde_json::json!({ "public_key": key }), || key.clone())
        }
        Command::Trust { key, datasets } => {
            let key: shoal_registry::PublicKey = key.parse()?;
            let datasets: Vec<String> = datasets
                .iter()
                .flat_map(|d| d.split(','))
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect();
            for d in &datasets {
                glob::Pattern::new(d)
                    .with_context(|| format!("--datasets {d:?} is not a valid pattern"))?;
            }
            let added = home.trust(key, datasets.clone())?;
            let scope = if datasets.is_empty() {
                "every dataset".to_string()
            } else {
                format!("datasets {}", datasets.join(","))
            };
            out.report(
                &serde_json::json!({ "public_key": key.to_string(), "datasets": datasets, "added": added }),
                || {
                    if added {
                        format!("trusting {key} for {scope}")
                    } else {
                        format!("{key} was already trusted for {scope}")
                    }
                },
            )
        }
        Command::Versions { name } => {
            let name: DatasetName = name.parse()?;
            let list: Vec<shoal_node::VersionInfo> = match daemon(&home, &cfg).await {
                Some(daemon) => serde_json::from_value(
                    daemon
                        .call(
                            &Request::Versions {
                                name: name.to_string(),
                                origin: cfg.origin().to_string(),
                            },
                            &Progress::default(),
                        )
                        .await?,
                )?,
                None => open(false)?.versions(&name).await?,
            };
            out.report(
                &serde_json::json!({ "dataset": name.to_string(), "versions": list }),
                || {
                    if list.is_empty() {
                        return format!("no versions of {name}");
                    }
                    list.iter()
                        .map(|v| {
                            format!(
                                "{}\t{}\t{} files\t{}{}{}",
                                v.version,
                                v.root,
                                v.files,
                                output::bytes(v.bytes),
                                if v.tags.is_empty() {
                                    String::new()
                                } else {
                                    format!("\t[{}]", v.tags.join(", "))
                                },
                                if v.trusted {
                                    ""
                                } else {
                                    "\t(untrusted publisher)"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            )
        }
        Command::Ls { reference, path } => {
            let reference: DatasetRef = reference.parse()?;
            let path = path.unwrap_or_default();
            let entries: Vec<shoal_node::LsEntry> = match daemon(&home, &cfg).await {
                Some(daemon) => serde_json::from_value(
                    daemon
                        .call(
                            &Request::Ls {
                                reference: reference.to_string(),
                                path: path.clone(),
                                origin: cfg.origin().to_string(),
                            },
                            &Progress::default(),
                        )
                        .await?,
                )?,
                None => open(false)?.ls(&reference, &path).await?,
            };
            out.report(&serde_json::json!({ "ref": reference.to_string(), "path": path, "entries": entries }), || {
                entries
                    .iter()
                    .map(|e| {
                        let extra = match (&e.target, e.files) {
                            (Some(t), _) => format!(" -> {t}"),
                            (_, Some(f)) => format!("/  ({f} files)"),
                            _ => String::new(),
                        };
                        format!("{:>4} {:>10}  {}{}", e.mode, output::bytes(e.size), e.name, extra)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Diff { from, to } => {
            let (a, b): (DatasetRef, DatasetRef) = (from.parse()?, to.parse()?);
            let d = open(false)?.diff(&a, &b).await?;
            out.report(&d, || {
                let mut lines: Vec<String> = d
                    .entries
                    .iter()
                    .map(|e| {
                        let sign = match e.change {
                            "added" => "+",
                            "removed" => "-",
                            _ => "~",
                        };
                        let what = if e.kind == "dir" {
                            format!("/ ({} files)", e.files)
                        } else {
                            String::new()
                        };
                        format!("{sign} {}{what}", e.path)
                    })
                    .collect();
                lines.push(format!(
                    "{} -> {}: {} added ({}), {} removed ({}), {} changed ({} new bytes)",
                    d.from,
                    d.to,
                    d.added_files,
                    output::bytes(d.added_bytes),
                    d.removed_files,
                    output::bytes(d.removed_bytes),
                    d.changed_files,
                    output::bytes(d.changed_bytes)
                ));
                lines.join("\n")
            })
        }
        Command::Mount {
            reference,
            mountpoint,
            prefetch,
            read_order,
            read_ahead,
            timeout,
            threads,
            direct_io,
            passthrough,
        } => {
            let reference: DatasetRef = reference.parse()?;
            let args = mount::MountArgs {
                mountpoint,
                prefetch,
                read_order,
                read_ahead: read_ahead
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| anyhow::anyhow!("--read-ahead {read_ahead:?}: {e}"))?
                    .as_u64(),
                timeout,
                threads,
                direct_io,
                passthrough: match passthrough {
                    args::PassthroughArg::Auto => shoal_node::Passthrough::Auto,
                    args::PassthroughArg::On => shoal_node::Passthrough::On,
                    args::PassthroughArg::Off => shoal_node::Passthrough::Off,
                },
            };
            let r = mount::run(
                daemon(&home, &cfg).await,
                cfg.origin(),
                || open(false),
                &reference,
                args,
            )
            .await?;
            out.report(&r, || {
                format!(
                    "unmounted {} from {} ({}): {} files read, {} in read requests, {} pushed ahead of readers, {} opens read by the kernel from whole-file copies",
                    r.version,
                    r.mountpoint,
                    r.served_by,
                    r.files_read,
                    output::bytes(r.bytes_read),
                    output::bytes(r.bytes_pushed),
                    r.passthrough_opens
                )
            })
        }
        Command::Pin {
            reference,
            include,
            exclude,
        } => {
            let reference: DatasetRef = reference.parse()?;
            let select = shoal_node::Selection { include, exclude };
            select.matcher()?;
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            let r = match daemon(&home, &cfg).await {
                Some(daemon) => {
                    let req = Request::Pin {
                        reference: reference.to_string(),
                        origin: cfg.origin().to_string(),
                        select,
                    };
                    daemon
                        .call(&req, &progress)
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|v| Ok(serde_json::from_value::<shoal_node::PinReport>(v)?))
                }
                None => {
                    let node = open(false)?;
                    let r = node.pin_select(&reference, &select, &progress).await;
                    if r.is_ok() {
                        node.store()?.flush()?;
                    }
                    r.map_err(anyhow::Error::from)
                }
            };
            bar.finish();
            let r = r?;
            out.report(&r, || {
                format!(
                    "pinned {} ({}): {} in {} blobs, {} fetched",
                    r.pinned,
                    r.root,
                    output::bytes(r.bytes),
                    r.blobs,
                    output::bytes(r.bytes_from_origin)
                )
            })
        }
        Command::Unpin { reference } => {
            let reference: DatasetRef = reference.parse()?;
            let unpinned = match daemon(&home, &cfg).await {
                Some(daemon) => {
                    let req = Request::Unpin {
                        reference: reference.to_string(),
                        origin: cfg.origin().to_string(),
                    };
                    serde_json::from_value(daemon.call(&req, &Progress::default()).await?)?
                }
                None => open(false)?.unpin(&reference).await?,
            };
            if !unpinned {
                anyhow::bail!("{reference} is not pinned (see `shoal cache`)");
            }
            out.report(
                &serde_json::json!({ "unpinned": reference.to_string() }),
                || format!("unpinned {reference}"),
            )
        }
        Command::Cache => {
            let s: shoal_node::store::CacheStats = match daemon(&home, &cfg).await {
                Some(daemon) => serde_json::from_value(
                    daemon.call(&Request::Cache, &Progress::default()).await?,
                )?,
                None => {
                    let mut s = shoal_node::open_store(&home, &cfg.cache)?.stats()?;
                    s.whole_files = (cfg.cache.files > 0).then(|| {
                        shoal_node::wholefiles::scan(&home.whole_files_dir(), cfg.cache.files)
                    });
                    shoal_node::expiry::describe(&home, cfg.cache.ttl, &mut s)?;
                    s
                }
            };
            out.report(&s, || {
                let mut lines = vec![
                    format!("store {}", s.path),
                    format!(
                        "  {} on disk ({} live in {} blobs), capacity {}",
                        output::bytes(s.disk_bytes),
                        output::bytes(s.live_bytes),
                        s.blobs,
                        s.capacity
                            .map(output::bytes)
                            .unwrap_or_else(|| "unbounded".into())
                    ),
                    format!(
                        "  hit rate {:.1}% ({} hits, {} misses), {} evictions",
                        s.hit_rate * 100.0,
                        s.hits,
                        s.misses,
                        s.evictions
                    ),
                    format!("  pinned {}", output::bytes(s.pinned_bytes)),
                ];
                lines.extend(
                    s.pins
                        .iter()
                        .map(|p| format!("    {} ({})", p.name, output::bytes(p.bytes))),
                );
                lines.push("  tiers:".into());
                lines.extend(s.tiers.iter().map(|t| {
                    format!(
                        "    {:<6} {} of {}, hit rate {:.1}% ({} hits, {} misses), {} evictions{}",
                        t.kind,
                        output::bytes(t.used_bytes),
                        t.capacity
                            .map(output::bytes)
                            .unwrap_or_else(|| "unbounded".into()),
                        t.hit_rate * 100.0,
                        t.hits,
                        t.misses,
                        t.evictions,
                        t.path
                            .as_deref()
                            .map(|p| format!(" ({p})"))
                            .unwrap_or_default()
                    )
                }));
                if let Some(w) = &s.whole_files {
                    lines.push(format!(
                        "  whole-file copies for mounts: {} in {} files, capacity {} ({})",
                        output::bytes(w.used_bytes),
                        w.files,
                        output::bytes(w.capacity),
                        w.path
                    ));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let ago = |t: u64| {
                    humantime::format_duration(std::time::Duration::from_secs(
                        now.saturating_sub(t),
                    ))
                };
                lines.push(match s.ttl_s {
                    Some(t) => format!(
                        "  versions (TTL {}):",
                        humantime::format_duration(std::time::Duration::from_secs(t))
                    ),
                    None => "  versions (no TTL):".into(),
                });
                lines.extend(s.versions.iter().map(|v| {
                    let fate = match (v.pinned, v.expires_unix) {
                        (true, _) => "pinned".to_string(),
                        (false, Some(e)) if e > now => format!(
                            "expires in {}",
                            humantime::format_duration(std::time::Duration::from_secs(e - now))
                        ),
                        (false, Some(_)) => "expires at the next sweep".to_string(),
                        (false, None) => "kept until evicted".to_string(),
                    };
                    format!(
                        "    {} last used {} ago, {fate}",
                        v.name,
                        ago(v.last_used_unix)
                    )
                }));
                lines.join("\n")
            })
        }
        Command::Gc => {
            let freed: u64 = match daemon(&home, &cfg).await {
                Some(daemon) => {
                    serde_json::from_value(daemon.call(&Request::Gc, &Progress::default()).await?)?
                }
                None => {
                    shoal_node::open_store(&home, &cfg.cache)?.gc()?
                        + shoal_node::wholefiles::clear_dir(&home.whole_files_dir())
                }
            };
            out.report(&serde_json::json!({ "freed_bytes": freed }), || {
                format!("freed {}", output::bytes(freed))
            })
        }
        Command::Csi { endpoint, node_id } => {
            let socket =
                std::path::PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(&endpoint));
            let node_id = match node_id {
                Some(n) => n,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("reading the host name for --node-id")?
                    .trim()
                    .to_string(),
            };
            let opts = shoal_csi::Options {
                home: cfg.home.clone(),
                node_id,
            };
            shoal_csi::serve(&socket, opts, mount::interrupted())
                .await
                .map_err(anyhow::Error::msg)?;
            out.report(&serde_json::json!({ "stopped": socket }), || {
                format!("CSI plugin on {} stopped", socket.display())
            })
        }
        Command::Unmount { mountpoint } => {
            shoal_node::unmount(&mountpoint)?;
            out.report(
                &serde_json::json!({ "unmounted": mountpoint.display().to_string() }),
                || format!("unmounted {}", mountpoint.display()),
            )
        }
        Command::Node {
            command:
                NodeCommand::Run {
                    listen,
                    bootstrap,
                    region,
                    zone,
                    rack,
                    members,
                    cluster_key,
                    open: open_swarm,
                    metrics,
                    no_mdns,
                    no_wire_compression,
                    origin_rate,
                    upload_rate,
                    download_rate,
                },
        } => {
            let flag = |v: Option<String>, name: &str, file: Option<u64>| -> Result<Option<u64>> {
                match v {
                    Some(v) => Ok(Some(config::parse_rate(&v, name)?).filter(|&r| r > 0)),
                    None => Ok(file),
                }
            };
            let rates = shoal_node::swarm::rate::RateLimits {
                origin: flag(origin_rate, "--origin-rate", cfg.rates.origin)?,
                upload: flag(upload_rate, "--upload-rate", cfg.rates.upload)?,
                download: flag(download_rate, "--download-rate", cfg.rates.download)?,
            };
            let node = open_with(
                true,
                region.as_deref().or(cfg.node.region.as_deref()),
                zone.as_deref().or(cfg.node.zone.as_deref()),
                rates.origin,
            )?;
            let flags = config::NodeConfig {
                listen,
                bootstrap,
                region,
                zone,
                rack,
                members,
                cluster_key,
                open: open_swarm.then_some(true),
                metrics,
                mdns: no_mdns.then_some(false),
                wire_compression: no_wire_compression.then_some(false),
                limits: Default::default(),
            };
            // A node may serve peers before anything is published to a local default origin:
            // create the directory rather than refuse to start.
            node::run(node, &cfg.node, flags, rates, out).await
        }
        Command::Node {
            command: NodeCommand::Keygen { file },
        } => {
            let fingerprint = shoal_node::swarm::admission::keygen(&file)?;
            out.report(
                &serde_json::json!({ "cluster_key": file.display().to_string(), "fingerprint": fingerprint }),
                || {
                    format!(
                        "wrote a new cluster key to {} (fingerprint {fingerprint}); give this file to every node: shoal node run --cluster-key {}",
                        file.display(),
                        file.display()
                    )
                },
            )
        }
        Command::Status => node::status(&home, out).await,
        // Handled in `main`, before anything is opened.
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Tag { target, tag } => {
            let target: VersionRef = target.parse()?;
            let tag: Label = tag.parse()?;
            let msg = open(false)?.tag(&target, &tag).await?;
            out.report(&serde_json::json!({ "tag": format!("{}@{tag}", target.dataset), "version": target.to_string() }), || msg.clone())
        }
        Command::Rm {
            target,
            force,
            reason,
        } => {
            let target: VersionRef = target.parse()?;
            let r = open(false)?.remove_version(&target, force, &reason).await?;
            out.report(&r, || {
                let mut msg = if r.already_removed {
                    format!("{} was already removed; finished removing it", r.reference)
                } else {
                    format!("removed {} (root {})", r.reference, r.root)
                };
                if !r.tags_deleted.is_empty() {
                    msg.push_str(&format!("; deleted tags {}", r.tags_deleted.join(", ")));
                }
                msg.push_str(
                    "; `shoal origin gc` frees its packs once no other version needs them",
                );
                msg
            })
        }
        Command::Origin {
            command:
                args::OriginCommand::Gc {
                    dry_run,
                    grace,
                    apply_now,
                },
        } => {
            let r = open(false)?
                .origin_gc(dry_run, grace.map(|g| (g.as_secs(), apply_now)))
                .await?;
            out.report(&r, || {
                let expired = if r.retention_removed.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{} by retention rules: {}; ",
                        if r.dry_run { "would remove" } else { "removed" },
                        r.retention_removed.join(", ")
                    )
                };
                format!(
                    "{}{}: {expired}{} packs ({} objects, {}) {}; {} version objects of removed versions; kept {} packs in use, {} younger than the grace ({}), {} of recent removals ({} objects listed, {} read, {:.1}s)",
                    if r.dry_run { "dry run, " } else { "" },
                    r.origin,
                    r.packs_deleted,
                    r.plan.delete.len(),
                    output::bytes(r.bytes_freed),
                    if r.dry_run { "would be deleted" } else { "deleted" },
                    r.removed_versions_deleted.len(),
                    r.plan.live,
                    r.plan.young,
                    humantime::format_duration(std::time::Duration::from_secs(r.grace_s)),
                    r.plan.recently_removed,
                    r.objects_listed,
                    r.objects_read,
                    r.seconds,
                )
            })
        }
        Command::Origin {
            command:
                args::OriginCommand::Retain {
                    dataset,
                    keep_last,
                    keep_tagged,
                    keep_younger_than,
                    clear,
                },
        } => {
            let name: shoal_registry::DatasetName = dataset.parse()?;
            let node = open(false)?;
            let origin = node.origin();
            let set = keep_last.is_some() || keep_tagged || keep_younger_than.is_some();
            if clear {
                origin.set_retention(&name, None).await?;
            } else if set {
                let rules = shoal_registry::Retention {
                    keep_last,
                    keep_tagged,
                    keep_younger_than_s: keep_younger_than.map(|d| d.as_secs()),
                };
                origin.set_retention(&name, Some(&rules)).await?;
            }
            let rules = origin.retention(&name).await?;
            let words = match &rules {
                Some(r) => shoal_node::lifecycle::describe_rules(r),
                None => "keep every version".to_string(),
            };
            out.report(
                &serde_json::json!({
                    "dataset": name.to_string(),
                    "rules": rules.map(|r| serde_json::json!({
                        "keep_last": r.keep_last,
                        "keep_tagged": r.keep_tagged,
                        "keep_younger_than_s": r.keep_younger_than_s,
                    })),
                    "summary": words,
                }),
                || format!("{name}: {words} (applied by `shoal origin gc`; see `--dry-run`)"),
            )
        }
        Command::Origin {
            command:
                args::OriginCommand::Repack {
                    dataset,
                    threshold,
                    dry_run,
                },
        } => {
            let name: shoal_registry::DatasetName = dataset.parse()?;
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            let r = open(false)?
                .origin_repack(&name, threshold, dry_run, &progress)
                .await;
            bar.finish();
            let r = r?;
            out.report(&r, || {
                let copied: u64 = r.repacked.iter().map(|p| p.copied_bytes).sum();
                format!(
                    "{}{} in {}: {} of {} packs {} (live {} of {} in the packs its {} versions reach; {} copied into {} new packs, {} written); `shoal origin gc` frees {} once the grace period has passed ({:.1}s)",
                    if r.dry_run { "dry run, " } else { "" },
                    r.dataset,
                    r.origin,
                    r.repacked.len(),
                    r.packs,
                    if r.dry_run { "would be rewritten" } else { "rewritten" },
                    output::bytes(r.live_bytes),
                    output::bytes(r.bytes),
                    r.versions,
                    output::bytes(copied),
                    r.packs_written,
                    output::bytes(r.bytes_written),
                    output::bytes(r.bytes_to_free),
                    r.seconds,
                )
            })
        }
        Command::Verify {
            reference,
            all,
            local,
        } => {
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            let r = if local {
                let reference: DatasetRef = reference.parse()?;
                match daemon(&home, &cfg).await {
                    Some(daemon) => {
                        let req = Request::VerifyLocal {
                            reference: reference.to_string(),
                            origin: cfg.origin().to_string(),
                        };
                        daemon
                            .call(&req, &progress)
                            .await
                            .map_err(anyhow::Error::from)
                            .and_then(|v| Ok(serde_json::from_value(v)?))
                    }
                    None => open(false)?
                        .verify_local(&reference, &progress)
                        .await
                        .map_err(anyhow::Error::from),
                }
            } else if all {
                let name: shoal_registry::DatasetName = reference.parse()?;
                open(false)?
                    .verify_all(&name, &progress)
                    .await
                    .map_err(anyhow::Error::from)
            } else {
                let reference: DatasetRef = reference.parse()?;
                open(false)?
                    .verify(&reference, &progress)
                    .await
                    .map_err(anyhow::Error::from)
            };
            bar.finish();
            let r: shoal_node::VerifyReport = r?;
            if !r.ok() {
                let mut lines: Vec<String> = r
                    .changed
                    .iter()
                    .map(|k| format!("{k}: its source object changed since it was published"))
                    .collect();
                lines.extend(r.problems.iter().cloned());
                let msg = match &r.local {
                    Some(l) => format!(
                        "{}: this machine's copy lacks {} blob(s){}: {}{}",
                        r.version,
                        l.missing,
                        if l.corrupt > 0 {
                            format!(
                                " and held {} damaged (dropped: they are fetched again when read)",
                                l.corrupt
                            )
                        } else {
                            String::new()
                        },
                        lines[..lines.len().min(5)].join("; "),
                        if lines.len() > 5 {
                            "; ... (--json lists them)"
                        } else {
                            ""
                        }
                    ),
                    None => format!(
                        "{} has {} problem(s): {}",
                        r.version,
                        lines.len(),
                        lines.join("; ")
                    ),
                };
                return Err(
                    anyhow::Error::new(output::Failed(serde_json::to_value(&r)?)).context(msg),
                );
            }
            out.report(&r, || {
                if r.local.is_some() {
                    return format!(
                        "{}: this machine's copy is whole and intact ({} blobs, {} read, {:.1}s)",
                        r.version,
                        r.blobs,
                        output::bytes(r.bytes_read),
                        r.seconds
                    );
                }
                format!(
                    "{}: every blob verified ({} blobs in {} packs, {} read, {:.1}s)",
                    r.version,
                    r.blobs,
                    r.packs,
                    output::bytes(r.bytes_read),
                    r.seconds
                )
            })
        }
        Command::Replicate {
            refs,
            to,
            all,
            copy_sources,
        } => {
            let (mut versions, mut datasets) = (Vec::new(), Vec::new());
            for r in &refs {
                if all {
                    let name: DatasetName = r.parse().with_context(|| {
                        format!("with --all, {r:?} must be a dataset name (every version of it is copied)")
                    })?;
                    datasets.push(name);
                } else {
                    versions.push(r.parse::<DatasetRef>()?);
                }
            }
            // A path as the daemon would see it from anywhere.
            let to = if to.contains("://") {
                to
            } else {
                std::path::absolute(&to)
                    .with_context(|| format!("--to {to:?}"))?
                    .display()
                    .to_string()
            };
            let target = Origin::open(&to, true)?;
            let options = shoal_node::ReplicateOptions { copy_sources };
            let progress = Arc::new(Progress::default());
            let bar = out.progress(progress.clone());
            // Through the daemon if one runs: it reads what its store and its peers hold.
            let r = match daemon(&home, &cfg).await {
                Some(daemon) => {
                    let req = Request::Replicate {
                        refs: versions.iter().map(|r| r.to_string()).collect(),
                        all: datasets.iter().map(|d| d.to_string()).collect(),
                        to: target.url().to_string(),
                        options,
                        origin: cfg.origin().to_string(),
                    };
                    daemon
                        .call(&req, &progress)
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|v| Ok(serde_json::from_value::<shoal_node::ReplicateReport>(v)?))
                }
                None => open(false)?
                    .replicate(&versions, &datasets, &target, &options, &progress)
                    .await
                    .map_err(anyhow::Error::from),
            };
            bar.finish();
            let r = r?;
            out.report(&r, || {
                let created = r.versions.iter().filter(|v| v.created).count();
                format!(
                    "replicated {} version{} from {} to {} ({} new there)\n  packs: {} copied ({}: {} local, {} from peers, {} from origins), {} already there; {} written, {:.1}s{}",
                    r.versions.len(),
                    if r.versions.len() == 1 { "" } else { "s" },
                    r.from,
                    r.to,
                    created,
                    r.packs_copied,
                    output::bytes(r.pack_bytes_copied),
                    output::bytes(r.bytes_local),
                    output::bytes(r.bytes_from_peers),
                    output::bytes(r.origins.iter().map(|o| o.bytes).sum()),
                    r.packs_present,
                    output::bytes(r.bytes_written),
                    r.seconds,
                    if r.tags.is_empty() { String::new() } else { format!("\n  tags: {}", r.tags.join(", ")) }
                )
            })
        }
    }
}
